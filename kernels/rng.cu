// Counter-based random numbers on the GPU: the same Philox4x32-10 streams as qtune-quant's rng.rs, so a seed,
// tensor id and stream give the same words on either device. Element i reads lane i % 4 of the block at counter
// [i/4 lo, i/4 hi, tensor, stream] under key [seed lo, seed hi]. Uniforms are exact (24 bits, integer arithmetic);
// Gaussians go through Box-Muller with the GPU's logf/sincosf, so they agree with the CPU's to a few ulp, not bit
// for bit (the CPU uses Rust's libm).
#include <stdint.h>

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
    #pragma unroll
    for (int round = 0; round < 10; round++) {
        if (round > 0) {
            k.x += PHILOX_W0;
            k.y += PHILOX_W1;
        }
        const uint32_t hi0 = __umulhi(PHILOX_M0, c.x), lo0 = PHILOX_M0 * c.x;
        const uint32_t hi1 = __umulhi(PHILOX_M1, c.z), lo1 = PHILOX_M1 * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    }
    return c;
}

__device__ __forceinline__ float unit24(uint32_t w) { return (float)(w >> 8) * (1.0f / 16777216.0f); }

__device__ __forceinline__ uint32_t lane(uint4 w, uint32_t l) {
    return l == 0 ? w.x : l == 1 ? w.y : l == 2 ? w.z : w.w;
}

// The Gaussian of element i: Box-Muller on the block's pairs (x, y) -> lanes 0, 1 and (z, w) -> lanes 2, 3, as
// rng.rs pairs them.
__device__ __forceinline__ float gaussian_at(uint4 w, uint32_t l) {
    const uint32_t a = l < 2 ? w.x : w.z, c = l < 2 ? w.y : w.w;
    const float u1 = (float)((a >> 8) + 1) * (1.0f / 16777216.0f);
    const float r = sqrtf(-2.0f * logf(u1));
    float s, co;
    sincosf(6.2831853071795864769f * unit24(c), &s, &co);
    return (l & 1) ? r * s : r * co;
}

__device__ __forceinline__ uint4 block_of(uint64_t i, uint32_t seed_lo, uint32_t seed_hi, uint32_t tensor,
                                          uint32_t stream) {
    const uint64_t b = i >> 2;
    return philox4x32_10(make_uint4((uint32_t)b, (uint32_t)(b >> 32), tensor, stream), make_uint2(seed_lo, seed_hi));
}

// out[j] = uniform (gaussian == 0) or gaussian (gaussian != 0) draw of element start + j, j < n.
extern "C" __global__ void philox_fill_f32(float *out, uint64_t n, uint64_t start, uint32_t seed_lo,
                                           uint32_t seed_hi, uint32_t tensor, uint32_t stream, int gaussian) {
    const uint64_t j = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const uint64_t i = start + j;
    const uint4 w = block_of(i, seed_lo, seed_hi, tensor, stream);
    const uint32_t l = (uint32_t)(i & 3);
    out[j] = gaussian ? gaussian_at(w, l) : unit24(lane(w, l));
}

// out[j] = scale * x[j] + coef * z_j with z_j the Gaussian of element start + j (x may be out itself): a weight
// plus a direction, or a direction added in place, with no direction buffer (MeZO on a GPU).
extern "C" __global__ void philox_axpy_f32(float *out, const float *x, float scale, float coef, uint64_t n,
                                           uint64_t start, uint32_t seed_lo, uint32_t seed_hi, uint32_t tensor,
                                           uint32_t stream) {
    const uint64_t j = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const uint64_t i = start + j;
    const uint4 w = block_of(i, seed_lo, seed_hi, tensor, stream);
    out[j] = scale * x[j] + coef * gaussian_at(w, (uint32_t)(i & 3));
}

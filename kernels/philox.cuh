// Philox4x32-10 counters and the draws made from them, shared by the kernels (rng.cu, quant.cu). Device functions
// only, so they also compile as host C++ (kernels/host/cuda_shim.h) for tests/kernels_on_host.rs.
// Counter-based random numbers on the GPU: the same Philox4x32-10 streams as qtune-quant's rng.rs, so a seed,
// tensor id and stream give the same words on either device. Element i reads lane i % 4 of the block at counter
// [i/4 lo, i/4 hi, tensor, stream] under key [seed lo, seed hi]. Uniforms are exact (24 bits, integer arithmetic);
// Gaussians are Box-Muller in plain f32 arithmetic, operation for operation as qtune-quant's gauss.rs (explicit
// round-to-nearest intrinsics, so nvcc contracts nothing into an fma the CPU does not do): the same bits as the CPU.
#pragma once
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

// gauss.rs's constants: ln 2 in two parts, 1/3 .. 1/11, and the sin/cos Taylor coefficients in f = 4t - q.
#define LN2_HI 0.693145751953125f
#define LN2_LO 1.428606765330187e-06f
#define SQRT2F 1.41421353816986083984375f

// sqrt(-2 ln u1) for the word a (gauss.rs's radius).
__device__ __forceinline__ float bm_radius(uint32_t a) {
    const float u = __fmul_rn(__uint2float_rn((a >> 8) + 1u), 1.0f / 16777216.0f);
    const uint32_t bits = __float_as_uint(u);
    int e = (int)(bits >> 23) - 127;
    float m = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);
    if (m > SQRT2F) {
        m = __fmul_rn(m, 0.5f);
        e += 1;
    }
    const float s = __fdiv_rn(__fsub_rn(m, 1.0f), __fadd_rn(m, 1.0f));
    const float s2 = __fmul_rn(s, s);
    float p = __fmaf_rn(s2, 1.0f / 11.0f, 1.0f / 9.0f);
    p = __fmaf_rn(s2, p, 1.0f / 7.0f);
    p = __fmaf_rn(s2, p, 1.0f / 5.0f);
    p = __fmaf_rn(s2, p, 1.0f / 3.0f);
    const float t = __fadd_rn(s, s);
    const float ln_m = __fmaf_rn(__fmul_rn(t, s2), p, t);
    const float ef = __int2float_rn(e);
    const float ln = __fmaf_rn(ef, LN2_HI, __fmaf_rn(ef, LN2_LO, ln_m));
    return __fsqrt_rn(__fmul_rn(-2.0f, ln));
}

// (sin 2 pi t, cos 2 pi t) for the word b (gauss.rs's sincos_turn).
__device__ __forceinline__ void bm_sincos(uint32_t b, float *sn, float *cs) {
    const uint32_t k = b >> 8;
    const uint32_t q = (k + (1u << 21)) >> 22;
    const float f = __fmul_rn(__int2float_rn((int)k - (int)(q << 22)), 1.0f / 4194304.0f);
    const float f2 = __fmul_rn(f, f);
    float ps = __fmaf_rn(f2, 1.6044118e-4f, -0.004681754f);
    ps = __fmaf_rn(f2, ps, 0.07969263f);
    ps = __fmaf_rn(f2, ps, -0.6459641f);
    ps = __fmaf_rn(f2, ps, 1.5707964f);
    float pc = __fmaf_rn(f2, -2.5202042e-5f, 9.192603e-4f);
    pc = __fmaf_rn(f2, pc, -0.02086348f);
    pc = __fmaf_rn(f2, pc, 0.2536695f);
    pc = __fmaf_rn(f2, pc, -1.2337005f);
    float s = __fmul_rn(f, ps), c = __fmaf_rn(f2, pc, 1.0f);
    if (q & 1u) {
        const float x = s;
        s = c;
        c = x;
    }
    *sn = (q & 2u) ? -s : s;
    *cs = ((q + 1u) & 2u) ? -c : c;
}

// The Gaussian of element i: Box-Muller on the block's pairs (x, y) -> lanes 0, 1 and (z, w) -> lanes 2, 3, as
// rng.rs pairs them.
__device__ __forceinline__ float gaussian_at(uint4 w, uint32_t l) {
    const uint32_t a = l < 2 ? w.x : w.z, c = l < 2 ? w.y : w.w;
    const float r = bm_radius(a);
    float s, co;
    bm_sincos(c, &s, &co);
    return (l & 1) ? __fmul_rn(r, s) : __fmul_rn(r, co);
}

__device__ __forceinline__ uint4 block_of(uint64_t i, uint32_t seed_lo, uint32_t seed_hi, uint32_t tensor,
                                          uint32_t stream) {
    const uint64_t b = i >> 2;
    return philox4x32_10(make_uint4((uint32_t)b, (uint32_t)(b >> 32), tensor, stream), make_uint2(seed_lo, seed_hi));
}

// The 24-bit uniform of element i of the stream (seed, tensor, stream): rng.rs's `uniform`.
__device__ __forceinline__ float uniform_at(uint64_t i, uint64_t seed, uint32_t tensor, uint32_t stream) {
    return unit24(lane(block_of(i, (uint32_t)seed, (uint32_t)(seed >> 32), tensor, stream), (uint32_t)(i & 3)));
}

// The Gaussian of element i of the stream (seed, tensor, stream): rng.rs's `gaussian`.
__device__ __forceinline__ float gaussian_of(uint64_t i, uint64_t seed, uint32_t tensor, uint32_t stream) {
    return gaussian_at(block_of(i, (uint32_t)seed, (uint32_t)(seed >> 32), tensor, stream), (uint32_t)(i & 3));
}

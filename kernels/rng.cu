// The Philox streams as kernels: a buffer of uniforms or Gaussians, and a weight plus Gaussian directions with no
// direction buffer (MeZO on a GPU). The arithmetic is philox.cuh's.
#include "philox.cuh"

#ifdef __CUDACC__
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
#endif

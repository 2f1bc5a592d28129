// Prints the draws kernels/rng.cu computes, on the host: for each line "seed tensor stream start n" on stdin, n lines
// "uniform_bits gaussian_bits" (hex) of elements start .. start+n. tests/kernels_on_host.rs compares them with
// qtune-quant's CPU streams bit for bit. Build: g++ -O2 -ffp-contract=off -std=c++17 rng_dump.cpp
#include "cuda_shim.h"
#include "../philox.cuh"
#include <cstdio>

int main() {
    unsigned long long seed, start, n;
    unsigned tensor, stream;
    while (std::scanf("%llu %u %u %llu %llu", &seed, &tensor, &stream, &start, &n) == 5) {
        for (unsigned long long i = start; i < start + n; i++) {
            const uint4 w = block_of(i, (uint32_t)seed, (uint32_t)(seed >> 32), tensor, stream);
            const uint32_t l = (uint32_t)(i & 3);
            std::printf("%08x %08x\n", __float_as_uint(unit24(lane(w, l))), __float_as_uint(gaussian_at(w, l)));
        }
    }
    return 0;
}

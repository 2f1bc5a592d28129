// qtune's quantized formats on the GPU, operation for operation as qtune-quant's CPU code, so a code, a scale and a
// rounding decision are the same bits on either device (tests/kernels_on_host.rs compiles the device functions as
// host C++ and checks them against the CPU; tests/gpu.rs checks the kernels on a GPU):
// - INT8/INT4 grids (uniform.rs): codes to values, values to codes (fresh, or moved from the current code: the
//   frozen-scale re-encoding), round to nearest or stochastic rounding keyed by the element's index, group scales;
// - NF4 with double quantization (nf4.rs): codes to values, as bitsandbytes computes them;
// - QFT's hybrid weights (hybrid.rs): the CSR outliers written over the dense part's values, and its INT8 Lion step
//   (methods/qft/lion.rs): weights re-encoded on their frozen row grid, momentum and gradients in blocks of 256;
// - QuZO's quantized directions and its update (methods/quzo.rs), with no direction buffer.
// Every sum or product is an explicit round-to-nearest intrinsic so nvcc contracts nothing the CPU does not.
// Index types: elements are u64 throughout (a 7B embedding has 2^27 elements; a flat model more than 2^32).
#include "philox.cuh"

// ---------------------------------------------------------------------------------------------------------------
// Integer grids. bits is 8 or 4; sym says symmetric (q in [-qmax, qmax], 4-bit nibbles q + 8) or asymmetric
// (q in [0, 2^bits - 1], offset = the group's minimum).

__device__ __forceinline__ float grid_lo(int bits, int sym) { return sym ? (bits == 8 ? -127.0f : -7.0f) : 0.0f; }
__device__ __forceinline__ float grid_hi(int bits, int sym) {
    return bits == 8 ? (sym ? 127.0f : 255.0f) : (sym ? 7.0f : 15.0f);
}
__device__ __forceinline__ float nibble_zero(int sym) { return sym ? 8.0f : 0.0f; }

// The grid index q of element i (an integer-valued float): 8-bit codes as i8 (symmetric) or u8; nibbles packed two
// per byte over the flat order, the even element in the high nibble.
__device__ __forceinline__ float grid_index(const uint8_t *codes, uint64_t i, int bits, int sym) {
    if (bits == 8) return sym ? (float)(int8_t)codes[i] : (float)codes[i];
    const uint8_t b = codes[i >> 1];
    const uint32_t u = (i & 1) ? (b & 15u) : (b >> 4);
    return __fsub_rn((float)u, nibble_zero(sym));
}

// Element i's group: its scale and offset (0 when the format is symmetric: offsets == nullptr).
struct Group {
    float scale, offset;
};
__device__ __forceinline__ Group group_of(const float *scales, const float *offsets, uint64_t group, uint64_t i) {
    const uint64_t g = i / group;
    Group r;
    r.scale = scales[g];
    r.offset = offsets ? offsets[g] : 0.0f;
    return r;
}

// The value of element i: q*scale + offset in one fused multiply-add (uniform.rs's dequant_run).
__device__ __forceinline__ float int_value(const uint8_t *codes, uint64_t i, int bits, int sym, Group g) {
    return __fmaf_rn(grid_index(codes, i, bits, sym), g.scale, g.offset);
}

// Stochastic rounding's uniform for element i: the stream (seed, tensor, stream) at i, or, when piece > 0, the
// stream whose seed is xor-ed with (i / piece)·φ at i % piece (QFT's Int8Blocks: one IntTensor per piece of 2^16).
struct SrKey {
    int on;
    uint64_t seed;
    uint32_t tensor, stream;
    uint64_t piece;
};
__device__ __forceinline__ float sr_uniform(const SrKey &k, uint64_t i) {
    if (k.piece == 0) return uniform_at(i, k.seed, k.tensor, k.stream);
    return uniform_at(i % k.piece, k.seed ^ ((i / k.piece) * 0x9E3779B97F4A7C15ull), k.tensor, k.stream);
}

// round.rs: floor, and SR(y) = floor(y) + [u < y - floor(y)].
__device__ __forceinline__ float stochastic_round(float y, float u) {
    const float f = floorf(y);
    return u < __fsub_rn(y, f) ? __fadd_rn(f, 1.0f) : f;
}

// The new grid index of a value x in group g, moved from grid index base (0 for a fresh encoding): simd.rs's
// encode_grid. A zero or subnormal scale encodes everything as base (an inverse of 0).
__device__ __forceinline__ float encode_index(float x, float base, Group g, int bits, int sym, const SrKey &k,
                                              uint64_t i) {
    float inv = g.scale == 0.0f ? 0.0f : __fdiv_rn(1.0f, g.scale);
    if (!isfinite(inv)) inv = 0.0f;
    const float y = __fmul_rn(__fsub_rn(x, __fmaf_rn(base, g.scale, g.offset)), inv);
    const float r = k.on ? stochastic_round(y, sr_uniform(k, i)) : rintf(y);
    return fminf(fmaxf(__fadd_rn(base, r), grid_lo(bits, sym)), grid_hi(bits, sym));
}

// The stored code of grid index q: a byte (two's complement for symmetric 8-bit) or a nibble.
__device__ __forceinline__ uint32_t code_of(float q, int bits, int sym) {
    return (uint32_t)(uint8_t)(int)__fadd_rn(q, bits == 4 ? nibble_zero(sym) : 0.0f);
}

// Writes the codes of elements [lo, hi) that share byte b of a 4-bit tensor (or element b of an 8-bit one), each
// from new_index(i, current value): one thread per byte, so nibbles never race. F: float(uint64_t i, float q_old).
template <class F>
__device__ __forceinline__ void rewrite_code(uint8_t *codes, uint64_t b, uint64_t lo, uint64_t hi, int bits,
                                             int sym, F new_index) {
    if (bits == 8) {
        codes[b] = (uint8_t)code_of(new_index(b, grid_index(codes, b, 8, sym)), 8, sym);
        return;
    }
    uint32_t byte = codes[b];
    for (uint64_t i = 2 * b; i < 2 * b + 2; i++) {
        if (i < lo || i >= hi) continue;
        const uint32_t c = code_of(new_index(i, grid_index(codes, i, 4, sym)), 4, sym) & 15u;
        byte = (i & 1) ? ((byte & 0xF0u) | c) : ((byte & 0x0Fu) | (c << 4));
    }
    codes[b] = (uint8_t)byte;
}

// The bytes (threads) that hold elements [start, start + n).
__device__ __forceinline__ uint64_t first_byte(uint64_t start, int bits) { return bits == 8 ? start : start >> 1; }
__device__ __forceinline__ uint64_t byte_count(uint64_t start, uint64_t n, int bits) {
    return n == 0 ? 0 : (bits == 8 ? n : ((start + n - 1) >> 1) - (start >> 1) + 1);
}

// Scale and offset of a group spanning [lo, hi] (uniform.rs's scale_for; lo = -hi for symmetric).
__device__ __forceinline__ Group scale_for(float lo, float hi, int bits, int sym) {
    Group g;
    const float qmax = grid_hi(bits, sym);
    g.scale = sym ? __fdiv_rn(hi, qmax) : __fdiv_rn(__fsub_rn(hi, lo), qmax);
    g.offset = sym ? 0.0f : lo;
    return g;
}

// A group's parameters from its reduced range: hi = max |x| (symmetric, from 0), or [lo, hi] = the min and max of
// its non-NaN values (from +inf and -inf: a group of NaNs only spans [0, 0], as simd.rs's min_max says).
__device__ __forceinline__ Group group_params(float lo, float hi, int bits, int sym) {
    if (sym) return scale_for(-hi, hi, bits, sym);
    const bool none = lo > hi;
    return scale_for(none ? 0.0f : lo, none ? 0.0f : hi, bits, sym);
}

// ---------------------------------------------------------------------------------------------------------------
// NF4 (nf4.rs): levels[u]·absmax of block i / block, a plain product; a double-quantized absmax is
// dmap[code]·absmax2[b / dq_block] + offset, rounded after each operation as bitsandbytes does.
struct Nf4Scales {
    const float *absmax;  // plain per-block absmax, or nullptr when double-quantized
    const uint8_t *dq_codes;
    const float *dq_absmax2;
    float dq_offset;
    uint64_t dq_block;
    const float *dmap;  // bitsandbytes' signed dynamic map (256)
};
__device__ __forceinline__ float nf4_absmax(const Nf4Scales &s, uint64_t b) {
    if (s.absmax) return s.absmax[b];
    return __fadd_rn(__fmul_rn(s.dmap[s.dq_codes[b]], s.dq_absmax2[b / s.dq_block]), s.dq_offset);
}
__device__ __forceinline__ float nf4_value(const uint8_t *codes, uint64_t i, uint64_t block, const float *levels,
                                           const Nf4Scales &s) {
    const uint8_t byte = codes[i >> 1];
    const uint32_t u = (i & 1) ? (byte & 15u) : (byte >> 4);
    return __fmul_rn(levels[u], nf4_absmax(s, i / block));
}

// ---------------------------------------------------------------------------------------------------------------
// QuZO's quantized direction (quzo.rs's QDirection::fill): u ~ N(0, 1) from the Gaussian stream, y = u / scale,
// rounded (stochastically on sr_stream, or to nearest when sr_stream < 0), clamped to ±qmax, times scale.
struct QDir {
    uint64_t seed;
    uint32_t tensor, stream;  // the Gaussian stream
    float scale, qmax;
};
__device__ __forceinline__ float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }
__device__ __forceinline__ float qdir_at(const QDir &d, uint64_t i, int64_t sr_stream) {
    const float y = __fdiv_rn(gaussian_of(i, d.seed, d.tensor, d.stream), d.scale);
    const float q = sr_stream >= 0 ? stochastic_round(y, uniform_at(i, d.seed, d.tensor, (uint32_t)sr_stream)) : rintf(y);
    return __fmul_rn(clampf(q, -d.qmax, d.qmax), d.scale);
}

// One direction of a QuZO update, as the kernels read it from device memory (32 bytes, Rust's ZoDir).
struct ZoDir {
    uint64_t seed;
    uint32_t tensor, stream;
    float scale, qmax;
    double mu;  // the direction's projected gradient
};

// quzo.rs's zo_update for one element: w - (f32)(lr·(Σ_k mu_k·u2_k / n + decay·w)), the sum in f64 in k's order.
__device__ __forceinline__ float zo_new_value(float w, uint64_t i, const ZoDir *dirs, uint32_t k, int64_t u2_stream,
                                              double lr, double decay) {
    double g = 0.0;
    for (uint32_t d = 0; d < k; d++) {
        QDir q;
        q.seed = dirs[d].seed;
        q.tensor = dirs[d].tensor;
        q.stream = dirs[d].stream;
        q.scale = dirs[d].scale;
        q.qmax = dirs[d].qmax;
        g = __dadd_rn(g, __dmul_rn(dirs[d].mu, (double)qdir_at(q, i, u2_stream)));
    }
    const double step = __dmul_rn(lr, __dadd_rn(__ddiv_rn(g, (double)k), __dmul_rn(decay, (double)w)));
    return __fsub_rn(w, __double2float_rn(step));
}

// ---------------------------------------------------------------------------------------------------------------
// Lion (methods/qft/lion.rs): c = b1·m + (1 - b1)·g·gs; w - lr·(sign(c) + wd·w) with sign(0) = 0 (keeping c's zero
// sign, as f32::signum(c)·[c ≠ 0] does); momentum b2·m + (1 - b2)·g·gs.
__device__ __forceinline__ float lion_weight(float w, float m, float g, float gs, float b1, float lr, float wd) {
    const float c = __fadd_rn(__fmul_rn(b1, m), __fmul_rn(__fmul_rn(__fsub_rn(1.0f, b1), g), gs));
    const float sgn = isnan(c) ? c : __fmul_rn(copysignf(1.0f, c), c != 0.0f ? 1.0f : 0.0f);
    return __fsub_rn(w, __fmul_rn(lr, __fadd_rn(sgn, __fmul_rn(wd, w))));
}
__device__ __forceinline__ float lion_momentum(float m, float g, float gs, float b2) {
    return __fadd_rn(__fmul_rn(b2, m), __fmul_rn(__fmul_rn(__fsub_rn(1.0f, b2), g), gs));
}

// QFT's INT8 blocks (methods/qft/blocks.rs): symmetric INT8, one scale per 256 elements (qft::BLOCK and
// cuda_quant::BLOCK8, asserted equal in methods/qft_gpu.rs).
#define BLOCK8 256
__device__ __forceinline__ float block8_value(const uint8_t *codes, const float *scales, uint64_t i) {
    return __fmaf_rn((float)(int8_t)codes[i], scales[i / BLOCK8], 0.0f);
}

// What a block re-quantization writes for element i, from its current value old (blocks_requant's modes).
#define REQUANT_SET 0       // x[i]: a gradient pushed on the stack
#define REQUANT_ADD 1       // old + x[i]: a later micro-batch's gradient added into its entry
#define REQUANT_MOMENTUM 2  // Lion's momentum from the INT8 gradient (g codes, g scales) times gs
__device__ __forceinline__ float requant_value(int mode, float old, uint64_t i, const float *x, const uint8_t *g_codes,
                                               const float *g_scales, float gs, float b2) {
    if (mode == REQUANT_SET) return x[i];
    if (mode == REQUANT_ADD) return __fadd_rn(old, x[i]);
    return lion_momentum(old, block8_value(g_codes, g_scales, i), gs, b2);
}

// ---------------------------------------------------------------------------------------------------------------
// One thread's work in each kernel, shared with the host check (kernels/host/quant_dump.cpp).

// An integer tensor's codes and groups.
struct IntView {
    uint8_t *codes;
    int bits, sym;
    uint64_t group;
    const float *scales, *offsets;
    __device__ __forceinline__ Group at(uint64_t i) const { return group_of(scales, offsets, group, i); }
};
// INT8 blocks of 256 (momentum, a gradient-stack entry).
struct Block8 {
    const uint8_t *codes;
    const float *scales;
    __device__ __forceinline__ float at(uint64_t i) const { return block8_value(codes, scales, i); }
};
struct LionArgs {
    float gs, b1, lr, wd;
};

// int_encode's thread t: the byte of elements [start, start + n) that it owns, from x (x[0] is element start).
__device__ __forceinline__ void int_encode_at(const IntView &v, uint64_t t, uint64_t start, uint64_t n,
                                              const float *x, int delta, const SrKey &k) {
    rewrite_code(v.codes, first_byte(start, v.bits) + t, start, start + n, v.bits, v.sym, [&](uint64_t i, float q) {
        return encode_index(x[i - start], delta ? q : 0.0f, v.at(i), v.bits, v.sym, k, i);
    });
}

// zo_update_int's thread t: dequantize, step (zo_new_value), re-encode on the frozen grid.
__device__ __forceinline__ void zo_update_at(const IntView &v, uint64_t t, uint64_t start, uint64_t n,
                                             const ZoDir *dirs, uint32_t k, int64_t u2_stream, double lr,
                                             double decay, const SrKey &key) {
    rewrite_code(v.codes, first_byte(start, v.bits) + t, start, start + n, v.bits, v.sym, [&](uint64_t i, float q) {
        const Group g = v.at(i);
        const float w = zo_new_value(__fmaf_rn(q, g.scale, g.offset), i, dirs, k, u2_stream, lr, decay);
        return encode_index(w, q, g, v.bits, v.sym, key, i);
    });
}

// lion_dense's element i of a hybrid weight's dense part (INT8 symmetric, one scale per row of cols).
__device__ __forceinline__ void lion_dense_at(uint8_t *codes, const float *row_scales, uint64_t cols, uint64_t i,
                                              Block8 m, Block8 g, LionArgs a, const SrKey &key) {
    const Group gr = {row_scales[i / cols], 0.0f};
    const float q = grid_index(codes, i, 8, 1);
    const float w = lion_weight(__fmaf_rn(q, gr.scale, 0.0f), m.at(i), g.at(i), a.gs, a.b1, a.lr, a.wd);
    codes[i] = (uint8_t)code_of(encode_index(w, q, gr, 8, 1, key, i), 8, 1);
}

// lion_outliers' row r: its outliers stepped exactly, their dense codes back to 0.
__device__ __forceinline__ void lion_outliers_row(float *values, uint8_t *codes, const uint32_t *row_ptr,
                                                  const uint32_t *col_idx, uint64_t r, uint64_t cols, Block8 m,
                                                  Block8 g, LionArgs a) {
    for (uint32_t k = row_ptr[r]; k < row_ptr[r + 1]; k++) {
        const uint64_t i = r * cols + col_idx[k];
        values[k] = lion_weight(values[k], m.at(i), g.at(i), a.gs, a.b1, a.lr, a.wd);
        codes[i] = 0;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Row reads: a span of rows from r0, or rows by id (an embedding lookup: ids != nullptr, checked on the host), so a
// lookup dequantizes only the rows it takes.

// The row that output row r reads.
__device__ __forceinline__ uint64_t source_row(uint64_t r, uint64_t r0, const uint32_t *ids) {
    return ids ? (uint64_t)ids[r] : r0 + r;
}

// The element that output element j reads: start + j, or column j % cols of row ids[j / cols].
__device__ __forceinline__ uint64_t source_element(uint64_t j, uint64_t start, const uint32_t *ids, uint64_t cols) {
    return ids ? source_row(j / cols, 0, ids) * cols + j % cols : start + j;
}

// A hybrid weight's outliers of source row `row` written over output row r of its dequantized dense part.
__device__ __forceinline__ void csr_scatter_row(float *out, const uint32_t *row_ptr, const uint32_t *col_idx,
                                                const float *values, uint64_t row, uint64_t r, uint64_t cols) {
    for (uint32_t k = row_ptr[row]; k < row_ptr[row + 1]; k++) out[r * cols + col_idx[k]] = values[k];
}

// ---------------------------------------------------------------------------------------------------------------
// The kernels. Each thread does one element (or one byte of nibbles) with the functions above; nothing else
// happens in them, so the host check of the functions covers the arithmetic.
#ifdef __CUDACC__
#define THREAD_INDEX ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x)

// out[j] = value of element source_element(j) of an integer tensor.
extern "C" __global__ void int_dequant_f32(float *out, const uint8_t *codes, uint64_t n, uint64_t start,
                                           const uint32_t *ids, uint64_t cols, int bits, int sym, uint64_t group,
                                           const float *scales, const float *offsets) {
    const uint64_t j = THREAD_INDEX;
    if (j >= n) return;
    const uint64_t i = source_element(j, start, ids, cols);
    out[j] = int_value(codes, i, bits, sym, group_of(scales, offsets, group, i));
}

// Encodes x[j] as element start + j: fresh (delta == 0) or moved from its current code (the frozen grid).
extern "C" __global__ void int_encode(uint8_t *codes, const float *x, uint64_t n, uint64_t start, int bits, int sym,
                                      uint64_t group, const float *scales, const float *offsets, int delta, int sr,
                                      uint64_t seed, uint32_t tensor, uint32_t stream, uint64_t piece) {
    const uint64_t t = THREAD_INDEX;
    if (t >= byte_count(start, n, bits)) return;
    const IntView v = {codes, bits, sym, group, scales, offsets};
    int_encode_at(v, t, start, n, x, delta, SrKey{sr, seed, tensor, stream, piece});
}

// One thread block per group: the group's scale (and offset) from its values x (elements g·group .. of x, which
// holds the tensor's first n elements). blockDim.x must be a power of two ≤ 1024.
extern "C" __global__ void int_group_scales(float *scales, float *offsets, const float *x, uint64_t n, uint64_t group,
                                            int bits, int sym) {
    __shared__ float lo_s[1024], hi_s[1024];
    const uint64_t g = blockIdx.x, a = g * group, b = min(a + group, n);
    float lo = INFINITY, hi = sym ? 0.0f : -INFINITY;
    for (uint64_t i = a + threadIdx.x; i < b; i += blockDim.x) {
        if (sym) {
            hi = fmaxf(hi, fabsf(x[i]));
        } else {
            lo = fminf(lo, x[i]);
            hi = fmaxf(hi, x[i]);
        }
    }
    lo_s[threadIdx.x] = lo;
    hi_s[threadIdx.x] = hi;
    __syncthreads();
    for (uint32_t s = blockDim.x / 2; s > 0; s /= 2) {
        if (threadIdx.x < s) {
            lo_s[threadIdx.x] = fminf(lo_s[threadIdx.x], lo_s[threadIdx.x + s]);
            hi_s[threadIdx.x] = fmaxf(hi_s[threadIdx.x], hi_s[threadIdx.x + s]);
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const Group r = group_params(lo_s[0], hi_s[0], bits, sym);
        scales[g] = r.scale;
        if (!sym) offsets[g] = r.offset;
    }
}

// out[j] = value of element source_element(j) of an NF4 tensor.
extern "C" __global__ void nf4_dequant_f32(float *out, const uint8_t *codes, uint64_t n, uint64_t start,
                                           const uint32_t *ids, uint64_t cols, uint64_t block, const float *levels, const float *absmax,
                                           const uint8_t *dq_codes, const float *dq_absmax2, float dq_offset,
                                           uint64_t dq_block, const float *dmap) {
    const uint64_t j = THREAD_INDEX;
    if (j >= n) return;
    const Nf4Scales s = {absmax, dq_codes, dq_absmax2, dq_offset, dq_block, dmap};
    out[j] = nf4_value(codes, source_element(j, start, ids, cols), block, levels, s);
}

// A hybrid weight's outliers over the rows of its dequantized dense part that out holds (rows r0 .. r0 + rows, or
// rows ids[0 .. rows]).
extern "C" __global__ void csr_scatter_rows(float *out, const uint32_t *row_ptr, const uint32_t *col_idx,
                                            const float *values, uint64_t r0, const uint32_t *ids, uint64_t rows,
                                            uint64_t cols) {
    const uint64_t r = THREAD_INDEX;
    if (r >= rows) return;
    csr_scatter_row(out, row_ptr, col_idx, values, source_row(r, r0, ids), r, cols);
}

// The largest |z| of the Gaussian stream (seed, tensor, stream) over elements [0, n) (QuZO's direction scale): a
// grid-stride loop, a block reduction, and one atomicMax per block on the bits of a non-negative float (whose integer
// order is its order as a float). *out_bits must start at 0. blockDim.x must be 256.
extern "C" __global__ void gauss_absmax(uint32_t *out_bits, uint64_t n, uint64_t seed, uint32_t tensor,
                                        uint32_t stream) {
    __shared__ float m[256];
    float a = 0.0f;
    for (uint64_t i = THREAD_INDEX; i < n; i += (uint64_t)gridDim.x * blockDim.x)
        a = fmaxf(a, fabsf(gaussian_of(i, seed, tensor, stream)));
    m[threadIdx.x] = a;
    __syncthreads();
    for (uint32_t s = blockDim.x / 2; s > 0; s /= 2) {
        if (threadIdx.x < s) m[threadIdx.x] = fmaxf(m[threadIdx.x], m[threadIdx.x + s]);
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicMax(out_bits, __float_as_uint(m[0]));
}

// out[j] += eps·u(start + j) for QuZO's quantized direction u (SR on sr_stream, or nearest when it is < 0).
extern "C" __global__ void qdir_axpy_f32(float *out, uint64_t n, uint64_t start, const uint32_t *ids, uint64_t cols,
                                         float eps, uint64_t seed, uint32_t tensor, uint32_t stream, float scale,
                                         float qmax, int64_t sr_stream) {
    const uint64_t j = THREAD_INDEX;
    if (j >= n) return;
    const QDir d = {seed, tensor, stream, scale, qmax};
    out[j] = __fadd_rn(out[j], __fmul_rn(eps, qdir_at(d, source_element(j, start, ids, cols), sr_stream)));
}

// QuZO's update of elements start .. start + n of an integer tensor, fused: dequantize, step (zo_new_value),
// re-encode on the frozen grid with stochastic rounding (seed, tensor, stream). No f32 copy of the weight.
extern "C" __global__ void zo_update_int(uint8_t *codes, uint64_t n, uint64_t start, int bits, int sym,
                                         uint64_t group, const float *scales, const float *offsets,
                                         const ZoDir *dirs, uint32_t k, int64_t u2_stream, double lr, double decay,
                                         uint64_t seed, uint32_t tensor, uint32_t stream) {
    const uint64_t t = THREAD_INDEX;
    if (t >= byte_count(start, n, bits)) return;
    const IntView v = {codes, bits, sym, group, scales, offsets};
    zo_update_at(v, t, start, n, dirs, k, u2_stream, lr, decay, SrKey{1, seed, tensor, stream, 0});
}

// The same update of an f32 vector (norm weights): w[j] is element start + j.
extern "C" __global__ void zo_update_f32(float *w, uint64_t n, uint64_t start, const ZoDir *dirs, uint32_t k,
                                         int64_t u2_stream, double lr, double decay) {
    const uint64_t j = THREAD_INDEX;
    if (j >= n) return;
    w[j] = zo_new_value(w[j], start + j, dirs, k, u2_stream, lr, decay);
}

// QFT's Lion on a hybrid weight's dense INT8 part (n elements, rows of cols, one scale per row): every element is
// stepped and re-encoded on its row's frozen grid (SR keyed by its index); outlier positions are then put back by
// lion_outliers (their dense code must stay 0).
extern "C" __global__ void lion_dense(uint8_t *codes, const float *row_scales, uint64_t n, uint64_t cols,
                                      const uint8_t *m_codes, const float *m_scales, const uint8_t *g_codes,
                                      const float *g_scales, float gs, float b1, float lr, float wd, uint64_t seed,
                                      uint32_t tensor, uint32_t stream) {
    const uint64_t i = THREAD_INDEX;
    if (i >= n) return;
    lion_dense_at(codes, row_scales, cols, i, Block8{m_codes, m_scales}, Block8{g_codes, g_scales},
                  LionArgs{gs, b1, lr, wd}, SrKey{1, seed, tensor, stream, 0});
}

// The outliers' Lion step, exactly in f32, and their dense codes back to 0: one thread per row.
extern "C" __global__ void lion_outliers(float *values, uint8_t *codes, const uint32_t *row_ptr,
                                         const uint32_t *col_idx, uint64_t rows, uint64_t cols,
                                         const uint8_t *m_codes, const float *m_scales, const uint8_t *g_codes,
                                         const float *g_scales, float gs, float b1, float lr, float wd) {
    const uint64_t r = THREAD_INDEX;
    if (r >= rows) return;
    lion_outliers_row(values, codes, row_ptr, col_idx, r, cols, Block8{m_codes, m_scales}, Block8{g_codes, g_scales},
                      LionArgs{gs, b1, lr, wd});
}

// Lion on an f32 vector (norm weights): w[i] stepped in place.
extern "C" __global__ void lion_f32(float *w, uint64_t n, const uint8_t *m_codes, const float *m_scales,
                                    const uint8_t *g_codes, const float *g_scales, float gs, float b1, float lr,
                                    float wd) {
    const uint64_t i = THREAD_INDEX;
    if (i >= n) return;
    w[i] = lion_weight(w[i], block8_value(m_codes, m_scales, i), block8_value(g_codes, g_scales, i), gs, b1, lr, wd);
}

// Re-quantizes INT8 blocks of 256 in place (one thread block of 256 threads per block): each element's new value
// (requant_value's mode), the block's new absmax scale, and the codes by stochastic rounding with Int8Blocks' keys
// (piece-folded seeds). partials (optional) gets each block's Σ new² in f64, summed in a fixed tree order, for
// sum_f64 to add up: no atomics, so the sum is the same from run to run.
extern "C" __global__ void blocks_requant(uint8_t *codes, float *scales, uint64_t n, int mode, const float *x,
                                          const uint8_t *g_codes, const float *g_scales, float gs, float b2,
                                          uint64_t seed, uint32_t tensor, uint32_t stream, uint64_t piece,
                                          double *partials) {
    __shared__ float amax[BLOCK8];
    __shared__ double sq[BLOCK8];
    const uint64_t i = (uint64_t)blockIdx.x * BLOCK8 + threadIdx.x;
    const bool in = i < n;
    const float v = in ? requant_value(mode, block8_value(codes, scales, i), i, x, g_codes, g_scales, gs, b2) : 0.0f;
    amax[threadIdx.x] = fabsf(v);
    sq[threadIdx.x] = __dmul_rn((double)v, (double)v);
    __syncthreads();
    for (uint32_t s = BLOCK8 / 2; s > 0; s /= 2) {
        if (threadIdx.x < s) {
            amax[threadIdx.x] = fmaxf(amax[threadIdx.x], amax[threadIdx.x + s]);
            sq[threadIdx.x] = __dadd_rn(sq[threadIdx.x], sq[threadIdx.x + s]);
        }
        __syncthreads();
    }
    const Group g = scale_for(-amax[0], amax[0], 8, 1);
    if (threadIdx.x == 0 && partials) partials[blockIdx.x] = sq[0];
    if (!in) return;
    if (threadIdx.x == 0) scales[blockIdx.x] = g.scale;
    const SrKey key = {1, seed, tensor, stream, piece};
    codes[i] = (uint8_t)code_of(encode_index(v, 0.0f, g, 8, 1, key, i), 8, 1);
}

// out[0] = Σ x[0..n) in a fixed order (one block of 256 threads: strided sums, then a tree), so the same bits from
// run to run.
extern "C" __global__ void sum_f64(double *out, const double *x, uint64_t n) {
    __shared__ double s[256];
    double a = 0.0;
    for (uint64_t i = threadIdx.x; i < n; i += 256) a = __dadd_rn(a, x[i]);
    s[threadIdx.x] = a;
    __syncthreads();
    for (uint32_t k = 128; k > 0; k /= 2) {
        if (threadIdx.x < k) s[threadIdx.x] = __dadd_rn(s[threadIdx.x], s[threadIdx.x + k]);
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = s[0];
}
#endif

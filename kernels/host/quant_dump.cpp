// Runs kernels/quant.cu's device functions on the host, one kernel's work per request, thread by thread as the
// kernel's grid would: tests/kernels_on_host.rs sends each request on stdin (little-endian: a u32 op, then the op's
// fields below) and compares the bytes written to stdout with qtune-quant's CPU code. Arrays are a u64 count and
// the elements. Build: g++ -O2 -ffp-contract=off -std=c++17 quant_dump.cpp
#include "cuda_shim.h"
#include "../quant.cu"
#include <cstdio>
#include <cstdlib>
#include <vector>

template <class T> static T get() {
    T v;
    if (std::fread(&v, sizeof v, 1, stdin) != 1) std::exit(3);
    return v;
}
template <class T> static std::vector<T> arr() {
    std::vector<T> v(get<uint64_t>());
    if (!v.empty() && std::fread(v.data(), sizeof(T), v.size(), stdin) != v.size()) std::exit(3);
    return v;
}
template <class T> static void put(const std::vector<T> &v) { std::fwrite(v.data(), sizeof(T), v.size(), stdout); }
// An optional array: an empty one stands for the kernel's nullptr.
template <class T> static const T *opt(const std::vector<T> &v) { return v.empty() ? nullptr : v.data(); }

struct Int {
    int bits, sym;
    uint64_t group;
    std::vector<uint8_t> codes;
    std::vector<float> scales, offsets;
    static Int read() {
        Int t;
        t.bits = get<int32_t>();
        t.sym = get<int32_t>();
        t.group = get<uint64_t>();
        t.codes = arr<uint8_t>();
        t.scales = arr<float>();
        t.offsets = arr<float>();
        return t;
    }
    IntView view() { return IntView{codes.data(), bits, sym, group, scales.data(), opt(offsets)}; }
};
static SrKey read_key() {
    SrKey k;
    k.on = get<int32_t>();
    k.seed = get<uint64_t>();
    k.tensor = get<uint32_t>();
    k.stream = get<uint32_t>();
    k.piece = get<uint64_t>();
    return k;
}

int main() {
    uint32_t op;
    while (std::fread(&op, 4, 1, stdin) == 1) {
        switch (op) {
        case 0: {  // int_dequant_f32: Int, start, n, row ids (empty: a span), cols -> n f32
            Int t = Int::read();
            const uint64_t start = get<uint64_t>(), n = get<uint64_t>();
            const std::vector<uint32_t> ids = arr<uint32_t>();
            const uint64_t cols = get<uint64_t>();
            std::vector<float> out(n);
            for (uint64_t j = 0; j < n; j++) {
                const uint64_t i = source_element(j, start, opt(ids), cols);
                out[j] = int_value(t.codes.data(), i, t.bits, t.sym, group_of(t.scales.data(), opt(t.offsets), t.group, i));
            }
            put(out);
            break;
        }
        case 1: {  // int_encode: Int, start, x, delta, key -> the codes
            Int t = Int::read();
            const uint64_t start = get<uint64_t>();
            const std::vector<float> x = arr<float>();
            const int delta = get<int32_t>();
            const SrKey k = read_key();
            const uint64_t n = x.size();
            const IntView v = t.view();
            for (uint64_t b = 0; b < byte_count(start, n, t.bits); b++) int_encode_at(v, b, start, n, x.data(), delta, k);
            put(t.codes);
            break;
        }
        case 2: {  // int_group_scales: x, group, bits, sym -> scales, offsets (asymmetric)
            const std::vector<float> x = arr<float>();
            const uint64_t group = get<uint64_t>();
            const int bits = get<int32_t>(), sym = get<int32_t>();
            std::vector<float> scales, offsets;
            for (uint64_t a = 0; a < x.size(); a += group) {
                float lo = INFINITY, hi = sym ? 0.0f : -INFINITY;
                for (uint64_t i = a; i < a + group && i < x.size(); i++) {
                    if (sym) hi = fmaxf(hi, fabsf(x[i]));
                    else { lo = fminf(lo, x[i]); hi = fmaxf(hi, x[i]); }
                }
                const Group g = group_params(lo, hi, bits, sym);
                scales.push_back(g.scale);
                offsets.push_back(g.offset);
            }
            put(scales);
            if (!sym) put(offsets);
            break;
        }
        case 3: {  // nf4_dequant_f32: codes, block, levels, absmax, dq codes, dq absmax2, dq offset, dq block, dmap,
                   // start, n, row ids (empty: a span), cols -> n f32
            const std::vector<uint8_t> codes = arr<uint8_t>();
            const uint64_t block = get<uint64_t>();
            const std::vector<float> levels = arr<float>(), absmax = arr<float>();
            const std::vector<uint8_t> dq_codes = arr<uint8_t>();
            const std::vector<float> dq_absmax2 = arr<float>();
            const float dq_offset = get<float>();
            const uint64_t dq_block = get<uint64_t>();
            const std::vector<float> dmap = arr<float>();
            const uint64_t start = get<uint64_t>(), n = get<uint64_t>();
            const std::vector<uint32_t> ids = arr<uint32_t>();
            const uint64_t cols = get<uint64_t>();
            const Nf4Scales s = {opt(absmax), opt(dq_codes), opt(dq_absmax2), dq_offset, dq_block, opt(dmap)};
            std::vector<float> out(n);
            for (uint64_t j = 0; j < n; j++)
                out[j] = nf4_value(codes.data(), source_element(j, start, opt(ids), cols), block, levels.data(), s);
            put(out);
            break;
        }
        case 4: {  // qdir_axpy_f32's direction: QDir, sr_stream, start, n, row ids (empty: a span), cols -> n f32
            QDir d;
            d.seed = get<uint64_t>();
            d.tensor = get<uint32_t>();
            d.stream = get<uint32_t>();
            d.scale = get<float>();
            d.qmax = get<float>();
            const int64_t sr = get<int64_t>();
            const uint64_t start = get<uint64_t>(), n = get<uint64_t>();
            const std::vector<uint32_t> ids = arr<uint32_t>();
            const uint64_t cols = get<uint64_t>();
            std::vector<float> out(n);
            for (uint64_t j = 0; j < n; j++) out[j] = qdir_at(d, source_element(j, start, opt(ids), cols), sr);
            put(out);
            break;
        }
        case 5: {  // zo_update_int: Int, start, n, dirs (raw ZoDir bytes), u2 stream, lr, decay, SR key -> codes
            Int t = Int::read();
            const uint64_t start = get<uint64_t>(), n = get<uint64_t>();
            const std::vector<uint8_t> raw = arr<uint8_t>();
            std::vector<ZoDir> dirs(raw.size() / sizeof(ZoDir));
            std::memcpy(dirs.data(), raw.data(), dirs.size() * sizeof(ZoDir));
            const int64_t u2 = get<int64_t>();
            const double lr = get<double>(), decay = get<double>();
            const SrKey key = read_key();
            const IntView v = t.view();
            for (uint64_t b = 0; b < byte_count(start, n, t.bits); b++)
                zo_update_at(v, b, start, n, dirs.data(), (uint32_t)dirs.size(), u2, lr, decay, key);
            put(t.codes);
            break;
        }
        case 6: {  // lion_dense then lion_outliers: dense codes, row scales, cols, CSR, m and g blocks, gs, b1, lr,
                   // wd, SR key -> codes, values
            std::vector<uint8_t> codes = arr<uint8_t>();
            const std::vector<float> row_scales = arr<float>();
            const uint64_t cols = get<uint64_t>();
            const std::vector<uint32_t> row_ptr = arr<uint32_t>(), col_idx = arr<uint32_t>();
            std::vector<float> values = arr<float>();
            const std::vector<uint8_t> m_codes = arr<uint8_t>();
            const std::vector<float> m_scales = arr<float>();
            const std::vector<uint8_t> g_codes = arr<uint8_t>();
            const std::vector<float> g_scales = arr<float>();
            const float gs = get<float>(), b1 = get<float>(), lr = get<float>(), wd = get<float>();
            const SrKey key = read_key();
            const Block8 m = {m_codes.data(), m_scales.data()}, g = {g_codes.data(), g_scales.data()};
            const LionArgs a = {gs, b1, lr, wd};
            for (uint64_t i = 0; i < codes.size(); i++) lion_dense_at(codes.data(), row_scales.data(), cols, i, m, g, a, key);
            for (uint64_t r = 0; r + 1 < row_ptr.size(); r++)
                lion_outliers_row(values.data(), codes.data(), row_ptr.data(), col_idx.data(), r, cols, m, g, a);
            put(codes);
            put(values);
            break;
        }
        case 7: {  // blocks_requant: codes, scales, mode, x, g codes, g scales, gs, b2, SR key -> codes, scales
            std::vector<uint8_t> codes = arr<uint8_t>();
            std::vector<float> scales = arr<float>();
            const int mode = get<int32_t>();
            const std::vector<float> x = arr<float>();
            const std::vector<uint8_t> g_codes = arr<uint8_t>();
            const std::vector<float> g_scales = arr<float>();
            const float gs = get<float>(), b2 = get<float>();
            const SrKey key = read_key();
            const uint64_t n = codes.size();
            std::vector<float> v(BLOCK8);
            for (uint64_t blk = 0; blk * BLOCK8 < n; blk++) {
                float amax = 0.0f;
                for (uint64_t t = 0; t < BLOCK8; t++) {
                    const uint64_t i = blk * BLOCK8 + t;
                    v[t] = i < n ? requant_value(mode, block8_value(codes.data(), scales.data(), i), i, opt(x),
                                                 opt(g_codes), opt(g_scales), gs, b2)
                                 : 0.0f;
                    amax = fmaxf(amax, fabsf(v[t]));
                }
                const Group g = scale_for(-amax, amax, 8, 1);
                scales[blk] = g.scale;
                for (uint64_t t = 0; t < BLOCK8 && blk * BLOCK8 + t < n; t++) {
                    const uint64_t i = blk * BLOCK8 + t;
                    codes[i] = (uint8_t)code_of(encode_index(v[t], 0.0f, g, 8, 1, key, i), 8, 1);
                }
            }
            put(codes);
            put(scales);
            break;
        }
        case 8: {  // csr_scatter_rows: out, CSR (row_ptr, col_idx, values), r0, row ids (empty: a span), cols -> out
            std::vector<float> out = arr<float>();
            const std::vector<uint32_t> row_ptr = arr<uint32_t>(), col_idx = arr<uint32_t>();
            const std::vector<float> values = arr<float>();
            const uint64_t r0 = get<uint64_t>();
            const std::vector<uint32_t> ids = arr<uint32_t>();
            const uint64_t cols = get<uint64_t>(), rows = out.size() / cols;
            for (uint64_t r = 0; r < rows; r++)
                csr_scatter_row(out.data(), row_ptr.data(), col_idx.data(), values.data(), source_row(r, r0, opt(ids)),
                                r, cols);
            put(out);
            break;
        }
        default:
            std::fprintf(stderr, "quant_dump: unknown op %u\n", op);
            return 2;
        }
        std::fflush(stdout);
    }
    return 0;
}

//! qtune's CUDA kernels' arithmetic checked on a machine without a GPU. The kernels' device functions
//! (`kernels/philox.cuh`, `kernels/quant.cu`) compile as host C++ with g++ (`kernels/host/`: the CUDA intrinsics as
//! plain IEEE operations, no contraction into fused multiply-adds), thread by thread as each kernel's grid runs
//! them, and must give the CPU's results bit for bit:
//! - the Philox streams: uniforms and Gaussians at offsets that cross a block, the 2³² boundary of the block
//!   counter, and every lane;
//! - INT8/INT4 grids (symmetric and not; per tensor, row and block; odd row lengths, so 4-bit spans start
//!   mid-byte): group scales, fresh and frozen-grid encodings with round-to-nearest and stochastic rounding, values;
//! - NF4 values, with and without double quantization;
//! - QuZO's quantized directions and its fused update of INT8 and INT4 weights;
//! - QFT's Lion step on hybrid weights and its INT8 blocks (gradient push and accumulation, momentum), across the
//!   2¹⁶-element pieces whose seeds differ.
//!
//! Skipped, saying so, where g++ is missing; on a GPU `tests/gpu.rs` checks the kernels themselves. What this
//! cannot check: the launches (grid sizes, argument order) and the reductions' shared-memory code.
use qtune::methods::qft::{lion_momentum, lion_weight, Int8Blocks, PIECE};
use qtune::methods::quzo::{zo_update, QDirection};
use qtune::quant::nf4::{dynamic_map, Nf4Scales, DQ_BLOCK, NF4_LEVELS};
use qtune::quant::rng::{fill_gaussian, gaussian, uniform, RngKey, STREAM_SR_PERTURB, STREAM_SR_WEIGHT};
use qtune::quant::{Bits, Granularity, HybridTensor, IntTensor, Nf4Tensor, QuantSpec, QuantWeight, Rounding};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Builds `kernels/host/<name>.cpp` with g++ into a temporary directory, once per test binary (the tests run in
/// parallel); None (the test then skips) without g++.
fn host_binary(name: &str) -> Option<PathBuf> {
    static BUILT: Mutex<Vec<(String, Option<PathBuf>)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, exe)) = built.iter().find(|(n, _)| n == name) {
        return exe.clone();
    }
    let dir = std::env::temp_dir().join(format!("qtune-kernels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join(name);
    let status = Command::new("g++")
        .args(["-O2", "-ffp-contract=off", "-std=c++17", &format!("kernels/host/{name}.cpp"), "-o"])
        .arg(&exe)
        .status();
    let exe = match status {
        Err(e) => {
            eprintln!("skipped: no g++ ({e})");
            None
        }
        Ok(s) => {
            assert!(s.success(), "g++ failed on kernels/host/{name}.cpp");
            Some(exe)
        }
    };
    built.push((name.to_string(), exe.clone()));
    exe
}

/// Runs `exe` on `input` (its stdin) and returns its stdout.
fn run(exe: &PathBuf, input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(exe).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{} failed: {:?}", exe.display(), out.status);
    out.stdout
}

#[test]
fn rng_kernel_draws_the_cpu_streams_bit_for_bit() {
    let Some(exe) = host_binary("rng_dump") else { return };
    let cases: [(u64, u32, u32, u64, u64); 4] = [
        (0xdead_beef_1234, 11, 4, 0, 100_003),
        (1, 0, 0, 3, 4097),
        (u64::MAX, u32::MAX, 7, (1u64 << 34) - 5, 1000),
        (42, 3, 1, 1 << 40, 1000),
    ];
    let mut input = Vec::new();
    for (seed, tensor, stream, start, n) in cases {
        writeln!(input, "{seed} {tensor} {stream} {start} {n}").unwrap();
    }
    let text = String::from_utf8(run(&exe, &input)).unwrap();
    let mut lines = text.lines();
    let mut checked = 0usize;
    for (seed, tensor, stream, start, n) in cases {
        let key = RngKey::new(seed, tensor, stream);
        for i in start..start + n {
            let line = lines.next().expect("one line per element");
            let mut f = line.split(' ').map(|h| f32::from_bits(u32::from_str_radix(h, 16).unwrap()));
            let (u, g) = (f.next().unwrap(), f.next().unwrap());
            assert_eq!(u.to_bits(), uniform(&key, i).to_bits(), "uniform {i} of key {key:?}");
            assert_eq!(g.to_bits(), gaussian(&key, i).to_bits(), "gaussian {i} of key {key:?}: {g} vs the CPU's");
            checked += 1;
        }
    }
    eprintln!("{checked} elements equal bit for bit");
}

/// A request to `kernels/host/quant_dump.cpp`: little-endian scalars, and arrays as a u64 count then the elements.
#[derive(Default)]
struct Req(Vec<u8>);

impl Req {
    fn op(op: u32) -> Self {
        let mut r = Req::default();
        r.0.extend(op.to_le_bytes());
        r
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn i64(mut self, v: i64) -> Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn f32(mut self, v: f32) -> Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn f64(mut self, v: f64) -> Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn bytes(mut self, v: &[u8]) -> Self {
        self = self.u64(v.len() as u64);
        self.0.extend(v);
        self
    }
    fn f32s(mut self, v: &[f32]) -> Self {
        self = self.u64(v.len() as u64);
        v.iter().for_each(|x| self.0.extend(x.to_le_bytes()));
        self
    }
    fn u32s(mut self, v: &[u32]) -> Self {
        self = self.u64(v.len() as u64);
        v.iter().for_each(|x| self.0.extend(x.to_le_bytes()));
        self
    }
    /// An integer tensor as quant_dump's `Int` reads it, with `codes` in place of its own.
    fn int(self, t: &IntTensor, codes: &[u8]) -> Self {
        let spec = t.spec();
        self.i32(spec.bits.count() as i32)
            .i32(spec.symmetric as i32)
            .u64(t.group_len() as u64)
            .bytes(codes)
            .f32s(t.scales())
            .f32s(t.offsets().unwrap_or(&[]))
    }
    /// A stochastic-rounding key (`piece` 0: none), or round-to-nearest.
    fn key(self, key: Option<RngKey>, piece: u64) -> Self {
        let k = key.unwrap_or(RngKey::new(0, 0, 0));
        self.i32(key.is_some() as i32).u64(k.seed).u32(k.tensor).u32(k.stream).u64(piece)
    }
}

/// Reads the reply's arrays back.
struct Reply<'a>(&'a [u8]);

impl Reply<'_> {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        self.bytes(4 * n).chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }
}

fn bits_of(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Gaussian data with a few heavy entries, so groups differ in scale.
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut x = vec![0.0; n];
    fill_gaussian(&RngKey::new(seed, 0, 0), 0, &mut x);
    for i in (0..n).step_by(97) {
        x[i] *= 7.0;
    }
    x
}

#[test]
fn int_grids_match_the_cpu_bit_for_bit() {
    let Some(exe) = host_binary("quant_dump") else { return };
    let specs = [
        (Bits::B8, true, Granularity::PerRow, 9, 40),
        (Bits::B8, false, Granularity::PerBlock(64), 7, 33),
        (Bits::B4, true, Granularity::PerBlock(64), 7, 33),
        (Bits::B4, false, Granularity::PerRow, 5, 31),
        (Bits::B4, true, Granularity::PerRow, 6, 48),
        (Bits::B8, true, Granularity::PerTensor, 3, 50),
    ];
    for (s, &(bits, symmetric, granularity, rows, cols)) in specs.iter().enumerate() {
        let spec = QuantSpec { bits, symmetric, granularity };
        let x = data(rows * cols, s as u64);
        let what = format!("{spec:?} {rows}x{cols}");
        for rounding in [None, Some(RngKey::new(77 + s as u64, 3, STREAM_SR_WEIGHT))] {
            let r = rounding.map_or(Rounding::Nearest, Rounding::Stochastic);
            let t = IntTensor::quantize(&x, rows, cols, spec, r).unwrap();
            // Group scales (and offsets).
            let reply = run(
                &exe,
                &Req::op(2).f32s(&x).u64(t.group_len() as u64).i32(bits.count() as i32).i32(symmetric as i32).0,
            );
            let mut rd = Reply(&reply);
            assert_eq!(bits_of(&rd.f32s(t.scales().len())), bits_of(t.scales()), "{what}: scales");
            if let Some(o) = t.offsets() {
                assert_eq!(bits_of(&rd.f32s(o.len())), bits_of(o), "{what}: offsets");
            }
            // A fresh encoding of the whole tensor, from codes that are not zero (but for the padding nibble of an
            // odd 4-bit count, which no kernel writes: the GPU's code buffers start zeroed, like the CPU's).
            let mut junk = vec![0x5Au8; t.codes().len()];
            if bits == Bits::B4 && (rows * cols) % 2 == 1 {
                *junk.last_mut().unwrap() &= 0xF0;
            }
            let req = Req::op(1).int(&t, &junk).u64(0).f32s(&x).i32(0).key(rounding, 0);
            assert_eq!(run(&exe, &req.0), t.codes(), "{what}: fresh codes, {r:?}");
            // Values, from an odd element on.
            let (start, n) = (3, rows * cols - 5);
            let mut want = vec![0.0; n];
            t.dequantize_span(start, &mut want).unwrap();
            let reply = run(&exe, &Req::op(0).int(&t, t.codes()).u64(start as u64).u64(n as u64).0);
            assert_eq!(bits_of(&Reply(&reply).f32s(n)), bits_of(&want), "{what}: values");
            // Rows 1..rows-1 moved by a small update, re-encoded on the frozen grid.
            let (r0, r1) = (1, rows - 1);
            let mut w = vec![0.0; (r1 - r0) * cols];
            t.dequantize_rows(r0..r1, &mut w).unwrap();
            let upd = data(w.len(), 100 + s as u64);
            w.iter_mut().zip(&upd).for_each(|(w, u)| *w += 0.2 * u);
            let key = Some(RngKey::new(5, 9, STREAM_SR_WEIGHT));
            let mut moved = t.clone();
            moved.requantize_rows_frozen(r0..r1, &w, Rounding::Stochastic(key.unwrap())).unwrap();
            let req = Req::op(1).int(&t, t.codes()).u64((r0 * cols) as u64).f32s(&w).i32(1).key(key, 0);
            assert_eq!(run(&exe, &req.0), moved.codes(), "{what}: frozen-grid codes of rows {r0}..{r1}");
            assert_ne!(moved.codes(), t.codes(), "{what}: the update moved no code");
        }
    }
}

#[test]
fn nf4_values_match_the_cpu_bit_for_bit() {
    let Some(exe) = host_binary("quant_dump") else { return };
    let (rows, cols) = (40, 250); // 10000 elements: 157 blocks of 64, the last partial; 1 double-quant block
    let x = data(rows * cols, 3);
    for dq in [false, true] {
        let t = Nf4Tensor::quantize(&x, rows, cols, 64, dq).unwrap();
        let mut req = Req::op(3).bytes(t.codes()).u64(t.block_len() as u64).f32s(&NF4_LEVELS);
        req = match t.scales() {
            Nf4Scales::Plain(a) => req.f32s(a).bytes(&[]).f32s(&[]).f32(0.0).u64(DQ_BLOCK as u64).f32s(&[]),
            Nf4Scales::Double(d) => {
                req.f32s(&[]).bytes(&d.codes).f32s(&d.absmax2).f32(d.offset).u64(DQ_BLOCK as u64).f32s(&dynamic_map())
            }
        };
        let (start, n) = (1, rows * cols - 1);
        let reply = run(&exe, &req.u64(start as u64).u64(n as u64).0);
        let mut want = vec![0.0; n];
        t.dequantize_span(start, &mut want).unwrap();
        assert_eq!(bits_of(&Reply(&reply).f32s(n)), bits_of(&want), "double quantization {dq}");
    }
}

/// One direction as the GPU reads it (`ZoDir` in kernels/quant.cu: 32 bytes).
fn zo_dir(d: &QDirection, mu: f64) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(d.gauss.seed.to_le_bytes());
    b.extend(d.gauss.tensor.to_le_bytes());
    b.extend(d.gauss.stream.to_le_bytes());
    b.extend(d.scale.to_le_bytes());
    b.extend(d.qmax.to_le_bytes());
    b.extend(mu.to_le_bytes());
    b
}

#[test]
fn quzo_directions_and_update_match_the_cpu_bit_for_bit() {
    let Some(exe) = host_binary("quant_dump") else { return };
    let (rows, cols) = (12, 37);
    let n = rows * cols;
    // Directions: stochastic rounding on the perturbation's stream, and to nearest.
    let d = QDirection::new(0xabc, 5, n, 4);
    for sr in [Some(STREAM_SR_PERTURB), None] {
        let mut want = vec![0.0; n - 2];
        d.fill(2, &mut want, sr);
        let req = Req::op(4).u64(d.gauss.seed).u32(d.gauss.tensor).u32(d.gauss.stream).f32(d.scale).f32(d.qmax);
        let reply = run(&exe, &req.i64(sr.map_or(-1, i64::from)).u64(2).u64(want.len() as u64).0);
        assert_eq!(bits_of(&Reply(&reply).f32s(want.len())), bits_of(&want), "direction, SR stream {sr:?}");
    }
    // The update of rows 2..11 of an INT8 and an INT4 weight over two directions, tensor index 5.
    let t_index = 5;
    let est: Vec<(u64, Vec<QDirection>, f64)> = [(11u64, 0.8f64), (12, -1.7)]
        .iter()
        .map(|&(seed, mu)| {
            let dirs = (0..=t_index).map(|t| QDirection::new(seed, t as u32, n, 4)).collect();
            (seed, dirs, mu)
        })
        .collect();
    let raw: Vec<u8> = est.iter().flat_map(|(_, dirs, mu)| zo_dir(&dirs[t_index], *mu)).collect();
    for bits in [Bits::B8, Bits::B4] {
        for u2 in [Some(STREAM_SR_PERTURB), None] {
            let spec = QuantSpec::symmetric(bits, Granularity::PerRow);
            let t = IntTensor::quantize(&data(n, 8), rows, cols, spec, Rounding::Nearest).unwrap();
            let key = RngKey::new(99, t_index as u32, STREAM_SR_WEIGHT);
            let (r0, r1) = (2, 11);
            let (lr, decay) = (0.05, 0.01);
            let mut w = vec![0.0; (r1 - r0) * cols];
            t.dequantize_rows(r0..r1, &mut w).unwrap();
            zo_update(&est, t_index, u2, lr, decay, (r0 * cols) as u64, &mut w);
            let mut want = t.clone();
            want.requantize_rows_frozen(r0..r1, &w, Rounding::Stochastic(key)).unwrap();
            let req = Req::op(5).int(&t, t.codes()).u64((r0 * cols) as u64).u64(w.len() as u64).bytes(&raw);
            let req = req.i64(u2.map_or(-1, i64::from)).f64(lr).f64(decay).key(Some(key), 0);
            assert_eq!(run(&exe, &req.0), want.codes(), "{bits:?}, u2 stream {u2:?}");
            assert_ne!(want.codes(), t.codes(), "{bits:?}: the update moved no code");
        }
    }
}

#[test]
fn qft_lion_and_int8_blocks_match_the_cpu_bit_for_bit() {
    let Some(exe) = host_binary("quant_dump") else { return };
    // More than two pieces, so the piece-folded seeds are exercised; the last block partial.
    let (rows, cols) = (517, 257);
    let n = rows * cols;
    assert!(n > 2 * PIECE && n % 256 != 0);
    let (gs, b1, b2, lr, wd) = (0.7f32, 0.9f32, 0.99f32, 3e-3f32, 0.1f32);
    let gkey = RngKey::new(1, 2, 5);
    let g = Int8Blocks::quantize(&data(n, 21), gkey).unwrap();
    let (g_codes, g_scales) = g.parts();

    // The gradient push (set), its accumulation (add) and Lion's momentum: blocks_requant's three modes.
    let x = data(n, 22);
    let mkey = RngKey::new(3, 4, 6);
    let mut want = Int8Blocks::quantize(&data(n, 23), mkey).unwrap();
    let (c0, s0) = want.parts();
    for mode in 0..3 {
        let key = RngKey::new(40 + mode as u64, 4, 6);
        let before = want.parts();
        let mut gbuf = vec![0.0; n];
        g.dequantize_span(0, &mut gbuf).unwrap();
        want.rewrite(key, |start, v| {
            for (j, v) in v.iter_mut().enumerate() {
                *v = match mode {
                    0 => x[start + j],
                    1 => *v + x[start + j],
                    _ => lion_momentum(*v, gbuf[start + j], gs, b2),
                };
            }
            Ok(())
        })
        .unwrap();
        let req = Req::op(7).bytes(&before.0).f32s(&before.1).i32(mode).f32s(if mode < 2 { &x } else { &[] });
        let req = req.bytes(&g_codes).f32s(&g_scales).f32(gs).f32(b2).key(Some(key), PIECE as u64);
        let reply = run(&exe, &req.0);
        let mut rd = Reply(&reply);
        let (codes, scales) = want.parts();
        assert_eq!(rd.bytes(n), codes, "blocks_requant mode {mode}: codes");
        assert_eq!(bits_of(&rd.f32s(scales.len())), bits_of(&scales), "blocks_requant mode {mode}: scales");
    }
    assert_ne!(want.parts().0, c0);
    assert_ne!(want.parts().1, s0);

    // Lion's step on a hybrid weight (5% outliers): dense codes and outlier values.
    let m = want;
    let (m_codes, m_scales) = m.parts();
    let w = HybridTensor::quantize(&data(n, 24), rows, cols, 0.05, Rounding::Nearest).unwrap();
    let key = RngKey::new(8, 1, STREAM_SR_WEIGHT);
    let (mut mbuf, mut gbuf) = (vec![0.0; n], vec![0.0; n]);
    m.dequantize_span(0, &mut mbuf).unwrap();
    g.dequantize_span(0, &mut gbuf).unwrap();
    let mut stepped = w.clone();
    stepped.update_rows(Rounding::Stochastic(key), |r, row| {
        for (j, v) in row.iter_mut().enumerate() {
            let i = r * cols + j;
            *v = lion_weight(*v, mbuf[i], gbuf[i], gs, b1, lr, wd);
        }
    });
    let (row_ptr, col_idx, values) = w.sparse();
    let req = Req::op(6).bytes(w.dense().codes()).f32s(w.dense().scales()).u64(cols as u64).u32s(row_ptr).u32s(col_idx);
    let req = req.f32s(values).bytes(&m_codes).f32s(&m_scales).bytes(&g_codes).f32s(&g_scales);
    let reply = run(&exe, &req.f32(gs).f32(b1).f32(lr).f32(wd).key(Some(key), 0).0);
    let mut rd = Reply(&reply);
    assert_eq!(rd.bytes(n), stepped.dense().codes(), "lion: dense codes");
    assert_eq!(bits_of(&rd.f32s(values.len())), bits_of(stepped.sparse().2), "lion: outliers");
    assert_ne!(stepped.dense().codes(), w.dense().codes());
}

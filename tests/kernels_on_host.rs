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
//!   2¹⁶-element pieces whose seeds differ;
//! - row gathers (embedding lookups) of INT8/INT4, NF4 and hybrid weights, against the CPU's rows one by one.
//!
//! Skipped, saying so, where g++ is missing; on a GPU `tests/gpu.rs` checks the kernels themselves. What this
//! cannot check: the launches (grid sizes, argument order) and the reductions' shared-memory code.
use qtune::methods::qft::PIECE;
use qtune::methods::quzo::QDirection;
use qtune::quant::nf4::{dynamic_map, Nf4Scales, DQ_BLOCK, NF4_LEVELS};
use qtune::quant::rng::{gaussian, uniform, RngKey};
use qtune::quant::{Bits, IntTensor, QuantWeight};
use quant_cases::*;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

mod quant_cases;

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
#[derive(Clone, Default)]
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

#[test]
fn int_grids_match_the_cpu_bit_for_bit() {
    let Some(exe) = host_binary("quant_dump") else { return };
    for c in int_cases() {
        let (t, what) = (&c.t, &c.what);
        let spec = t.spec();
        let (rows, cols) = (t.rows(), t.cols());
        // Group scales (and offsets).
        let req = Req::op(2).f32s(&c.x).u64(t.group_len() as u64).i32(spec.bits.count() as i32);
        let reply = run(&exe, &req.i32(spec.symmetric as i32).0);
        let mut rd = Reply(&reply);
        assert_eq!(bits_of(&rd.f32s(t.scales().len())), bits_of(t.scales()), "{what}: scales");
        if let Some(o) = t.offsets() {
            assert_eq!(bits_of(&rd.f32s(o.len())), bits_of(o), "{what}: offsets");
        }
        // A fresh encoding of the whole tensor, from codes that are not zero (but for the padding nibble of an odd
        // 4-bit count, which no kernel writes: the GPU's code buffers start zeroed, like the CPU's).
        let mut junk = vec![0x5Au8; t.codes().len()];
        if spec.bits == Bits::B4 && (rows * cols) % 2 == 1 {
            *junk.last_mut().unwrap() &= 0xF0;
        }
        let req = Req::op(1).int(t, &junk).u64(0).f32s(&c.x).i32(0).key(c.key, 0);
        assert_eq!(run(&exe, &req.0), t.codes(), "{what}: fresh codes");
        // Values, from an odd element on.
        let (start, n) = (3, rows * cols - 5);
        let mut want = vec![0.0; n];
        t.dequantize_span(start, &mut want).unwrap();
        let reply =
            run(&exe, &Req::op(0).int(t, t.codes()).u64(start as u64).u64(n as u64).u32s(&[]).u64(cols as u64).0);
        assert_eq!(bits_of(&Reply(&reply).f32s(n)), bits_of(&want), "{what}: values");
        // Rows moved by an update, re-encoded on the frozen grid.
        let start = (c.moved_rows.start * cols) as u64;
        let req = Req::op(1).int(t, t.codes()).u64(start).f32s(&c.moved_values).i32(1).key(Some(c.moved_key), 0);
        assert_eq!(run(&exe, &req.0), c.moved.codes(), "{what}: frozen-grid codes of rows {:?}", c.moved_rows);
    }
}

#[test]
fn nf4_values_match_the_cpu_bit_for_bit() {
    let Some(exe) = host_binary("quant_dump") else { return };
    for t in nf4_cases() {
        let mut req = Req::op(3).bytes(t.codes()).u64(t.block_len() as u64).f32s(&NF4_LEVELS);
        req = match t.scales() {
            Nf4Scales::Plain(a) => req.f32s(a).bytes(&[]).f32s(&[]).f32(0.0).u64(DQ_BLOCK as u64).f32s(&[]),
            Nf4Scales::Double(d) => {
                req.f32s(&[]).bytes(&d.codes).f32s(&d.absmax2).f32(d.offset).u64(DQ_BLOCK as u64).f32s(&dynamic_map())
            }
        };
        let (start, n) = (1, t.rows() * t.cols() - 1);
        let reply = run(&exe, &req.u64(start as u64).u64(n as u64).u32s(&[]).u64(t.cols() as u64).0);
        let mut want = vec![0.0; n];
        t.dequantize_span(start, &mut want).unwrap();
        let dq = matches!(t.scales(), Nf4Scales::Double(_));
        assert_eq!(bits_of(&Reply(&reply).f32s(n)), bits_of(&want), "double quantization {dq}");
    }
}

/// One direction as the kernels read it (`ZoDir` in kernels/quant.cu: 32 bytes).
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
    for (d, sr, start, want) in direction_cases() {
        let req = Req::op(4).u64(d.gauss.seed).u32(d.gauss.tensor).u32(d.gauss.stream).f32(d.scale).f32(d.qmax);
        let req = req.i64(sr.map_or(-1, i64::from));
        let reply = run(&exe, &req.clone().u64(start).u64(want.len() as u64).u32s(&[]).u64(1).0);
        assert_eq!(bits_of(&Reply(&reply).f32s(want.len())), bits_of(&want), "direction, SR stream {sr:?}");
        // Gathered as an embedding's rows (the tensor read as rows of 37; element e is want[e - start]).
        let (cols, ids) = (37, [11u32, 1, 3, 1]);
        let gathered: Vec<f32> =
            (0..ids.len() * cols).map(|j| want[ids[j / cols] as usize * cols + j % cols - start as usize]).collect();
        let reply = run(&exe, &req.u64(0).u64(gathered.len() as u64).u32s(&ids).u64(cols as u64).0);
        assert_eq!(bits_of(&Reply(&reply).f32s(gathered.len())), bits_of(&gathered), "gathered direction, SR {sr:?}");
    }
    for c in zo_cases() {
        let raw: Vec<u8> = c.dirs.iter().flat_map(|(d, mu)| zo_dir(d, *mu)).collect();
        let n = c.rows.len() * c.t.cols();
        let req = Req::op(5).int(&c.t, c.t.codes()).u64((c.rows.start * c.t.cols()) as u64).u64(n as u64).bytes(&raw);
        let req = req.i64(c.u2.map_or(-1, i64::from)).f64(c.lr).f64(c.decay).key(Some(c.key), 0);
        assert_eq!(run(&exe, &req.0), c.want.codes(), "{}", c.what);
    }
}

#[test]
fn qft_lion_and_int8_blocks_match_the_cpu_bit_for_bit() {
    let Some(exe) = host_binary("quant_dump") else { return };
    let g = lion_gradient();
    let (g_codes, g_scales) = g.parts();
    let cases = blocks_cases(&g);
    for c in &cases {
        let (codes, scales) = c.before.parts();
        let mode = c.mode as i32;
        let x: &[f32] = if c.mode == BlocksMode::Momentum { &[] } else { &c.x };
        let req = Req::op(7).bytes(&codes).f32s(&scales).i32(mode).f32s(x).bytes(&g_codes).f32s(&g_scales);
        let reply = run(&exe, &req.f32(GS).f32(B2).key(Some(c.key), PIECE as u64).0);
        let mut rd = Reply(&reply);
        let (codes, scales) = c.want.parts();
        assert_eq!(rd.bytes(codes.len()), codes, "{:?}: codes", c.mode);
        assert_eq!(bits_of(&rd.f32s(scales.len())), bits_of(&scales), "{:?}: scales", c.mode);
    }
    let m = &cases.last().unwrap().want;
    let (m_codes, m_scales) = m.parts();
    let (w, key, stepped) = lion_case(m, &g);
    let (row_ptr, col_idx, values) = w.sparse();
    let req = Req::op(6).bytes(w.dense().codes()).f32s(w.dense().scales()).u64(w.dense().cols() as u64);
    let req = req.u32s(row_ptr).u32s(col_idx).f32s(values).bytes(&m_codes).f32s(&m_scales).bytes(&g_codes);
    let reply = run(&exe, &req.f32s(&g_scales).f32(GS).f32(B1).f32(LR).f32(WD).key(Some(key), 0).0);
    let mut rd = Reply(&reply);
    assert_eq!(rd.bytes(w.dense().codes().len()), stepped.dense().codes(), "lion: dense codes");
    assert_eq!(bits_of(&rd.f32s(values.len())), bits_of(stepped.sparse().2), "lion: outliers");
}

/// Rows `ids` of `w` on the CPU, one `dequantize_rows` each: what a gather must give.
fn cpu_rows(w: &dyn QuantWeight, ids: &[u32]) -> Vec<f32> {
    let cols = w.cols();
    let mut out = vec![0.0; ids.len() * cols];
    for (row, &id) in out.chunks_exact_mut(cols).zip(ids) {
        w.dequantize_rows(id as usize..id as usize + 1, row).unwrap();
    }
    out
}

#[test]
fn row_gathers_match_the_cpu_bit_for_bit() {
    let Some(exe) = host_binary("quant_dump") else { return };
    // Repeated, out of order, the last row: what a batch of token ids looks like.
    let ids_of = |rows: usize| [rows as u32 - 1, 0, 2, 0, 1];
    for c in int_cases() {
        let (t, ids) = (&c.t, ids_of(c.t.rows()));
        let n = ids.len() * t.cols();
        let req = Req::op(0).int(t, t.codes()).u64(0).u64(n as u64).u32s(&ids).u64(t.cols() as u64);
        assert_eq!(bits_of(&Reply(&run(&exe, &req.0)).f32s(n)), bits_of(&cpu_rows(t, &ids)), "{}: gather", c.what);
    }
    for t in nf4_cases() {
        let ids = ids_of(t.rows());
        let n = ids.len() * t.cols();
        let mut req = Req::op(3).bytes(t.codes()).u64(t.block_len() as u64).f32s(&NF4_LEVELS);
        req = match t.scales() {
            Nf4Scales::Plain(a) => req.f32s(a).bytes(&[]).f32s(&[]).f32(0.0).u64(DQ_BLOCK as u64).f32s(&[]),
            Nf4Scales::Double(d) => {
                req.f32s(&[]).bytes(&d.codes).f32s(&d.absmax2).f32(d.offset).u64(DQ_BLOCK as u64).f32s(&dynamic_map())
            }
        };
        let reply = run(&exe, &req.u64(0).u64(n as u64).u32s(&ids).u64(t.cols() as u64).0);
        assert_eq!(bits_of(&Reply(&reply).f32s(n)), bits_of(&cpu_rows(&t, &ids)), "nf4 gather");
    }
    // A hybrid weight: its dense rows gathered, then its outliers scattered over them (and, as a span, rows 1..4).
    let g = lion_gradient();
    let (w, _, _) = lion_case(&g, &g);
    let (dense, (row_ptr, col_idx, values), cols) = (w.dense(), w.sparse(), w.cols());
    let ids = ids_of(w.rows()).to_vec();
    // (first row of a span, ids sent (none: the span), the rows read)
    for (r0, sent, rows) in [(0, ids.clone(), ids), (1, vec![], vec![1, 2, 3])] {
        let n = rows.len() * cols;
        let req = Req::op(0).int(dense, dense.codes()).u64((r0 * cols) as u64).u64(n as u64);
        let base = Reply(&run(&exe, &req.u32s(&sent).u64(cols as u64).0)).f32s(n);
        assert_eq!(bits_of(&base), bits_of(&cpu_rows(dense, &rows)), "hybrid dense rows {rows:?}");
        let req = Req::op(8).f32s(&base).u32s(row_ptr).u32s(col_idx).f32s(values).u64(r0 as u64).u32s(&sent);
        let reply = run(&exe, &req.u64(cols as u64).0);
        assert_eq!(bits_of(&Reply(&reply).f32s(n)), bits_of(&cpu_rows(&w, &rows)), "hybrid rows {rows:?}");
    }
}

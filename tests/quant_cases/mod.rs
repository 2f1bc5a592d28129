//! The quantized kernels' test cases, each with the CPU's answer (qtune-quant's formats and the methods' own update
//! code): shared by `tests/kernels_on_host.rs` (the kernels' arithmetic as host C++) and `tests/gpu.rs` (the kernels
//! on a GPU), which must both reproduce every answer bit for bit.
#![allow(dead_code)]
use qtune::methods::qft::{lion_momentum, lion_weight, Int8Blocks, PIECE};
use qtune::methods::quzo::{zo_update, QDirection};
use qtune::quant::rng::{fill_gaussian, RngKey, STREAM_SR_PERTURB, STREAM_SR_WEIGHT};
use qtune::quant::{Bits, Granularity, HybridTensor, IntTensor, Nf4Tensor, QuantSpec, QuantWeight, Rounding};
use std::ops::Range;

/// Gaussian data with a few heavy entries, so groups differ in scale.
pub fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut x = vec![0.0; n];
    fill_gaussian(&RngKey::new(seed, 0, 0), 0, &mut x);
    for i in (0..n).step_by(97) {
        x[i] *= 7.0;
    }
    x
}

pub fn bits_of(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// An integer tensor quantized from `x` (to nearest, or by stochastic rounding on `key`), and rows `moved_rows`
/// moved by an update and re-encoded on the frozen grid.
pub struct IntCase {
    pub what: String,
    pub x: Vec<f32>,
    pub key: Option<RngKey>,
    pub t: IntTensor,
    pub moved_rows: Range<usize>,
    pub moved_values: Vec<f32>,
    pub moved_key: RngKey,
    pub moved: IntTensor,
}

/// Every format the kernels serve: INT8 and INT4, symmetric or not, per tensor, row and block; odd row lengths, so
/// 4-bit spans start and end mid-byte.
pub fn int_cases() -> Vec<IntCase> {
    let specs = [
        (Bits::B8, true, Granularity::PerRow, 9, 40),
        (Bits::B8, false, Granularity::PerBlock(64), 7, 33),
        (Bits::B4, true, Granularity::PerBlock(64), 7, 33),
        (Bits::B4, false, Granularity::PerRow, 5, 31),
        (Bits::B4, true, Granularity::PerRow, 6, 48),
        (Bits::B8, true, Granularity::PerTensor, 3, 50),
    ];
    let mut cases = Vec::new();
    for (s, &(bits, symmetric, granularity, rows, cols)) in specs.iter().enumerate() {
        let spec = QuantSpec { bits, symmetric, granularity };
        let x = data(rows * cols, s as u64);
        for key in [None, Some(RngKey::new(77 + s as u64, 3, STREAM_SR_WEIGHT))] {
            let t =
                IntTensor::quantize(&x, rows, cols, spec, key.map_or(Rounding::Nearest, Rounding::Stochastic)).unwrap();
            let moved_rows = 1..rows - 1;
            let mut w = vec![0.0; moved_rows.len() * cols];
            t.dequantize_rows(moved_rows.clone(), &mut w).unwrap();
            let upd = data(w.len(), 100 + s as u64);
            w.iter_mut().zip(&upd).for_each(|(w, u)| *w += 0.2 * u);
            let moved_key = RngKey::new(5, 9, STREAM_SR_WEIGHT);
            let mut moved = t.clone();
            moved.requantize_rows_frozen(moved_rows.clone(), &w, Rounding::Stochastic(moved_key)).unwrap();
            assert_ne!(moved.codes(), t.codes(), "{spec:?}: the update moved no code");
            let what = format!("{spec:?} {rows}x{cols}, {key:?}");
            cases.push(IntCase { what, x: x.clone(), key, t, moved_rows, moved_values: w, moved_key, moved });
        }
    }
    cases
}

/// NF4 with and without double quantization: 10000 elements, 157 blocks of 64 (the last partial).
pub fn nf4_cases() -> Vec<Nf4Tensor> {
    let x = data(40 * 250, 3);
    [false, true].iter().map(|&dq| Nf4Tensor::quantize(&x, 40, 250, 64, dq).unwrap()).collect()
}

/// QuZO's direction of a 444-element tensor, and its elements 2.. rounded on the perturbation's stream or to
/// nearest.
pub fn direction_cases() -> Vec<(QDirection, Option<u32>, u64, Vec<f32>)> {
    let d = QDirection::new(0xabc, 5, 444, 4);
    [Some(STREAM_SR_PERTURB), None]
        .iter()
        .map(|&sr| {
            let mut want = vec![0.0; 442];
            d.fill(2, &mut want, sr);
            (d, sr, 2, want)
        })
        .collect()
}

/// QuZO's update of rows 2..11 of a 12×37 INT8 or INT4 weight (tensor index 5) over two directions.
pub struct ZoCase {
    pub what: String,
    pub t: IntTensor,
    pub rows: Range<usize>,
    /// This tensor's direction in each of the step's directions, with its projected gradient μ.
    pub dirs: Vec<(QDirection, f64)>,
    pub u2: Option<u32>,
    pub lr: f64,
    pub decay: f64,
    pub key: RngKey,
    pub want: IntTensor,
}

pub fn zo_cases() -> Vec<ZoCase> {
    let (rows, cols, t_index) = (12, 37, 5);
    let n = rows * cols;
    let est: Vec<(u64, Vec<QDirection>, f64)> = [(11u64, 0.8f64), (12, -1.7)]
        .iter()
        .map(|&(seed, mu)| (seed, (0..=t_index).map(|t| QDirection::new(seed, t as u32, n, 4)).collect(), mu))
        .collect();
    let mut cases = Vec::new();
    for bits in [Bits::B8, Bits::B4] {
        for u2 in [Some(STREAM_SR_PERTURB), None] {
            let spec = QuantSpec::symmetric(bits, Granularity::PerRow);
            let t = IntTensor::quantize(&data(n, 8), rows, cols, spec, Rounding::Nearest).unwrap();
            let key = RngKey::new(99, t_index as u32, STREAM_SR_WEIGHT);
            let (r, lr, decay) = (2..11, 0.05, 0.01);
            let mut w = vec![0.0; r.len() * cols];
            t.dequantize_rows(r.clone(), &mut w).unwrap();
            zo_update(&est, t_index, u2, lr, decay, (r.start * cols) as u64, &mut w);
            let mut want = t.clone();
            want.requantize_rows_frozen(r.clone(), &w, Rounding::Stochastic(key)).unwrap();
            assert_ne!(want.codes(), t.codes(), "{bits:?}: the update moved no code");
            let dirs = est.iter().map(|(_, d, mu)| (d[t_index], *mu)).collect();
            let what = format!("{bits:?}, u2 stream {u2:?}");
            cases.push(ZoCase { what, t, rows: r, dirs, u2, lr, decay, key, want });
        }
    }
    cases
}

/// Lion's hyperparameters in the cases below.
pub const GS: f32 = 0.7;
pub const B1: f32 = 0.9;
pub const B2: f32 = 0.99;
pub const LR: f32 = 3e-3;
pub const WD: f32 = 0.1;

/// A 517×257 matrix: more than two 2¹⁶-element pieces (their seeds differ), the last 256-block partial.
pub const LION_SHAPE: (usize, usize) = (517, 257);

/// The INT8 gradient of the Lion cases.
pub fn lion_gradient() -> Int8Blocks {
    let n = LION_SHAPE.0 * LION_SHAPE.1;
    assert!(n > 2 * PIECE && !n.is_multiple_of(256));
    Int8Blocks::quantize(&data(n, 21), RngKey::new(1, 2, 5)).unwrap()
}

/// What an INT8-block re-quantization writes: a gradient pushed, a gradient added, Lion's momentum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlocksMode {
    Set,
    Add,
    Momentum,
}

/// An INT8-block rewrite in `mode` from `before`, with the CPU's result `want`.
pub struct BlocksCase {
    pub mode: BlocksMode,
    pub before: Int8Blocks,
    pub x: Vec<f32>,
    pub key: RngKey,
    pub want: Int8Blocks,
    /// Σ new² of the values before they were quantized (what the rewrite returns).
    pub want_sumsq: f64,
}

/// The three modes in turn, each starting from the last one's result.
pub fn blocks_cases(g: &Int8Blocks) -> Vec<BlocksCase> {
    let n = g.len();
    let x = data(n, 22);
    let mut gbuf = vec![0.0; n];
    g.dequantize_span(0, &mut gbuf).unwrap();
    let mut cur = Int8Blocks::quantize(&data(n, 23), RngKey::new(3, 4, 6)).unwrap();
    let mut cases = Vec::new();
    for (k, mode) in [BlocksMode::Set, BlocksMode::Add, BlocksMode::Momentum].into_iter().enumerate() {
        let key = RngKey::new(40 + k as u64, 4, 6);
        let before = cur.clone();
        let want_sumsq = cur
            .rewrite(key, |start, v| {
                for (j, v) in v.iter_mut().enumerate() {
                    *v = match mode {
                        BlocksMode::Set => x[start + j],
                        BlocksMode::Add => *v + x[start + j],
                        BlocksMode::Momentum => lion_momentum(*v, gbuf[start + j], GS, B2),
                    };
                }
                Ok(())
            })
            .unwrap();
        assert_ne!(cur.parts(), before.parts(), "{mode:?} changed nothing");
        cases.push(BlocksCase { mode, before, x: x.clone(), key, want: cur.clone(), want_sumsq });
    }
    cases
}

/// QFT's Lion step on a hybrid weight (5% outliers) with momentum `m` and gradient `g`: the weight before and after.
pub fn lion_case(m: &Int8Blocks, g: &Int8Blocks) -> (HybridTensor, RngKey, HybridTensor) {
    let (rows, cols) = LION_SHAPE;
    let n = rows * cols;
    let w = HybridTensor::quantize(&data(n, 24), rows, cols, 0.05, Rounding::Nearest).unwrap();
    let key = RngKey::new(8, 1, STREAM_SR_WEIGHT);
    let (mut mbuf, mut gbuf) = (vec![0.0; n], vec![0.0; n]);
    m.dequantize_span(0, &mut mbuf).unwrap();
    g.dequantize_span(0, &mut gbuf).unwrap();
    let mut stepped = w.clone();
    stepped.update_rows(Rounding::Stochastic(key), |r, row| {
        for (j, v) in row.iter_mut().enumerate() {
            let i = r * cols + j;
            *v = lion_weight(*v, mbuf[i], gbuf[i], GS, B1, LR, WD);
        }
    });
    assert_ne!(stepped.dense().codes(), w.dense().codes());
    (w, key, stepped)
}

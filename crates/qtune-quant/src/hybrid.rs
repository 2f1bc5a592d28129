//! QFT's dense-and-sparse ("hybrid feature") weight quantizer: W = D + S. S holds the top p (default 1%) of the
//! matrix's entries by magnitude, exactly, in f32 and compressed sparse rows; D is the rest, INT8 symmetric with
//! one scale per output row, its scale computed with the outliers removed (that is the point: one outlier no
//! longer stretches the grid of its whole row).
//!
//! The split (threshold, which positions are sparse) and the row scales are frozen between calls to
//! [`HybridTensor::recalibrate`]: QFT re-splits once per epoch, and in between the optimizer moves values through
//! [`HybridTensor::update_rows`], which re-encodes dense values against the frozen row scale (with stochastic
//! rounding, keyed by element index, so Lion's tiny steps survive in expectation) and stores sparse values exactly.
//!
//! Outlier count: exactly ⌊p·n⌋ entries, ties at the threshold magnitude broken in row-major order.

use rayon::prelude::*;

use crate::error::{check_len, check_shape, QuantError, Result};
use crate::round::Rounding;
use crate::uniform::{Bits, Encode, Encoder, Granularity, IntTensor, QuantSpec};
use crate::weight::{check_dequant_span, QuantBytes, QuantWeight};

/// The QFT paper's outlier fraction.
pub const DEFAULT_OUTLIER_FRACTION: f64 = 0.01;

const DENSE_SPEC: QuantSpec = QuantSpec::symmetric(Bits::B8, Granularity::PerRow);

/// A rows×cols weight as INT8 per-row dense codes plus f32 outliers in CSR.
#[derive(Clone, Debug, PartialEq)]
pub struct HybridTensor {
    dense: IntTensor,
    fraction: f64,
    /// Smallest |w| kept sparse at the last calibration (+∞ when there are no outliers).
    threshold: f32,
    row_ptr: Vec<u32>,
    col_idx: Vec<u32>,
    values: Vec<f32>,
}

/// Where calibration reads rows from: the caller's f32 matrix or the tensor's own current values.
enum Source<'a> {
    Data(&'a [f32]),
    Own(&'a HybridTensor),
}

impl Source<'_> {
    fn row<'s>(&'s self, r: usize, cols: usize, scratch: &'s mut [f32]) -> &'s [f32] {
        match self {
            Source::Data(d) => &d[r * cols..(r + 1) * cols],
            Source::Own(t) => {
                t.dequantize_row(r, scratch);
                scratch
            }
        }
    }
}

/// Result of splitting a matrix: dense codes and row scales, the CSR outliers, the threshold.
struct Split {
    codes: Vec<u8>,
    scales: Vec<f32>,
    row_ptr: Vec<u32>,
    col_idx: Vec<u32>,
    values: Vec<f32>,
    threshold: f32,
}

impl HybridTensor {
    /// Splits and quantizes a row-major rows×cols matrix, keeping the top `fraction` of entries by |w| in f32.
    pub fn quantize(data: &[f32], rows: usize, cols: usize, fraction: f64, rounding: Rounding) -> Result<Self> {
        check_len("hybrid input", check_shape(rows, cols)?, data.len())?;
        if !(0.0..1.0).contains(&fraction) {
            return Err(QuantError::InvalidFraction(fraction));
        }
        if rows == 0 || cols == 0 {
            return Err(QuantError::InvalidShape {
                rows,
                cols,
                reason: "a hybrid weight needs at least one row and column",
            });
        }
        if cols > u32::MAX as usize || data.len() as f64 * fraction > u32::MAX as f64 {
            return Err(QuantError::InvalidShape { rows, cols, reason: "column and outlier indices must fit in u32" });
        }
        let s = split(&Source::Data(data), rows, cols, fraction, &rounding);
        Self::from_split(s, rows, cols, fraction)
    }

    /// Rebuilds a tensor from its stored parts (a checkpoint): the dense INT8 per-row part and the CSR outliers,
    /// checked for consistency (row pointers monotone and ending at the value count, columns in range).
    pub fn from_raw(
        dense: IntTensor,
        fraction: f64,
        threshold: f32,
        row_ptr: Vec<u32>,
        col_idx: Vec<u32>,
        values: Vec<f32>,
    ) -> Result<Self> {
        let (rows, cols) = (dense.rows(), dense.cols());
        if dense.spec() != DENSE_SPEC {
            return Err(QuantError::InvalidShape {
                rows,
                cols,
                reason: "the dense part must be INT8 symmetric per row",
            });
        }
        if !(0.0..1.0).contains(&fraction) {
            return Err(QuantError::InvalidFraction(fraction));
        }
        check_len("row_ptr", rows + 1, row_ptr.len())?;
        check_len("col_idx", values.len(), col_idx.len())?;
        let monotone = row_ptr.windows(2).all(|w| w[0] <= w[1]);
        if row_ptr[0] != 0
            || !monotone
            || row_ptr[rows] as usize != values.len()
            || col_idx.iter().any(|&c| c as usize >= cols)
        {
            return Err(QuantError::InvalidShape { rows, cols, reason: "inconsistent CSR outliers" });
        }
        Ok(HybridTensor { dense, fraction, threshold, row_ptr, col_idx, values })
    }

    /// Exact storage of a rows×cols matrix with `fraction` of its entries as outliers, computed from the shape alone
    /// (the memory planner's count; equal to `storage_bytes` of the quantized matrix: exactly ⌊fraction·n⌋ outliers).
    pub fn planned_bytes(rows: usize, cols: usize, fraction: f64) -> QuantBytes {
        let k = (fraction * (rows * cols) as f64).floor() as usize;
        QuantBytes { codes: rows * cols, scales: 4 * rows, sparse_values: 4 * k, sparse_indices: 4 * (rows + 1 + k) }
    }

    fn from_split(s: Split, rows: usize, cols: usize, fraction: f64) -> Result<Self> {
        Ok(HybridTensor {
            dense: IntTensor::from_parts(rows, cols, DENSE_SPEC, s.codes, s.scales)?,
            fraction,
            threshold: s.threshold,
            row_ptr: s.row_ptr,
            col_idx: s.col_idx,
            values: s.values,
        })
    }

    /// Re-splits the tensor from its own current values: new threshold, new outlier positions, new row scales.
    /// Dense values are re-encoded on the new grid with `rounding`; sparse values stay exact.
    pub fn recalibrate(&mut self, rounding: Rounding) -> Result<()> {
        let (rows, cols) = (self.dense.rows(), self.dense.cols());
        let s = split(&Source::Own(self), rows, cols, self.fraction, &rounding);
        *self = Self::from_split(s, rows, cols, self.fraction)?;
        Ok(())
    }

    /// Applies an in-place update to every row: `f(row, values)` receives the row's current f32 values (dense
    /// dequantized, sparse exact) and changes them; dense positions are then re-encoded against the frozen row
    /// scale with `rounding` (stochastic rounding uses the element's row-major index), clamped to ±127 steps,
    /// and sparse positions store the new values exactly. Rows run in parallel with one row of scratch each.
    pub fn update_rows<F>(&mut self, rounding: Rounding, f: F)
    where
        F: Fn(usize, &mut [f32]) + Sync,
    {
        let cols = self.dense.cols();
        let mut value_rows = Vec::with_capacity(self.dense.rows());
        let mut rest = &mut self.values[..];
        for w in self.row_ptr.windows(2) {
            let (row, tail) = rest.split_at_mut((w[1] - w[0]) as usize);
            value_rows.push(row);
            rest = tail;
        }
        let (row_ptr, col_idx) = (&self.row_ptr, &self.col_idx);
        let (groups, codes) = self.dense.split();
        codes.par_chunks_mut(cols).zip(value_rows).enumerate().for_each_init(
            || (vec![0.0f32; cols], Encoder::new(groups.format, &rounding, Encode::Delta)),
            |(x, enc), (r, (codes, values))| {
                let first = r * cols;
                groups.dequant_span(codes, first, first, x);
                let cols_r = &col_idx[row_ptr[r] as usize..row_ptr[r + 1] as usize];
                for (&c, &v) in cols_r.iter().zip(values.iter()) {
                    x[c as usize] = v;
                }
                f(r, x);
                // Sparse positions take the new value exactly and read as 0 in the dense part, whose code
                // there is 0 and stays 0 (a zero delta).
                for (&c, v) in cols_r.iter().zip(values.iter_mut()) {
                    *v = x[c as usize];
                    x[c as usize] = 0.0;
                }
                enc.run(codes, first, first, x, groups.params(r).0, 0.0);
            },
        );
    }

    /// The dense INT8 part (0 at outlier positions).
    pub fn dense(&self) -> &IntTensor {
        &self.dense
    }

    /// The outliers in CSR form: (row pointers, column indices, values).
    pub fn sparse(&self) -> (&[u32], &[u32], &[f32]) {
        (&self.row_ptr, &self.col_idx, &self.values)
    }

    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    pub fn fraction(&self) -> f64 {
        self.fraction
    }

    /// Smallest |w| kept sparse at the last calibration (+∞ without outliers).
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Row `r`'s values (dense dequantized, sparse exact) into `out` (length cols).
    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let cols = self.dense.cols();
        self.dense.groups().dequant_span(&self.dense.codes, 0, r * cols, out);
        let (a, b) = (self.row_ptr[r] as usize, self.row_ptr[r + 1] as usize);
        for (&c, &v) in self.col_idx[a..b].iter().zip(&self.values[a..b]) {
            out[c as usize] = v;
        }
    }
}

/// Bit pattern of |v|: for non-negative floats, integer order is magnitude order.
#[inline]
fn abs_bits(v: f32) -> u32 {
    v.to_bits() & 0x7FFF_FFFF
}

/// Histogram (65536 bins) of `key(bits)` over every element whose bits pass `keep`, rows in parallel.
fn histogram(
    src: &Source,
    rows: usize,
    cols: usize,
    keep: impl Fn(u32) -> bool + Sync,
    key: fn(u32) -> usize,
) -> Vec<u64> {
    (0..rows)
        .into_par_iter()
        .fold(
            || (vec![0u64; 1 << 16], vec![0.0f32; cols]),
            |(mut h, mut scratch), r| {
                for &v in src.row(r, cols, &mut scratch) {
                    let b = abs_bits(v);
                    if keep(b) {
                        h[key(b)] += 1;
                    }
                }
                (h, scratch)
            },
        )
        .map(|(h, _)| h)
        .reduce(
            || vec![0u64; 1 << 16],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

/// From the top bin down, the bin where the count reaches `k`, and how many elements lie in higher bins.
fn kth_bin(hist: &[u64], k: u64) -> (usize, u64) {
    let mut above = 0;
    for bin in (0..hist.len()).rev() {
        if above + hist[bin] >= k {
            return (bin, above);
        }
        above += hist[bin];
    }
    (0, above)
}

/// Bits of the k-th largest |w| (k ≥ 1) by a two-pass radix select on the top and bottom 16 bits: no copy of
/// the matrix, two passes over its rows.
fn kth_largest_abs_bits(src: &Source, rows: usize, cols: usize, k: u64) -> u32 {
    let hi_hist = histogram(src, rows, cols, |_| true, |b| (b >> 16) as usize);
    let (hi, above) = kth_bin(&hi_hist, k);
    let lo_hist = histogram(src, rows, cols, |b| (b >> 16) as usize == hi, |b| (b & 0xFFFF) as usize);
    let (lo, _) = kth_bin(&lo_hist, k - above);
    ((hi as u32) << 16) | lo as u32
}

fn split(src: &Source, rows: usize, cols: usize, fraction: f64, rounding: &Rounding) -> Split {
    let n = rows * cols;
    let k = (fraction * n as f64).floor() as u64;
    // No outliers: a threshold above every finite magnitude's bits.
    let t_bits = if k == 0 { u32::MAX } else { kth_largest_abs_bits(src, rows, cols, k) };

    // How many entries each row has above and at the threshold; ties go to the earliest rows.
    let counts: Vec<(u64, u64)> = (0..rows)
        .into_par_iter()
        .map_init(
            || vec![0.0f32; cols],
            |scratch, r| {
                src.row(r, cols, scratch).iter().fold((0, 0), |(gt, eq), &v| {
                    let b = abs_bits(v);
                    (gt + (b > t_bits) as u64, eq + (b == t_bits) as u64)
                })
            },
        )
        .collect();
    let mut ties_left = k.saturating_sub(counts.iter().map(|c| c.0).sum());
    let ties: Vec<u64> = counts
        .iter()
        .map(|&(_, eq)| {
            let t = eq.min(ties_left);
            ties_left -= t;
            t
        })
        .collect();

    let dense = DENSE_SPEC.format();
    let mut codes = vec![0u8; n];
    let rows_out: Vec<(f32, Vec<(u32, f32)>)> = codes
        .par_chunks_mut(cols)
        .enumerate()
        .map_init(
            || (vec![0.0f32; cols], vec![0.0f32; cols], Encoder::new(dense, rounding, Encode::Fresh)),
            |(scratch, masked, enc), (r, codes)| {
                let row = src.row(r, cols, scratch);
                let mut ties = ties[r];
                let mut outliers = Vec::new();
                for (c, (&v, m)) in row.iter().zip(masked.iter_mut()).enumerate() {
                    let b = abs_bits(v);
                    let take = b > t_bits || (b == t_bits && ties > 0);
                    if take {
                        ties -= (b == t_bits) as u64;
                        outliers.push((c as u32, v));
                    }
                    *m = if take { 0.0 } else { v };
                }
                let absmax = crate::simd::absmax(masked);
                let (scale, _) = dense.scale_for(-absmax, absmax);
                let first = r * cols;
                enc.run(codes, first, first, masked, scale, 0.0);
                (scale, outliers)
            },
        )
        .collect();

    let mut row_ptr = Vec::with_capacity(rows + 1);
    let nnz: usize = rows_out.iter().map(|r| r.1.len()).sum();
    let (mut col_idx, mut values) = (Vec::with_capacity(nnz), Vec::with_capacity(nnz));
    row_ptr.push(0u32);
    let mut scales = Vec::with_capacity(rows);
    for (scale, outliers) in rows_out {
        scales.push(scale);
        col_idx.extend(outliers.iter().map(|o| o.0));
        values.extend(outliers.iter().map(|o| o.1));
        row_ptr.push(values.len() as u32);
    }
    let threshold = if k == 0 { f32::INFINITY } else { f32::from_bits(t_bits) };
    Split { codes, scales, row_ptr, col_idx, values, threshold }
}

impl QuantWeight for HybridTensor {
    fn rows(&self) -> usize {
        self.dense.rows()
    }

    fn cols(&self) -> usize {
        self.dense.cols()
    }

    fn dequantize_span(&self, start: usize, out: &mut [f32]) -> Result<()> {
        check_dequant_span(self, start, out.len())?;
        self.dense.dequantize_span(start, out)?;
        let (cols, end) = (self.cols(), start + out.len());
        // Overwrite the outliers inside the span (their dense value is exactly 0).
        for r in start / cols..end.div_ceil(cols) {
            let (a, b) = (self.row_ptr[r] as usize, self.row_ptr[r + 1] as usize);
            let row_cols = &self.col_idx[a..b];
            let lo = start.saturating_sub(r * cols) as u32;
            let hi = (end - r * cols).min(cols) as u32;
            let from = row_cols.partition_point(|&c| c < lo);
            let to = row_cols.partition_point(|&c| c < hi);
            for (&c, &v) in row_cols[from..to].iter().zip(&self.values[a + from..a + to]) {
                out[r * cols + c as usize - start] = v;
            }
        }
        Ok(())
    }

    fn as_int(&self) -> Option<&dyn crate::int8::IntWeight> {
        Some(self)
    }

    fn storage_bytes(&self) -> QuantBytes {
        QuantBytes {
            sparse_values: 4 * self.values.len(),
            sparse_indices: 4 * (self.row_ptr.len() + self.col_idx.len()),
            ..self.dense.storage_bytes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{fill_gaussian, RngKey, STREAM_SR_WEIGHT};

    /// Gaussian weights with planted heavy outliers (a few per row, like LLM channels).
    fn weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut w = vec![0.0; rows * cols];
        fill_gaussian(&RngKey::new(seed, 0, 0), 0, &mut w);
        for (i, v) in w.iter_mut().enumerate() {
            *v *= 0.02;
            if i % 97 == 5 {
                *v = 1.5 + (i % 7) as f32;
            }
        }
        w
    }

    #[test]
    fn outliers_are_restored_exactly_and_counted() {
        let (rows, cols) = (33, 70);
        let w = weights(rows, cols, 1);
        let h = HybridTensor::quantize(&w, rows, cols, DEFAULT_OUTLIER_FRACTION, Rounding::Nearest).unwrap();
        let k = (0.01 * (rows * cols) as f64).floor() as usize; // ⌊p·n⌋ = 23
        assert_eq!(h.nnz(), k);
        let mut y = vec![0.0; w.len()];
        h.dequantize_into(&mut y).unwrap();
        // The kept entries are the k largest |w|, restored bit for bit.
        let mut mags: Vec<f32> = w.iter().map(|v| v.abs()).collect();
        mags.sort_by(|a, b| b.partial_cmp(a).unwrap());
        let (rp, ci, vals) = h.sparse();
        for r in 0..rows {
            for j in rp[r] as usize..rp[r + 1] as usize {
                let i = r * cols + ci[j] as usize;
                assert_eq!(vals[j].to_bits(), w[i].to_bits());
                assert_eq!(y[i].to_bits(), w[i].to_bits());
                assert!(w[i].abs() >= mags[k - 1]);
            }
        }
        assert_eq!(h.threshold(), mags[k - 1]);
        // The dense scale of each row ignores its outliers: absmax of the rest / 127.
        for r in 0..rows {
            let outl: Vec<u32> = ci[rp[r] as usize..rp[r + 1] as usize].to_vec();
            let rest = (0..cols).filter(|c| !outl.contains(&(*c as u32))).map(|c| w[r * cols + c].abs());
            let am = rest.fold(0.0f32, f32::max);
            assert_eq!(h.dense().scales()[r], am / 127.0, "row {r}");
        }
    }

    #[test]
    fn ties_at_the_threshold_go_in_row_major_order() {
        let w = vec![1.0f32; 20]; // all equal: k = ⌊0.25·20⌋ = 5 outliers, the first five
        let h = HybridTensor::quantize(&w, 4, 5, 0.25, Rounding::Nearest).unwrap();
        assert_eq!(h.sparse().0, &[0, 5, 5, 5, 5]);
        assert_eq!(h.sparse().1, &[0, 1, 2, 3, 4]);
    }

    /// Dense-and-sparse beats plain INT8 per row on outlier-heavy weights, and 0% is plain INT8 per row.
    #[test]
    fn outliers_shrink_the_reconstruction_error() {
        let (rows, cols) = (40, 128);
        let w = weights(rows, cols, 2);
        let err = |p| {
            let h = HybridTensor::quantize(&w, rows, cols, p, Rounding::Nearest).unwrap();
            let mut y = vec![0.0; w.len()];
            h.dequantize_into(&mut y).unwrap();
            w.iter().zip(&y).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt()
        };
        let plain = IntTensor::quantize(&w, rows, cols, DENSE_SPEC, Rounding::Nearest).unwrap();
        let h0 = HybridTensor::quantize(&w, rows, cols, 0.0, Rounding::Nearest).unwrap();
        assert_eq!(h0.dense(), &plain);
        assert_eq!(h0.nnz(), 0);
        assert!(err(0.01) < err(0.0) / 10.0, "{} vs {}", err(0.01), err(0.0));
    }

    #[test]
    fn update_rows_keeps_roles_and_updates_sparse_exactly() {
        let (rows, cols) = (16, 50);
        let w = weights(rows, cols, 3);
        let mut h = HybridTensor::quantize(&w, rows, cols, 0.02, Rounding::Nearest).unwrap();
        let before = h.clone();
        // Identity update: nothing moves, even under stochastic rounding.
        h.update_rows(Rounding::Stochastic(RngKey::new(1, 0, STREAM_SR_WEIGHT)), |_, _| {});
        assert_eq!(h, before);
        // Add 0.5 to everything: sparse values move exactly, the split and scales stay.
        h.update_rows(Rounding::Nearest, |_, x| x.iter_mut().for_each(|v| *v += 0.5));
        let (rp, ci, vals) = h.sparse();
        assert_eq!((rp, ci), (before.sparse().0, before.sparse().1));
        for (a, b) in vals.iter().zip(before.sparse().2) {
            assert_eq!(*a, b + 0.5);
        }
        assert_eq!(h.dense().scales(), before.dense().scales());
        assert_eq!(h.threshold(), before.threshold());
        // Recalibration re-splits from the new values.
        h.recalibrate(Rounding::Nearest).unwrap();
        assert_eq!(h.nnz(), before.nnz());
    }

    /// Lion-sized steps (0.05 of a grid step) on the dense part: with stochastic rounding the mean code moves by
    /// 0.05 per step (n = 800 elements, σ ≈ sqrt(0.05·0.95)/sqrt(800) ≈ 7.7e-3, tolerance 5σ).
    #[test]
    fn tiny_updates_survive_stochastic_rounding() {
        const STEP: f32 = 0.05;
        let (rows, cols) = (16, 50);
        let w = weights(rows, cols, 4);
        let mut h = HybridTensor::quantize(&w, rows, cols, 0.01, Rounding::Nearest).unwrap();
        let before = h.clone();
        let scales = before.dense().scales().to_vec();
        let key = RngKey::new(9, 0, STREAM_SR_WEIGHT);
        h.update_rows(Rounding::Stochastic(key), |r, x| x.iter_mut().for_each(|v| *v += STEP * scales[r]));
        let (a, b) = (&h.dense().codes, &before.dense().codes);
        let moved: f64 = a.iter().zip(b.iter()).map(|(&a, &b)| (a as i8 as f64) - (b as i8 as f64)).sum();
        let n = (rows * cols - h.nnz()) as f64;
        let tol = 5.0 * ((STEP * (1.0 - STEP)) as f64).sqrt() / n.sqrt();
        assert!((moved / n - STEP as f64).abs() < tol, "mean move {}", moved / n);
    }

    #[test]
    fn spans_and_errors() {
        let (rows, cols) = (7, 13);
        let w = weights(rows, cols, 5);
        let h = HybridTensor::quantize(&w, rows, cols, 0.05, Rounding::Nearest).unwrap();
        let mut all = vec![0.0; w.len()];
        h.dequantize_into(&mut all).unwrap();
        for (s, l) in [(0, 91), (5, 20), (12, 1), (40, 30), (90, 1)] {
            let mut part = vec![0.0; l];
            h.dequantize_span(s, &mut part).unwrap();
            assert_eq!(&part[..], &all[s..s + l], "span {s}+{l}");
        }
        let b = h.storage_bytes();
        assert_eq!(b.codes, 91);
        assert_eq!(b.scales, 7 * 4);
        assert_eq!(b.sparse_values, 4 * h.nnz());
        assert_eq!(b.sparse_indices, 4 * (8 + h.nnz()));
        assert_eq!(HybridTensor::planned_bytes(rows, cols, 0.05), b);
        assert!(matches!(
            HybridTensor::quantize(&w, 7, 13, 1.0, Rounding::Nearest),
            Err(QuantError::InvalidFraction(_))
        ));
        assert!(HybridTensor::quantize(&w, 7, 12, 0.01, Rounding::Nearest).is_err());
        assert!(HybridTensor::quantize(&[], 0, 5, 0.01, Rounding::Nearest).is_err());
    }
}

//! Uniform integer quantizers: 8- and 4-bit, symmetric (absmax) or asymmetric (min/max), with one scale per
//! tensor, per row (output channel) or per block of B consecutive row-major elements.
//!
//! A value is stored as an integer grid index q and read back as `q·scale + offset` (one fused multiply-add):
//! - symmetric: `scale = absmax / qmax`, offset 0, q ∈ [−qmax, qmax] with qmax = 127 (8-bit) or 7 (4-bit). The
//!   grid is symmetric around 0, so negation and stochastic rounding of signed data stay unbiased;
//! - asymmetric: `scale = (max − min) / (2^bits − 1)`, offset = min, q ∈ [0, 2^bits − 1]. Using the group minimum
//!   as the offset (rather than a rounded integer zero point) keeps every in-range value within half a step.
//!
//! Codes: 8-bit symmetric q is stored as an i8 (two's complement byte), 8-bit asymmetric as a u8; 4-bit codes
//! are nibbles `q + 8` (symmetric, so 1..=15) or `q` (asymmetric), packed two per byte over the flat row-major
//! order with the even element in the high nibble (bitsandbytes' order); an odd element count leaves a zero low
//! nibble in the last byte. A block may span rows when B does not divide the row length.
//!
//! Re-encoding against frozen scales ([`IntTensor::requantize_frozen`]) rounds the *difference* between the new
//! value and the current grid point, not the absolute value: a tiny update keeps its full f32 precision as a
//! fraction of a step, and stochastic rounding moves the code by exactly `delta/scale` in expectation.
//!
//! Non-finite inputs are not checked (that would cost a pass): NaN encodes as the lowest grid point and an
//! infinite group range gives a zero inverse scale. The trainer checks finiteness upstream.

use std::ops::Range;

use rayon::prelude::*;

use crate::error::{check_len, check_shape, QuantError, Result};
use crate::round::{Rounding, ROUND_CHUNK};
use crate::simd;
use crate::weight::{check_dequant_span, QuantBytes, QuantWeight};

/// Bit width of the integer codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bits {
    B8,
    B4,
}

impl Bits {
    /// From a bit count given on the command line or in a config.
    pub fn from_count(bits: u32) -> Result<Bits> {
        match bits {
            8 => Ok(Bits::B8),
            4 => Ok(Bits::B4),
            b => Err(QuantError::UnsupportedBits(b)),
        }
    }

    pub fn count(self) -> u32 {
        match self {
            Bits::B8 => 8,
            Bits::B4 => 4,
        }
    }

    /// Bytes taken by `n` codes.
    pub fn code_bytes(self, n: usize) -> usize {
        match self {
            Bits::B8 => n,
            Bits::B4 => n.div_ceil(2),
        }
    }
}

/// Which elements share a scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Granularity {
    PerTensor,
    /// One scale per row (per output channel of a `[out, in]` weight).
    PerRow,
    /// One scale per block of this many consecutive row-major elements.
    PerBlock(usize),
}

/// Everything that defines a uniform quantizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    pub bits: Bits,
    pub symmetric: bool,
    pub granularity: Granularity,
}

impl QuantSpec {
    pub const fn symmetric(bits: Bits, granularity: Granularity) -> Self {
        Self { bits, symmetric: true, granularity }
    }

    pub const fn asymmetric(bits: Bits, granularity: Granularity) -> Self {
        Self { bits, symmetric: false, granularity }
    }

    /// Elements per scale group for a rows×cols tensor (never 0, so `element / group` is always defined).
    pub fn group_len(&self, rows: usize, cols: usize) -> Result<usize> {
        match self.granularity {
            Granularity::PerTensor => Ok((rows * cols).max(1)),
            Granularity::PerRow => Ok(cols.max(1)),
            Granularity::PerBlock(0) => {
                Err(QuantError::InvalidBlockSize { block: 0, reason: "a block must hold at least one element" })
            }
            Granularity::PerBlock(b) => Ok(b),
        }
    }

    /// Exact storage of a rows×cols tensor in this format, computed from the shape alone (the memory planner's
    /// count; equal to [`QuantWeight::storage_bytes`] of the quantized tensor).
    pub fn planned_bytes(&self, rows: usize, cols: usize) -> Result<QuantBytes> {
        let n = rows * cols;
        let groups = n.div_ceil(self.group_len(rows, cols)?);
        let f32s = if self.symmetric { groups } else { 2 * groups };
        Ok(QuantBytes { codes: self.bits.code_bytes(n), scales: 4 * f32s, ..Default::default() })
    }

    pub(crate) fn format(&self) -> Format {
        Format { bits: self.bits, symmetric: self.symmetric }
    }
}

/// Bit width and symmetry: what the kernels need to read and write codes of one scale group.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Format {
    pub bits: Bits,
    pub symmetric: bool,
}

impl Format {
    /// Inclusive range of the grid index q.
    fn q_range(self) -> (f32, f32) {
        match (self.bits, self.symmetric) {
            (Bits::B8, true) => (-127.0, 127.0),
            (Bits::B8, false) => (0.0, 255.0),
            (Bits::B4, true) => (-7.0, 7.0),
            (Bits::B4, false) => (0.0, 15.0),
        }
    }

    /// Value subtracted from a 4-bit nibble to get q.
    fn nibble_zero(self) -> f32 {
        if self.symmetric {
            8.0
        } else {
            0.0
        }
    }

    /// (scale, offset) for a group whose values span [lo, hi] (lo = −hi = −absmax for symmetric).
    pub(crate) fn scale_for(self, lo: f32, hi: f32) -> (f32, f32) {
        let (_, qmax) = self.q_range();
        if self.symmetric {
            (hi / qmax, 0.0)
        } else {
            ((hi - lo) / qmax, lo)
        }
    }

    /// Dequantizes the elements `start ..` (absolute indices) of one group into `out`. `codes` holds the codes
    /// from absolute element `first` on; for 4-bit, `first` is even.
    pub(crate) fn dequant_run(
        self,
        codes: &[u8],
        first: usize,
        start: usize,
        scale: f32,
        offset: f32,
        out: &mut [f32],
    ) {
        let rel = start - first;
        match self.bits {
            Bits::B8 => simd::dequant_b8(&codes[rel..rel + out.len()], self.symmetric, scale, offset, out),
            Bits::B4 => simd::dequant_b4(&codes[rel / 2..], rel % 2 == 1, self.nibble_zero(), scale, offset, out),
        }
    }
}

/// Encodes runs of values (each run inside one scale group) into codes. Holds the stack buffers of the encode
/// pipeline so a task reuses them across its runs (re-zeroing them for every 64-element block was a visible
/// memset in profiles).
pub(crate) struct Encoder<'r> {
    format: Format,
    rounding: &'r Rounding,
    mode: Encode,
    base: [f32; ROUND_CHUNK],
    u: [f32; ROUND_CHUNK],
    q: [f32; ROUND_CHUNK],
    bytes: [u8; ROUND_CHUNK],
}

impl<'r> Encoder<'r> {
    /// `Encode::Fresh` quantizes values; `Encode::Delta` moves the current codes by the rounded distance of each
    /// value from its current grid point.
    pub(crate) fn new(format: Format, rounding: &'r Rounding, mode: Encode) -> Self {
        Encoder {
            format,
            rounding,
            mode,
            base: [0.0; ROUND_CHUNK],
            u: [0.0; ROUND_CHUNK],
            q: [0.0; ROUND_CHUNK],
            bytes: [0; ROUND_CHUNK],
        }
    }

    /// Encodes `data` (absolute elements `start ..`, all in one group with this scale and offset) into `codes`
    /// (the codes from absolute element `first` on; even for 4-bit).
    pub(crate) fn run(&mut self, codes: &mut [u8], first: usize, start: usize, data: &[f32], scale: f32, offset: f32) {
        let f = self.format;
        let inv = if scale == 0.0 { 0.0 } else { 1.0 / scale };
        // A subnormal scale would give an infinite inverse: such a group reads back as `offset` anyway.
        let inv = if inv.is_finite() { inv } else { 0.0 };
        let (lo, hi) = f.q_range();
        let add = if f.bits == Bits::B4 { f.nibble_zero() } else { 0.0 };
        for (c, x) in data.chunks(ROUND_CHUNK).enumerate() {
            let (at, n) = (start + c * ROUND_CHUNK, x.len());
            let base = match self.mode {
                Encode::Fresh => None,
                Encode::Delta => {
                    // The current grid index (scale 1, offset 0 reads it back) is where the update starts from.
                    f.dequant_run(codes, first, at, 1.0, 0.0, &mut self.base[..n]);
                    Some(&self.base[..n])
                }
            };
            let u = self.rounding.uniforms(at as u64, &mut self.u[..n]);
            simd::encode_grid(x, base, scale, offset, inv, u, lo, hi, &mut self.q[..n]);
            simd::grid_to_bytes(&self.q[..n], add, &mut self.bytes[..n]);
            let rel = at - first;
            match f.bits {
                Bits::B8 => codes[rel..rel + n].copy_from_slice(&self.bytes[..n]),
                Bits::B4 => simd::pack_nibbles(&self.bytes[..n], rel % 2 == 1, &mut codes[rel / 2..]),
            }
        }
    }
}

/// How an [`Encoder`] turns values into codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Encode {
    Fresh,
    Delta,
}

/// Elements per rayon task; even, so a 4-bit byte never straddles two tasks.
const PAR_CHUNK: usize = 1 << 15;

/// A rows×cols matrix quantized to integer codes with per-group scales.
#[derive(Clone, Debug, PartialEq)]
pub struct IntTensor {
    rows: usize,
    cols: usize,
    spec: QuantSpec,
    group: usize,
    pub(crate) codes: Vec<u8>,
    pub(crate) scales: Vec<f32>,
    /// Group minima of an asymmetric quantizer (`None` when symmetric).
    pub(crate) offsets: Option<Vec<f32>>,
}

impl IntTensor {
    /// Quantizes a row-major rows×cols matrix.
    pub fn quantize(data: &[f32], rows: usize, cols: usize, spec: QuantSpec, rounding: Rounding) -> Result<Self> {
        check_len("quantize input", check_shape(rows, cols)?, data.len())?;
        let group = spec.group_len(rows, cols)?;
        let mut t = IntTensor {
            rows,
            cols,
            spec,
            group,
            codes: vec![0; spec.bits.code_bytes(data.len())],
            scales: Vec::new(),
            offsets: None,
        };
        t.recalibrate(data, rounding)?;
        Ok(t)
    }

    /// Assembles a tensor from parts that the caller computed consistently (the hybrid quantizer's dense part).
    /// Rebuilds a tensor from its stored parts (a checkpoint), checking that every length matches the shape.
    pub fn from_raw(
        rows: usize,
        cols: usize,
        spec: QuantSpec,
        codes: Vec<u8>,
        scales: Vec<f32>,
        offsets: Option<Vec<f32>>,
    ) -> Result<Self> {
        let n = check_shape(rows, cols)?;
        let group = spec.group_len(rows, cols)?;
        check_len("codes", spec.bits.code_bytes(n), codes.len())?;
        check_len("scales", n.div_ceil(group), scales.len())?;
        if offsets.is_some() == spec.symmetric {
            return Err(QuantError::InvalidShape {
                rows,
                cols,
                reason: "offsets must be present exactly for asymmetric tensors",
            });
        }
        if let Some(o) = &offsets {
            check_len("offsets", scales.len(), o.len())?;
        }
        Ok(IntTensor { rows, cols, spec, group, codes, scales, offsets })
    }

    pub(crate) fn from_parts(
        rows: usize,
        cols: usize,
        spec: QuantSpec,
        codes: Vec<u8>,
        scales: Vec<f32>,
    ) -> Result<Self> {
        let group = spec.group_len(rows, cols)?;
        Ok(IntTensor { rows, cols, spec, group, codes, scales, offsets: None })
    }

    /// Recomputes the scales from `data` and encodes it (the same as a fresh [`IntTensor::quantize`], in place).
    pub fn recalibrate(&mut self, data: &[f32], rounding: Rounding) -> Result<()> {
        check_len("recalibrate input", self.len(), data.len())?;
        let format = self.spec.format();
        let params: Vec<(f32, f32)> = data
            .par_chunks(self.group)
            .map(|g| {
                let (lo, hi) = if format.symmetric {
                    let a = par_reduce(g, simd::absmax, f32::max);
                    (-a, a)
                } else {
                    par_reduce(g, simd::min_max, |a, b| (a.0.min(b.0), a.1.max(b.1)))
                };
                format.scale_for(lo, hi)
            })
            .collect();
        self.scales = params.iter().map(|p| p.0).collect();
        self.offsets = (!format.symmetric).then(|| params.iter().map(|p| p.1).collect());
        self.encode_all(data, rounding, Encode::Fresh);
        Ok(())
    }

    /// Re-encodes new values against the existing (frozen) scales, clamping to the grid. Elements whose value
    /// equals their current dequantized value keep their code; others move by the rounded `delta / scale`. A
    /// group whose scale is 0 (all zeros at calibration) cannot move until [`IntTensor::recalibrate`].
    pub fn requantize_frozen(&mut self, data: &[f32], rounding: Rounding) -> Result<()> {
        check_len("requantize_frozen input", self.len(), data.len())?;
        self.encode_all(data, rounding, Encode::Delta);
        Ok(())
    }

    /// [`IntTensor::requantize_frozen`] for whole rows `rows` only (`data` holds those rows).
    pub fn requantize_rows_frozen(&mut self, rows: Range<usize>, data: &[f32], rounding: Rounding) -> Result<()> {
        if rows.start > rows.end || rows.end > self.rows {
            return Err(QuantError::OutOfBounds { start: rows.start, end: rows.end, len: self.rows });
        }
        check_len("requantize_rows_frozen input", rows.len() * self.cols, data.len())?;
        let start = rows.start * self.cols;
        let (groups, codes) = self.split();
        groups.encode_span(codes, 0, start, data, &rounding, Encode::Delta);
        Ok(())
    }

    pub fn spec(&self) -> QuantSpec {
        self.spec
    }

    /// The raw codes (see the module doc for their layout).
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// One scale per group, in group order.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Group offsets (minima) of an asymmetric quantizer.
    pub fn offsets(&self) -> Option<&[f32]> {
        self.offsets.as_deref()
    }

    /// Elements per scale group.
    pub fn group_len(&self) -> usize {
        self.group
    }

    /// The scale groups, borrowed apart from the codes so both can be used at once.
    pub(crate) fn split(&mut self) -> (Groups<'_>, &mut [u8]) {
        let groups = Groups {
            format: self.spec.format(),
            group: self.group,
            scales: &self.scales,
            offsets: self.offsets.as_deref(),
        };
        (groups, &mut self.codes)
    }

    pub(crate) fn groups(&self) -> Groups<'_> {
        Groups { format: self.spec.format(), group: self.group, scales: &self.scales, offsets: self.offsets.as_deref() }
    }

    /// Encodes the whole tensor in parallel tasks of `PAR_CHUNK` elements.
    fn encode_all(&mut self, data: &[f32], rounding: Rounding, mode: Encode) {
        let bytes_per_chunk = self.spec.bits.code_bytes(PAR_CHUNK);
        let (groups, codes) = self.split();
        codes.par_chunks_mut(bytes_per_chunk).enumerate().for_each(|(c, chunk)| {
            let first = c * PAR_CHUNK;
            let end = (first + PAR_CHUNK).min(data.len());
            groups.encode_span(chunk, first, first, &data[first..end], &rounding, mode)
        });
    }
}

/// Scale groups of a tensor: where each element's (scale, offset) comes from.
#[derive(Clone, Copy)]
pub(crate) struct Groups<'a> {
    pub format: Format,
    pub group: usize,
    pub scales: &'a [f32],
    pub offsets: Option<&'a [f32]>,
}

impl Groups<'_> {
    pub(crate) fn params(&self, g: usize) -> (f32, f32) {
        (self.scales[g], self.offsets.map_or(0.0, |o| o[g]))
    }

    /// Encodes `data` as elements `start ..` into `codes` (the codes from element `first` on), split at group
    /// boundaries.
    pub(crate) fn encode_span(
        &self,
        codes: &mut [u8],
        first: usize,
        start: usize,
        data: &[f32],
        r: &Rounding,
        mode: Encode,
    ) {
        let mut enc = Encoder::new(self.format, r, mode);
        let mut at = start;
        for_each_group_run(start, data.len(), self.group, |g, run| {
            let (scale, offset) = self.params(g);
            enc.run(codes, first, at, &data[at - start..at - start + run], scale, offset);
            at += run;
        });
    }

    /// Dequantizes elements `start .. start + out.len()` from `codes` (the codes from element `first` on).
    pub(crate) fn dequant_span(&self, codes: &[u8], first: usize, start: usize, out: &mut [f32]) {
        let mut at = start;
        for_each_group_run(start, out.len(), self.group, |g, run| {
            let (scale, offset) = self.params(g);
            self.format.dequant_run(codes, first, at, scale, offset, &mut out[at - start..at - start + run]);
            at += run;
        });
    }
}

/// Calls `f(group, count)` for the consecutive runs of `[start, start + len)` that lie in one group each.
pub(crate) fn for_each_group_run(start: usize, len: usize, group: usize, mut f: impl FnMut(usize, usize)) {
    let (mut at, end) = (start, start + len);
    while at < end {
        let g = at / group;
        let run = ((g + 1) * group).min(end) - at;
        f(g, run);
        at += run;
    }
}

/// Reduces a slice with a sequential kernel, in parallel when it is large (one scale per tensor).
fn par_reduce<T: Send + Copy>(x: &[f32], seq: fn(&[f32]) -> T, combine: fn(T, T) -> T) -> T {
    const SEQ_LIMIT: usize = 1 << 18;
    if x.len() <= SEQ_LIMIT {
        seq(x)
    } else {
        x.par_chunks(SEQ_LIMIT).map(seq).reduce_with(combine).expect("non-empty")
    }
}

impl QuantWeight for IntTensor {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn dequantize_span(&self, start: usize, out: &mut [f32]) -> Result<()> {
        check_dequant_span(self, start, out.len())?;
        self.groups().dequant_span(&self.codes, 0, start, out);
        Ok(())
    }

    fn as_int(&self) -> Option<&dyn crate::int8::IntWeight> {
        self.has_int_rows().then_some(self as &dyn crate::int8::IntWeight)
    }

    fn storage_bytes(&self) -> QuantBytes {
        let f32s = self.scales.len() + self.offsets.as_ref().map_or(0, Vec::len);
        QuantBytes { codes: self.codes.len(), scales: 4 * f32s, ..Default::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{fill_gaussian, RngKey};

    /// Round-to-nearest error budget, in grid steps: half a step, plus slack for the f32 arithmetic of
    /// `(x − offset)·inv` and `q·scale + offset` (a few ulp of values up to 255 steps).
    const RTN_BUDGET: f64 = 0.5 + 1e-4;
    /// Stochastic rounding never moves a value by a full step.
    const SR_BUDGET: f64 = 1.0 + 1e-4;

    fn data(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut x = vec![0.0; rows * cols];
        fill_gaussian(&RngKey::new(seed, 0, 0), 0, &mut x);
        // A few heavy entries and an exact zero row make the groups unequal.
        x[3] *= 9.0;
        if rows > 2 {
            x[2 * cols..3 * cols].fill(0.0);
        }
        x
    }

    fn specs() -> Vec<QuantSpec> {
        let mut v = Vec::new();
        for bits in [Bits::B8, Bits::B4] {
            for g in [Granularity::PerTensor, Granularity::PerRow, Granularity::PerBlock(64), Granularity::PerBlock(7)]
            {
                v.push(QuantSpec::symmetric(bits, g));
                v.push(QuantSpec::asymmetric(bits, g));
            }
        }
        v
    }

    /// f64 reference of one element's scale group: (lo, hi) as the quantizer sees them.
    fn group_range(x: &[f32], spec: QuantSpec, rows: usize, cols: usize, i: usize) -> (f64, f64) {
        let g = spec.group_len(rows, cols).unwrap();
        let grp = &x[(i / g) * g..((i / g + 1) * g).min(x.len())];
        let lo = grp.iter().fold(f64::MAX, |a, &v| a.min(v as f64));
        let hi = grp.iter().fold(f64::MIN, |a, &v| a.max(v as f64));
        let a = lo.abs().max(hi.abs());
        if spec.symmetric {
            (-a, a)
        } else {
            (lo, hi)
        }
    }

    fn check_round_trip(spec: QuantSpec, rows: usize, cols: usize, rounding: Rounding, budget: f64) {
        let x = data(rows, cols, 1);
        let t = IntTensor::quantize(&x, rows, cols, spec, rounding).unwrap();
        let mut y = vec![0.0; x.len()];
        t.dequantize_into(&mut y).unwrap();
        let (_, qmax) = spec.format().q_range();
        for i in 0..x.len() {
            let (lo, hi) = group_range(&x, spec, rows, cols, i);
            let step = (hi - lo) / if spec.symmetric { 2.0 * qmax as f64 } else { qmax as f64 };
            let err = (x[i] as f64 - y[i] as f64).abs();
            assert!(err <= budget * step + 1e-30, "{spec:?} {rounding:?} element {i}: error {err} > {budget} × {step}");
        }
    }

    #[test]
    fn round_trip_nearest_within_half_a_step() {
        for spec in specs() {
            check_round_trip(spec, 9, 37, Rounding::Nearest, RTN_BUDGET);
        }
    }

    #[test]
    fn round_trip_stochastic_within_one_step() {
        for spec in specs() {
            check_round_trip(spec, 5, 30, Rounding::Stochastic(RngKey::new(3, 1, 4)), SR_BUDGET);
        }
    }

    #[test]
    fn codes_layout_is_documented_one() {
        let x = [1.0, -1.0, 0.6, 0.0, -0.25];
        let t =
            IntTensor::quantize(&x, 1, 5, QuantSpec::symmetric(Bits::B8, Granularity::PerTensor), Rounding::Nearest)
                .unwrap();
        assert_eq!(t.codes(), &[127u8, (-127i8) as u8, 76, 0, (-32i8) as u8]); // 76.2 → 76, −31.75 → −32
        let t =
            IntTensor::quantize(&x, 1, 5, QuantSpec::symmetric(Bits::B4, Granularity::PerTensor), Rounding::Nearest)
                .unwrap();
        // q = 7, −7, 4.2→4, 0, −1.75→−2; nibbles q+8 packed high-first, odd tail padded with a zero nibble.
        assert_eq!(t.codes(), &[0xF1, 0xC8, 0x60]);
        let t =
            IntTensor::quantize(&x, 1, 5, QuantSpec::asymmetric(Bits::B4, Granularity::PerTensor), Rounding::Nearest)
                .unwrap();
        assert_eq!(t.scales(), &[2.0 / 15.0]);
        assert_eq!(t.offsets(), Some(&[-1.0f32][..]));
        assert_eq!(t.codes()[0] >> 4, 15);
        assert_eq!(t.codes()[0] & 15, 0);
    }

    #[test]
    fn parallel_chunks_match_single_span() {
        // Larger than one parallel chunk, odd length, 4-bit, blocks crossing chunk boundaries.
        let (rows, cols) = (3, PAR_CHUNK / 2 + 3);
        let x = data(rows, cols, 2);
        let spec = QuantSpec::asymmetric(Bits::B4, Granularity::PerBlock(100));
        let r = Rounding::Stochastic(RngKey::new(1, 2, 3));
        let t = IntTensor::quantize(&x, rows, cols, spec, r).unwrap();
        let mut codes = vec![0; t.codes.len()];
        t.groups().encode_span(&mut codes, 0, 0, &x, &r, Encode::Fresh);
        assert_eq!(codes, t.codes);
        // Row-wise dequantization agrees with the whole-tensor one.
        let mut all = vec![0.0; x.len()];
        t.dequantize_into(&mut all).unwrap();
        let mut row = vec![0.0; cols];
        t.dequantize_rows(1..2, &mut row).unwrap();
        assert_eq!(&all[cols..2 * cols], &row[..]);
    }

    #[test]
    fn requantize_frozen_keeps_unchanged_codes_and_scales() {
        for spec in specs() {
            let x = data(4, 20, 5);
            let mut t = IntTensor::quantize(&x, 4, 20, spec, Rounding::Nearest).unwrap();
            let before = t.clone();
            let mut y = vec![0.0; x.len()];
            t.dequantize_into(&mut y).unwrap();
            t.requantize_frozen(&y, Rounding::Stochastic(RngKey::new(1, 1, 1))).unwrap();
            assert_eq!(t, before, "{spec:?}");
            // Values far outside the frozen range clamp to the grid ends.
            let big: Vec<f32> = x.iter().map(|v| v * 100.0).collect();
            t.requantize_frozen(&big, Rounding::Nearest).unwrap();
            assert_eq!(t.scales, before.scales);
            let mut z = vec![0.0; x.len()];
            t.dequantize_into(&mut z).unwrap();
            for (i, &v) in z.iter().enumerate() {
                let (lo, hi) = group_range(&x, spec, 4, 20, i);
                let v = v as f64;
                assert!(v >= lo - 1e-5 && v <= hi + 1e-5, "{spec:?} clamp {i}");
            }
        }
    }

    /// Tiny updates under stochastic rounding: adding δ = 0.03 steps to every element moves the mean code by
    /// 0.03 (σ of one element's move is sqrt(0.03·0.97) ≈ 0.17, so over n = 2^14 elements the mean has
    /// sd 1.3e-3; the tolerance is 5 of those). Round-to-nearest loses the update entirely.
    #[test]
    fn requantize_frozen_tiny_delta_survives_in_expectation() {
        const DELTA_STEPS: f64 = 0.03;
        let (rows, cols) = (64, 256);
        let x = data(rows, cols, 9);
        let spec = QuantSpec::symmetric(Bits::B8, Granularity::PerRow);
        let t0 = IntTensor::quantize(&x, rows, cols, spec, Rounding::Nearest).unwrap();
        let mut y = vec![0.0; x.len()];
        t0.dequantize_into(&mut y).unwrap();
        let moved: Vec<f32> =
            y.iter().enumerate().map(|(i, &v)| v + (DELTA_STEPS as f32) * t0.scales[i / cols]).collect();
        let mean_code_move = |t: &IntTensor| {
            let (mut s, mut n) = (0.0, 0);
            for (i, (&a, &b)) in t.codes.iter().zip(&t0.codes).enumerate() {
                if t0.scales[i / cols] > 0.0 && (b as i8) < 127 {
                    s += (a as i8 as f64) - (b as i8 as f64);
                    n += 1;
                }
            }
            s / n as f64
        };
        let mut sr = t0.clone();
        sr.requantize_frozen(&moved, Rounding::Stochastic(RngKey::new(42, 0, crate::rng::STREAM_SR_WEIGHT))).unwrap();
        let m = mean_code_move(&sr);
        let n = (rows - 1) * cols; // the zero row has scale 0 and is excluded
        let tol = 5.0 * (DELTA_STEPS * (1.0 - DELTA_STEPS)).sqrt() / (n as f64).sqrt();
        assert!((m - DELTA_STEPS).abs() < tol, "mean code move {m}, expected {DELTA_STEPS} ± {tol}");
        let mut rtn = t0.clone();
        rtn.requantize_frozen(&moved, Rounding::Nearest).unwrap();
        assert_eq!(mean_code_move(&rtn), 0.0);
    }

    #[test]
    fn requantize_rows_and_recalibrate() {
        let x = data(6, 10, 11);
        let spec = QuantSpec::symmetric(Bits::B4, Granularity::PerBlock(4));
        let mut t = IntTensor::quantize(&x, 6, 10, spec, Rounding::Nearest).unwrap();
        let mut rows = vec![0.0; 20];
        t.dequantize_rows(3..5, &mut rows).unwrap();
        let before = t.clone();
        t.requantize_rows_frozen(3..5, &rows, Rounding::Nearest).unwrap();
        assert_eq!(t, before);
        let x2: Vec<f32> = x.iter().map(|v| v * 3.0).collect();
        t.recalibrate(&x2, Rounding::Nearest).unwrap();
        assert_eq!(t, IntTensor::quantize(&x2, 6, 10, spec, Rounding::Nearest).unwrap());
    }

    #[test]
    fn bad_shapes_are_errors() {
        let spec = QuantSpec::symmetric(Bits::B8, Granularity::PerRow);
        assert!(matches!(
            IntTensor::quantize(&[1.0; 5], 2, 3, spec, Rounding::Nearest),
            Err(QuantError::LengthMismatch { expected: 6, got: 5, .. })
        ));
        let block0 = QuantSpec::symmetric(Bits::B8, Granularity::PerBlock(0));
        assert!(matches!(
            IntTensor::quantize(&[1.0; 6], 2, 3, block0, Rounding::Nearest),
            Err(QuantError::InvalidBlockSize { .. })
        ));
        assert_eq!(Bits::from_count(3), Err(QuantError::UnsupportedBits(3)));
        let mut t = IntTensor::quantize(&[1.0; 6], 2, 3, spec, Rounding::Nearest).unwrap();
        assert!(t.requantize_rows_frozen(1..3, &[0.0; 6], Rounding::Nearest).is_err());
        assert!(t.dequantize_span(4, &mut [0.0; 3]).is_err());
        assert!(t.dequantize_rows(0..1, &mut [0.0; 2]).is_err());
        // Empty tensors are fine.
        let e = IntTensor::quantize(&[], 0, 3, spec, Rounding::Nearest).unwrap();
        assert_eq!(e.storage_bytes().total(), 0);
    }

    #[test]
    fn storage_bytes_are_exact() {
        let x = data(8, 64, 3);
        let q = |spec| IntTensor::quantize(&x, 8, 64, spec, Rounding::Nearest).unwrap().storage_bytes();
        let b = q(QuantSpec::symmetric(Bits::B8, Granularity::PerRow));
        assert_eq!((b.codes, b.scales), (512, 8 * 4));
        let b = q(QuantSpec::asymmetric(Bits::B4, Granularity::PerBlock(64)));
        assert_eq!((b.codes, b.scales), (256, 8 * 2 * 4));
        let b = q(QuantSpec::symmetric(Bits::B4, Granularity::PerTensor));
        assert_eq!((b.codes, b.scales, b.total()), (256, 4, 260));
        for spec in [
            QuantSpec::symmetric(Bits::B8, Granularity::PerRow),
            QuantSpec::asymmetric(Bits::B4, Granularity::PerBlock(64)),
            QuantSpec::symmetric(Bits::B4, Granularity::PerBlock(7)),
            QuantSpec::asymmetric(Bits::B8, Granularity::PerTensor),
        ] {
            assert_eq!(spec.planned_bytes(8, 64).unwrap(), q(spec), "{spec:?}");
        }
    }
}

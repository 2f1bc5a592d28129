//! INT8 matrix products for the Linear forward `y = x·Wᵀ`, on the CPU's integer units.
//!
//! - Activations are quantized on the fly ([`quantize_acts`]): symmetric, one scale per row (token), stored as
//!   `q + zero` in a u8.
//! - The weight hands over its rows as i8 codes with one f32 scale per row ([`IntWeight`]): INT8 codes as they are,
//!   INT4 codes widened, a perturbed weight's codes moved on its own grid (QuZO).
//! - AMX-INT8 tiles multiply where the CPU has them and Linux grants them ([`crate::amx`], 16 rows or more);
//!   otherwise rten-gemm multiplies u8×i8 into i32 with the best kernel the CPU has (AVX-512 VNNI, AVX-512, AVX2,
//!   portable), chosen at run time ([`kernel_name`]). Either way the i32 sums are exact and equal. The epilogue
//!   scales each sum by its row's and column's scales.
//! - Dense-and-sparse weights (QFT's hybrid) add their f32 outliers as a sparse product on the unquantized
//!   activations, so outliers keep full precision on both sides.
//!
//! Saturation: without VNNI, the x86 kernels multiply with `vpmaddubsw`, which adds two u8×i8 products into an i16
//! and saturates above 32767. Such kernels get 7-bit activations (|q| ≤ 63, stored as q + 64 ∈ [1, 127]), so two
//! products stay within 2·127·128 = 32512: what onnxruntime and fbgemm call "reduced range". [`activation_qmax`]
//! says which applies; every summary records it through [`kernel_name`]. Integer sums are then exact, so every
//! kernel gives the same i32 result bit for bit (tested against a scalar reference).
//!
//! Panels: the weight is read in panels of up to 1024 rows (4 MiB of codes), in parallel, into a scratch of i8
//! codes, so no copy of a whole matrix is made; rten-gemm packs each panel as it multiplies it, with all threads.
//! A weight that changes between calls (QuZO's perturbed weight) is thus packed once per version it has.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;
use rten_gemm::{GemmExecutor, GemmInputA, GemmInputB, GemmOptions, QuantParams};
use rten_tensor::NdTensorView;

use crate::amx;
use crate::error::{check_len, QuantError, Result};
use crate::hybrid::HybridTensor;
use crate::simd;
use crate::uniform::{Bits, Granularity, IntTensor};
use crate::weight::QuantWeight;

/// f32 outliers in compressed sparse rows, kept outside a weight's codes.
#[derive(Clone, Copy, Debug)]
pub struct Csr<'a> {
    pub row_ptr: &'a [u32],
    pub col_idx: &'a [u32],
    pub values: &'a [f32],
}

/// A weight the integer kernels can read: row r is `scale_r · codes_r` (plus its outliers, if any).
pub trait IntWeight: QuantWeight {
    /// Rows `rows` as i8 codes (row-major, `rows.len() × cols`) and their scales (`rows.len()`).
    fn int_rows(&self, rows: Range<usize>, codes: &mut [i8], scales: &mut [f32]) -> Result<()>;
    /// Entries kept in f32 outside the codes (their codes are 0), added as a sparse product.
    fn outliers(&self) -> Option<Csr<'_>> {
        None
    }
    /// All rows' i8 codes and scales as the weight stores them, when it does (INT8, one scale per row): read
    /// without a copy.
    fn stored_rows(&self) -> Option<(&[i8], &[f32])> {
        None
    }
}

thread_local! {
    /// The INT8 GEMM rten-gemm picked for this CPU (one per thread: its kernel object is not `Send`).
    static EXEC: GemmExecutor<u8, i8, i32> = GemmExecutor::new();
}

/// The INT8 kernel in use, with the activation bits it allows: e.g. `x86_64-u8i8i32-avx2 (A7)`, or
/// `amx-int8 tiles, x86_64-u8i8i32-avx512 under 16 rows (A8)`.
pub fn kernel_name() -> String {
    let bits = if activation_qmax() == 127 { 8 } else { 7 };
    let rten = EXEC.with(|e| e.kernel_name().to_string());
    if amx::available() {
        format!("amx-int8 tiles, {rten} under {AMX_MIN_ROWS} rows (A{bits})")
    } else {
        format!("{rten} (A{bits})")
    }
}

/// Fewest activation rows for which the AMX tiles are used: below it, packing B per call outweighs the product.
pub const AMX_MIN_ROWS: usize = 16;

/// Largest |q| of an activation code on this machine's kernel: 127, or 63 where the kernel could saturate.
pub fn activation_qmax() -> i32 {
    // rten-gemm's kernel decides: it still runs products under AMX_MIN_ROWS rows; the tiles never saturate (i32 sums).
    if EXEC.with(|e| e.may_saturate()) {
        63
    } else {
        127
    }
}

/// Activations quantized per row: x[i, c] ≈ scales[i] · (codes[i, c] − zero).
#[derive(Clone, Debug, PartialEq)]
pub struct IntActs {
    pub rows: usize,
    pub cols: usize,
    /// Row-major m×k codes. Set once: the tiles' copy of them is made on the first product and kept.
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub zero: u8,
    /// Input columns kept in f32 (LLM.int8()'s outlier features): their codes are the zero point, and their part
    /// of the product is added in f32 from the unquantized activations.
    pub f32_cols: Vec<u32>,
    /// The codes as the AMX tiles read them ([`amx::pack_a`]), made on first use and kept: each 4 MiB panel of a
    /// weight reads all of them, and so does every weight [`matmul_acts`] applies to the same input.
    tiles: TileCodes,
}

impl IntActs {
    /// Quantized activations from their parts (`codes` m×k, `scales` m).
    pub fn new(rows: usize, cols: usize, codes: Vec<u8>, scales: Vec<f32>, zero: u8) -> IntActs {
        IntActs { rows, cols, codes, scales, zero, f32_cols: Vec::new(), tiles: TileCodes::default() }
    }

    /// The signed, padded copy of the codes where the tiles will multiply them ([`use_tiles`]), else `None`.
    fn tile_codes(&self) -> Option<&[i8]> {
        use_tiles(self.rows, self.zero)
            .then(|| &self.tiles.0.get_or_init(|| amx::pack_a(&self.codes, self.rows, self.cols).0)[..])
    }
}

/// [`IntActs::tiles`]: a cache, so it is left out of comparisons.
#[derive(Clone, Debug, Default)]
struct TileCodes(OnceLock<Vec<i8>>);

impl PartialEq for TileCodes {
    fn eq(&self, _: &TileCodes) -> bool {
        true
    }
}

/// Activation elements per rayon task of [`quantize_acts`].
const ACT_TASK: usize = 1 << 15;

/// Quantizes row-major m×k activations with `|q| ≤ qmax` (≤ 127), round to nearest (ties to even). A row holding
/// a NaN or an infinity gets a NaN scale, so the non-finite value reaches the output instead of vanishing into a code.
pub fn quantize_acts(x: &[f32], m: usize, k: usize, qmax: i32) -> Result<IntActs> {
    quantize_scaled(x, m, k, qmax, None)
}

/// [`quantize_acts`] of `x` with column c multiplied by `col_scale[c]` first (one row at a time, so the scaled
/// matrix is never held whole).
fn quantize_scaled(x: &[f32], m: usize, k: usize, qmax: i32, col_scale: Option<&[f32]>) -> Result<IntActs> {
    check_len("quantize_acts x (m×k)", m * k, x.len())?;
    if let Some(c) = col_scale {
        check_len("quantize_acts column scales", k, c.len())?;
    }
    if !(1..=127).contains(&qmax) {
        return Err(QuantError::NoIntegerPath("activation range must be 1..=127"));
    }
    let zero = (qmax + 1) as u8;
    let mut codes = vec![0u8; m * k];
    let mut scales = vec![0f32; m];
    if let Some(rows_per_task) = ACT_TASK.checked_div(k) {
        let rows_per_task = rows_per_task.max(1);
        codes
            .par_chunks_mut(k * rows_per_task)
            .zip(scales.par_chunks_mut(rows_per_task))
            .zip(x.par_chunks(k * rows_per_task))
            .for_each(|((q, s), x)| {
                let mut scaled = vec![0f32; if col_scale.is_some() { k } else { 0 }];
                for ((q, s), row) in q.chunks_mut(k).zip(s.iter_mut()).zip(x.chunks(k)) {
                    let row = match col_scale {
                        Some(c) => {
                            scaled.iter_mut().zip(row).zip(c).for_each(|((d, &v), &c)| *d = v * c);
                            &scaled[..]
                        }
                        None => row,
                    };
                    let absmax = simd::absmax(row);
                    // A row below ~1e-37 (where qmax/absmax overflows) is encoded as zeros, like an all-zero row.
                    let inv = qmax as f32 / absmax;
                    let (inv, scale) = if inv.is_finite() { (inv, absmax / qmax as f32) } else { (0.0, 0.0) };
                    *s = if simd::has_non_finite(row) { f32::NAN } else { scale };
                    simd::encode_acts(row, inv, qmax as f32, zero as f32, q);
                }
            });
    }
    Ok(IntActs::new(m, k, codes, scales, zero))
}

/// LLM.int8()'s outlier threshold: an input column with any |x| above it is kept in f32.
pub const OUTLIER_THRESHOLD: f32 = 6.0;

/// [`quantize_acts`] with LLM.int8()'s mixed decomposition: the columns where some row has |x| > `threshold` are
/// left out of the rows' scales and codes and kept in f32 (`f32_cols`), so one outlier feature no longer coarsens
/// every other feature of its token.
pub fn quantize_acts_mixed(x: &[f32], m: usize, k: usize, qmax: i32, threshold: f32) -> Result<IntActs> {
    check_len("quantize_acts x (m×k)", m * k, x.len())?;
    if k == 0 {
        return quantize_acts(x, m, k, qmax);
    }
    let col_max = x
        .par_chunks(k * (ACT_TASK / k).max(1))
        .map(|rows| {
            let mut c = vec![0f32; k];
            rows.chunks(k).for_each(|r| c.iter_mut().zip(r).for_each(|(c, v)| *c = c.max(v.abs())));
            c
        })
        .reduce(|| vec![0f32; k], |a, b| a.iter().zip(&b).map(|(a, b)| a.max(*b)).collect());
    let cols: Vec<u32> = (0..k as u32).filter(|&c| col_max[c as usize] > threshold).collect();
    if cols.is_empty() {
        return quantize_acts(x, m, k, qmax);
    }
    let mut mask = vec![1f32; k];
    cols.iter().for_each(|&c| mask[c as usize] = 0.0);
    let mut acts = quantize_scaled(x, m, k, qmax, Some(&mask))?;
    acts.f32_cols = cols;
    Ok(acts)
}

/// `acc (m×n) = Σ_c (a[i, c] − zero)·b[j, c]`: a is m×k u8, b holds n rows of k i8 (W's rows, not Wᵀ).
pub fn gemm_u8i8(a: &[u8], zero: u8, m: usize, k: usize, b: &[i8], n: usize, acc: &mut [i32]) -> Result<()> {
    check_len("gemm_u8i8 b (n×k)", n * k, b.len())?;
    gemm_strided(a, zero, None, m, k, b, n, BLayout::OutputRows, acc)
}

/// How the B operand of [`gemm_strided`] is laid out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BLayout {
    /// n rows of k (W's rows, `y = x·Wᵀ`): `B[c, j] = b[j·k + c]`.
    OutputRows,
    /// k rows of n (W itself, `dx = dy·W`): `B[c, j] = b[c·n + j]`.
    SumRows,
}

/// Whether a product of m rows with this zero point runs on the AMX tiles: the CPU and OS grant them, m ≥
/// [`AMX_MIN_ROWS`], and every `a − zero` of a u8 code is an i8 (the tiles multiply signed bytes), which holds for
/// any code only when the zero point is 128: qtune's 8-bit activations (qmax 127); other callers' zero points go
/// to rten-gemm, which takes any.
fn use_tiles(m: usize, zero: u8) -> bool {
    m >= AMX_MIN_ROWS && zero == amx::ZERO && amx::available()
}

/// `acc (m×n) = Σ_c (a[i, c] − zero)·B[c, j]`, on AMX tiles where [`use_tiles`] says so (from `a_tiles`, A's
/// [`amx::pack_a`] copy, when the caller kept one), otherwise on rten-gemm's kernel. Every element of `acc` is
/// written (its previous contents do not matter).
#[allow(clippy::too_many_arguments)]
fn gemm_strided(
    a: &[u8],
    zero: u8,
    a_tiles: Option<&[i8]>,
    m: usize,
    k: usize,
    b: &[i8],
    n: usize,
    layout: BLayout,
    acc: &mut [i32],
) -> Result<()> {
    check_len("gemm_u8i8 a (m×k)", m * k, a.len())?;
    check_len("gemm_u8i8 acc (m×n)", m * n, acc.len())?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        acc.fill(0);
        return Ok(());
    }
    let (sc, sj) = if layout == BLayout::OutputRows { (1, k) } else { (n, 1) };
    if use_tiles(m, zero) {
        let packed;
        let ap = match a_tiles {
            Some(ap) => ap,
            None => {
                packed = amx::pack_a(a, m, k).0;
                &packed
            }
        };
        let bp = amx::PackedB::pack(b, k, n, sc, sj);
        amx::gemm_packed(amx::Engine::Amx, ap, m, bp.kp, &bp, acc);
        return Ok(());
    }
    let b = match layout {
        BLayout::OutputRows => NdTensorView::from_data([n, k], b).transposed(),
        BLayout::SumRows => NdTensorView::from_data([k, n], b),
    };
    let zeros = vec![zero; m];
    let av = NdTensorView::from_data([m, k], a);
    let opts = GemmOptions { a_quant: Some(QuantParams { zero_point: &zeros }), ..Default::default() };
    EXEC.with(|e| e.gemm(acc, GemmInputA::Unpacked(av.view()), GemmInputB::Unpacked(b), opts))
        .map_err(|e| QuantError::Gemm(e.to_string()))
}

thread_local! {
    /// The i32 sums of this thread's last product, kept for the next: a fresh zeroed buffer of m × 1024 sums is
    /// megabytes of memset and page faults per call, next to products that take about a millisecond on the tiles
    /// at SmolLM2's widths. It holds at most [`SUMS_KEPT`] sums, so what stays between products is bounded (16 MiB
    /// a thread) whatever the batch.
    static SUMS: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
}

/// The most i32 sums [`SUMS`] keeps; a larger product allocates its own for the call.
const SUMS_KEPT: usize = 1 << 22;

/// Runs `f` on `len` i32 sums of scratch (contents unspecified: the GEMMs overwrite them).
fn with_sums<R>(len: usize, f: impl FnOnce(&mut [i32]) -> R) -> R {
    if len > SUMS_KEPT {
        return f(&mut vec![0; len]);
    }
    SUMS.with(|sums| match sums.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0);
            }
            f(&mut v[..len])
        }
        // Re-entered on this thread (a rayon task of another product stolen while this one waits): its own buffer.
        Err(_) => f(&mut vec![0; len]),
    })
}

/// Weight codes per panel (4 MiB of i8): large panels keep rten-gemm's repacking of the activations, which it
/// redoes for every call, small next to the product.
const INT_TILE_BYTES: usize = 1 << 22;
/// At most this many weight rows per panel, which bounds the i32 sums to m × 1024.
const INT_TILE_ROWS: usize = 1024;
/// Weight elements read per rayon task (QuZO's perturbed reads draw random numbers for each).
const READ_TASK: usize = 1 << 15;

/// Bytes [`matmul_xwt_int`] allocates for an m×k input and an n×k weight: the activation codes and scales, one
/// panel of weight codes and scales, and its i32 sums (the memory planner's count).
pub fn scratch_bytes(m: usize, n: usize, k: usize) -> usize {
    let nb = (INT_TILE_BYTES / k.max(1)).clamp(1, INT_TILE_ROWS).min(n);
    m * k + 4 * m + nb * k + 4 * nb + 4 * m * nb + amx_scratch_bytes(m, nb, k)
}

/// The AMX path's copies on this machine ([`amx::pack_a`], [`amx::PackedB`]): signed, padded activations and one
/// panel of B in tile order; none where the tiles are not used.
fn amx_scratch_bytes(m: usize, n: usize, k: usize) -> usize {
    if !use_tiles(m, (activation_qmax() + 1) as u8) {
        return 0;
    }
    amx::packed_bytes(m, n, k)
}

/// Bytes [`matmul_xw_int`] allocates for an m×n input gradient and an n×k weight: dy's codes and scales (W's scales
/// folded in one row at a time), the i32 sums, W's scales, and a copy of W's codes unless the weight stores them.
pub fn input_grad_scratch_bytes(m: usize, n: usize, k: usize, stored: bool) -> usize {
    m * n + 4 * m + 4 * m * k + 4 * n + if stored { 0 } else { n * k } + amx_scratch_bytes(m, k, n)
}

/// `y = x·Wᵀ` on the integer path: x is m×k f32 (quantized here), W is n×k, y is m×n.
pub fn matmul_xwt_int<W: IntWeight + ?Sized>(x: &[f32], m: usize, w: &W, y: &mut [f32]) -> Result<()> {
    let acts = quantize_acts(x, m, w.cols(), activation_qmax())?;
    matmul_acts(&acts, x, w, y)
}

/// [`matmul_xwt_int`] with LLM.int8()'s mixed decomposition ([`quantize_acts_mixed`] at [`OUTLIER_THRESHOLD`]).
pub fn matmul_xwt_mixed<W: IntWeight + ?Sized>(x: &[f32], m: usize, w: &W, y: &mut [f32]) -> Result<()> {
    let acts = quantize_acts_mixed(x, m, w.cols(), activation_qmax(), OUTLIER_THRESHOLD)?;
    matmul_acts(&acts, x, w, y)
}

/// `y = x·Wᵀ` with the activations already quantized (`acts`, from `x`): several weights reading the same input
/// (q, k, v; gate, up) quantize it once. `x` is read only for the weight's f32 outliers.
pub fn matmul_acts<W: IntWeight + ?Sized>(acts: &IntActs, x: &[f32], w: &W, y: &mut [f32]) -> Result<()> {
    let (m, n, k) = (acts.rows, w.rows(), w.cols());
    check_len("matmul_acts activations (m×k)", m * k, acts.rows * acts.cols)?;
    if acts.zero as i32 > activation_qmax() + 1 {
        return Err(QuantError::NoIntegerPath("activations quantized wider than this machine's kernel allows"));
    }
    check_len("matmul_acts x (m×k)", m * k, x.len())?;
    check_len("matmul_acts y (m×n)", m * n, y.len())?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    // Panels of whole weight rows, read in parallel; the tiles or rten-gemm then multiply each with all threads.
    let nb = (INT_TILE_BYTES / k.max(1)).clamp(1, INT_TILE_ROWS).min(n);
    // A weight that stores its rows as codes is read in place; others are read into a panel scratch.
    let stored = w.stored_rows();
    let panel_len = if stored.is_some() { 0 } else { nb };
    let (mut codes_buf, mut scales_buf) = (vec![0i8; panel_len * k], vec![0f32; panel_len]);
    let a_tiles = acts.tile_codes();
    with_sums(m * nb, |sums| -> Result<()> {
        for j0 in (0..n).step_by(nb) {
            let cols = nb.min(n - j0);
            let acc = &mut sums[..m * cols];
            let (codes, scales): (&[i8], &[f32]) = match stored {
                Some((c, s)) => (&c[j0 * k..(j0 + cols) * k], &s[j0..j0 + cols]),
                None => {
                    let (codes, scales) = (&mut codes_buf[..cols * k], &mut scales_buf[..cols]);
                    let per_task = (READ_TASK / k.max(1)).max(1);
                    codes
                        .par_chunks_mut(per_task * k.max(1))
                        .zip(scales.par_chunks_mut(per_task))
                        .enumerate()
                        .try_for_each(|(t, (c, s))| w.int_rows(j0 + t * per_task..j0 + t * per_task + s.len(), c, s))?;
                    (codes, scales)
                }
            };
            gemm_strided(&acts.codes, acts.zero, a_tiles, m, k, codes, cols, BLayout::OutputRows, acc)?;
            if acts.f32_cols.is_empty() {
                y.par_chunks_mut(n).zip(acc.par_chunks(cols)).zip(acts.scales.par_iter()).for_each(
                    |((y, acc), &sx)| {
                        for ((d, &a), &sw) in y[j0..j0 + cols].iter_mut().zip(acc).zip(scales) {
                            *d = a as f32 * (sx * sw);
                        }
                    },
                );
            } else {
                // The f32 columns: this panel's codes at those columns, transposed (no × cols) so that each column adds
                // x's f32 value there times its codes into a row's outputs in one contiguous (vectorized) pass.
                let (f32_cols, panel) = (&acts.f32_cols, codes);
                let wo_t: Vec<f32> =
                    f32_cols.iter().flat_map(|&c| (0..cols).map(move |j| panel[j * k + c as usize] as f32)).collect();
                let rows =
                    y.par_chunks_mut(n).zip(acc.par_chunks(cols)).zip(acts.scales.par_iter()).zip(x.par_chunks(k));
                rows.for_each_init(
                    || vec![0f32; cols],
                    |extra, (((y, acc), &sx), x)| {
                        extra.fill(0.0);
                        for (&c, wo) in f32_cols.iter().zip(wo_t.chunks_exact(cols)) {
                            let xc = x[c as usize];
                            extra.iter_mut().zip(wo).for_each(|(e, &w)| *e += w * xc);
                        }
                        for (((d, &a), &sw), &e) in y[j0..j0 + cols].iter_mut().zip(acc).zip(scales).zip(&*extra) {
                            *d = a as f32 * (sx * sw) + sw * e;
                        }
                    },
                );
            }
        }
        Ok(())
    })?;
    if let Some(csr) = w.outliers().filter(|_| k > 0) {
        add_sparse(x, k, csr, y, n);
    }
    Ok(())
}

/// `y[i, r] += Σ x[i, c]·v` over row r's outliers (c, v): the sparse part of a dense-and-sparse weight, in f32.
fn add_sparse(x: &[f32], k: usize, csr: Csr<'_>, y: &mut [f32], n: usize) {
    y.par_chunks_mut(n).zip(x.par_chunks(k)).for_each(|(y, x)| {
        for (r, y) in y.iter_mut().enumerate() {
            let (a, b) = (csr.row_ptr[r] as usize, csr.row_ptr[r + 1] as usize);
            *y += csr.col_idx[a..b].iter().zip(&csr.values[a..b]).map(|(&c, &v)| x[c as usize] * v).sum::<f32>();
        }
    });
}

/// `dx = dy·W` on the integer path (the input gradient of `y = x·Wᵀ`): dy is m×n, W is n×k, dx is m×k. W's row
/// scales lie along the sum, so they are folded into dy (dy[i, r]·s_r, a row at a time) as it is quantized per row;
/// the codes of the whole of W are read once (a transient i8 copy of this one matrix, or none where the weight
/// stores them as such). Outliers add `dy[i, r]·v` at their columns, in f32.
pub fn matmul_xw_int<W: IntWeight + ?Sized>(dy: &[f32], m: usize, w: &W, dx: &mut [f32]) -> Result<()> {
    let (n, k) = (w.rows(), w.cols());
    check_len("matmul_xw_int dy (m×n)", m * n, dy.len())?;
    check_len("matmul_xw_int dx (m×k)", m * k, dx.len())?;
    if m == 0 || k == 0 {
        return Ok(());
    }
    let mut scales = vec![0f32; n];
    let owned: Vec<i8>;
    let codes: &[i8] = match w.stored_rows() {
        Some((c, s)) => {
            scales.copy_from_slice(s);
            c
        }
        None => {
            let mut c = vec![0i8; n * k];
            w.int_rows(0..n, &mut c, &mut scales)?;
            owned = c;
            &owned
        }
    };
    let acts = quantize_scaled(dy, m, n, activation_qmax(), Some(&scales))?;
    with_sums(m * k, |acc| {
        gemm_strided(&acts.codes, acts.zero, None, m, n, codes, k, BLayout::SumRows, acc)?;
        dx.par_chunks_mut(k).zip(acc.par_chunks(k)).zip(acts.scales.par_iter()).for_each(|((dx, acc), &sx)| {
            dx.iter_mut().zip(acc).for_each(|(d, &a)| *d = a as f32 * sx);
        });
        Ok::<(), QuantError>(())
    })?;
    if let Some(csr) = w.outliers().filter(|_| n > 0) {
        dx.par_chunks_mut(k).zip(dy.par_chunks(n)).for_each(|(dx, dy)| {
            for (r, &g) in dy.iter().enumerate() {
                let (a, b) = (csr.row_ptr[r] as usize, csr.row_ptr[r + 1] as usize);
                csr.col_idx[a..b].iter().zip(&csr.values[a..b]).for_each(|(&c, &v)| dx[c as usize] += g * v);
            }
        });
    }
    Ok(())
}

/// Writes the i8 codes of elements `first..first + out.len()` of a symmetric tensor's code bytes.
///
/// INT4 bytes hold two elements, nibble q + 8 each, the even element in the high nibble. The loop goes a byte at a
/// time (two outputs per byte) so LLVM vectorizes it; element by element it was QuZO INT4's slow spot.
fn widen_codes(bits: Bits, src: &[u8], first: usize, out: &mut [i8]) {
    let (hi, lo) = (|b: u8| (b >> 4) as i8 - 8, |b: u8| (b & 0x0f) as i8 - 8);
    match bits {
        Bits::B8 => out.iter_mut().zip(&src[first..]).for_each(|(o, &b)| *o = b as i8),
        Bits::B4 => {
            let (mut e, mut out) = (first, out);
            if e % 2 == 1 && !out.is_empty() {
                out[0] = lo(src[e / 2]);
                (e, out) = (e + 1, &mut out[1..]);
            }
            let (bytes, whole) = (&src[e / 2..], out.len() / 2);
            let mut pairs = out.chunks_exact_mut(2);
            pairs.by_ref().zip(bytes).for_each(|(p, &b)| (p[0], p[1]) = (hi(b), lo(b)));
            if let [last] = pairs.into_remainder() {
                *last = hi(bytes[whole]);
            }
        }
    }
}

impl IntTensor {
    /// Whether the integer kernels can read this tensor: symmetric codes with one scale per row or tensor.
    pub fn has_int_rows(&self) -> bool {
        self.spec().symmetric && matches!(self.spec().granularity, Granularity::PerRow | Granularity::PerTensor)
    }
}

impl IntWeight for IntTensor {
    fn int_rows(&self, rows: Range<usize>, codes: &mut [i8], scales: &mut [f32]) -> Result<()> {
        if !self.has_int_rows() {
            return Err(QuantError::NoIntegerPath("integer kernels need symmetric codes, one scale per row or tensor"));
        }
        if rows.start > rows.end || rows.end > self.rows() {
            return Err(QuantError::OutOfBounds { start: rows.start, end: rows.end, len: self.rows() });
        }
        let k = self.cols();
        check_len("int_rows codes", rows.len() * k, codes.len())?;
        check_len("int_rows scales", rows.len(), scales.len())?;
        let bits = self.spec().bits;
        let (all, per_row) = (self.scales(), self.spec().granularity == Granularity::PerRow);
        let (first, src) = (rows.start * k, self.codes());
        widen_codes(bits, src, first, codes);
        for (s, r) in scales.iter_mut().zip(rows) {
            *s = if per_row { all[r] } else { all[0] };
        }
        Ok(())
    }

    fn stored_rows(&self) -> Option<(&[i8], &[f32])> {
        let spec = self.spec();
        (self.has_int_rows() && spec.bits == Bits::B8 && spec.granularity == Granularity::PerRow).then(|| {
            let c = self.codes();
            // SAFETY: INT8 symmetric codes are i8 values stored as their bytes; u8 and i8 share size and alignment.
            (unsafe { std::slice::from_raw_parts(c.as_ptr().cast::<i8>(), c.len()) }, self.scales())
        })
    }
}

impl IntWeight for HybridTensor {
    fn int_rows(&self, rows: Range<usize>, codes: &mut [i8], scales: &mut [f32]) -> Result<()> {
        self.dense().int_rows(rows, codes, scales)
    }
    fn outliers(&self) -> Option<Csr<'_>> {
        let (row_ptr, col_idx, values) = self.sparse();
        Some(Csr { row_ptr, col_idx, values })
    }
    fn stored_rows(&self) -> Option<(&[i8], &[f32])> {
        self.dense().stored_rows()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{fill_gaussian, RngKey};
    use crate::uniform::QuantSpec;
    use crate::Rounding;

    /// Against the f64 product of the dequantized operands (the same codes and scales), the only error is the
    /// epilogue's f32 rounding of the exact i32 sum and of `sx·sw` (a few ulp): budget 1e-6 of the output's scale.
    const INT_RTOL: f64 = 1e-6;

    fn gauss(n: usize, seed: u64) -> Vec<f32> {
        let mut v = vec![0.0; n];
        fill_gaussian(&RngKey::new(seed, 0, 0), 0, &mut v);
        v
    }

    fn int(w: &[f32], n: usize, k: usize, bits: Bits) -> IntTensor {
        IntTensor::quantize(w, n, k, QuantSpec::symmetric(bits, Granularity::PerRow), Rounding::Nearest).unwrap()
    }

    /// The scalar reference of [`gemm_u8i8`]: exact i32 sums.
    fn gemm_ref(a: &[u8], zero: u8, m: usize, k: usize, b: &[i8], n: usize) -> Vec<i32> {
        (0..m * n)
            .map(|i| (0..k).map(|c| (a[(i / n) * k + c] as i32 - zero as i32) * b[(i % n) * k + c] as i32).sum())
            .collect()
    }

    #[test]
    fn kernel_equals_scalar_i32_reference_bit_for_bit() {
        let q = activation_qmax();
        let zero = (q + 1) as u8;
        for &(m, n, k) in &[(1, 7, 5), (5, 37, 129), (33, 64, 300), (64, 17, 1)] {
            // Extremes included: the largest activations against the largest weights of both signs.
            let a: Vec<u8> =
                (0..m * k).map(|i| (zero as i32 + [q, -q, 3, 0][i % 4] - (i % 7) as i32 % 2) as u8).collect();
            let b: Vec<i8> = (0..n * k).map(|i| [127i8, -127, 5, -3, 0][(i * 3) % 5]).collect();
            let mut acc = vec![0i32; m * n];
            gemm_u8i8(&a, zero, m, k, &b, n, &mut acc).unwrap();
            assert_eq!(acc, gemm_ref(&a, zero, m, k, &b, n), "{} m={m} n={n} k={k}", kernel_name());
        }
    }

    /// `gemm_u8i8` takes any zero point; the tiles only one (`use_tiles`): a code of 255 against zero 0 must not
    /// wrap into a signed byte.
    #[test]
    fn any_zero_point_gives_the_exact_sum() {
        let (m, n, k) = (32, 16, 64);
        let b: Vec<i8> = (0..n * k).map(|i| [127i8, -128, 1, -1][i % 4]).collect();
        for zero in [0u8, 1, 127, 128, 200, 255] {
            let a: Vec<u8> = (0..m * k).map(|i| [255u8, 0, 128, 7][(i / 3) % 4]).collect();
            let mut acc = vec![-5i32; m * n]; // overwritten, not added to
            gemm_u8i8(&a, zero, m, k, &b, n, &mut acc).unwrap();
            assert_eq!(acc, gemm_ref(&a, zero, m, k, &b, n), "zero {zero}, {}", kernel_name());
        }
    }

    #[test]
    fn activations_round_to_nearest_on_their_row_grid() {
        let (m, k) = (6, 50);
        let mut x = gauss(m * k, 4);
        x[2 * k..3 * k].fill(0.0); // a zero row: scale 0, codes at the zero point
        let acts = quantize_acts(&x, m, k, 127).unwrap();
        for i in 0..m {
            let s = acts.scales[i];
            for c in 0..k {
                let q = acts.codes[i * k + c] as f32 - acts.zero as f32;
                assert!(q.abs() <= 127.0);
                // Half a step, plus f32 slack for x·(qmax/absmax).
                assert!((q * s - x[i * k + c]).abs() <= 0.5 * s * (1.0 + 1e-5) + 1e-30, "row {i} col {c}");
            }
        }
        assert_eq!(acts.scales[2], 0.0);
        // A row too small for qmax/absmax to be finite encodes as zeros (scale 0), not as clamped garbage.
        let mut tiny = vec![0f32; k];
        tiny[3] = 1e-39;
        let t = quantize_acts(&tiny, 1, k, 127).unwrap();
        assert!(t.scales[0] == 0.0 && t.codes.iter().all(|&c| c == t.zero));
        x[7] = f32::NAN;
        assert!(quantize_acts(&x, m, k, 127).unwrap().scales[0].is_nan());
        x[7] = f32::INFINITY;
        x[k + 49] = f32::NEG_INFINITY; // in the tail after the 16-lane chunks
        let acts = quantize_acts(&x, m, k, 127).unwrap();
        assert!(acts.scales[0].is_nan() && acts.scales[1].is_nan() && acts.scales[3].is_finite());
        assert!(quantize_acts(&x, m, k, 128).is_err());
        assert!(quantize_acts(&x[1..], m, k, 63).is_err());
    }

    /// The f64 product of the dequantized operands: activations from `acts`, the weight from its dequantization.
    fn reference(acts: &IntActs, w: &dyn QuantWeight) -> Vec<f64> {
        let (m, n, k) = (acts.rows, w.rows(), w.cols());
        let mut wd = vec![0.0; n * k];
        w.dequantize_into(&mut wd).unwrap();
        let xd: Vec<f64> =
            (0..m * k).map(|i| acts.scales[i / k] as f64 * (acts.codes[i] as f64 - acts.zero as f64)).collect();
        (0..m * n).map(|i| (0..k).map(|c| xd[(i / n) * k + c] * wd[(i % n) * k + c] as f64).sum()).collect()
    }

    fn max_err(got: &[f32], want: &[f64]) -> (f64, f64) {
        let scale = want.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
        (got.iter().zip(want).fold(0.0f64, |a, (&g, &w)| a.max((g as f64 - w).abs())), scale)
    }

    #[test]
    fn w8a8_and_w4a8_equal_the_dequantized_f64_product() {
        for &(m, n, k) in &[(1, 40, 70), (5, 37, 129), (17, 300, 64)] {
            let x = gauss(m * k, 2);
            let wf = gauss(n * k, 1);
            for bits in [Bits::B8, Bits::B4] {
                let w = int(&wf, n, k, bits);
                let mut y = vec![0.0; m * n];
                matmul_xwt_int(&x, m, &w, &mut y).unwrap();
                let acts = quantize_acts(&x, m, k, activation_qmax()).unwrap();
                let (err, scale) = max_err(&y, &reference(&acts, &w));
                assert!(err <= INT_RTOL * scale, "{bits:?} m={m} n={n} k={k}: {err} vs {scale}");
            }
        }
    }

    /// One quantized input read by several weights (as q, k and v are), one of them in two panels (over 1024
    /// rows), on the tiles where the machine has them: each product equals the one that quantizes afresh bit for
    /// bit, and the f64 reference within the budget (the tiles' copy of the codes and the sums' buffer are reused).
    #[test]
    fn one_quantized_input_serves_several_weights_and_panels() {
        let (m, k) = (40, 64);
        let x = gauss(m * k, 3);
        let acts = quantize_acts(&x, m, k, activation_qmax()).unwrap();
        for (n, bits, seed) in [(1100, Bits::B8, 4), (24, Bits::B4, 5), (1100, Bits::B4, 6)] {
            let w = int(&gauss(n * k, seed), n, k, bits);
            let (mut shared, mut fresh) = (vec![0.0; m * n], vec![0.0; m * n]);
            matmul_acts(&acts, &x, &w, &mut shared).unwrap();
            matmul_xwt_int(&x, m, &w, &mut fresh).unwrap();
            assert!(shared.iter().zip(&fresh).all(|(a, b)| a.to_bits() == b.to_bits()), "n={n} {bits:?}");
            let (err, scale) = max_err(&shared, &reference(&acts, &w));
            assert!(err <= INT_RTOL * scale, "n={n} {bits:?}: {err} vs {scale}");
        }
    }

    /// The kept sums: a nested use gets its own buffer, and what stays on the thread is bounded.
    #[test]
    fn sums_scratch_is_reentrant_and_bounded() {
        with_sums(10, |a| {
            a.fill(1);
            with_sums(10, |b| b.fill(2));
            assert!(a.iter().all(|&v| v == 1));
        });
        with_sums(SUMS_KEPT + 1, |a| assert_eq!(a.len(), SUMS_KEPT + 1));
        SUMS.with(|s| assert!(s.borrow().len() <= SUMS_KEPT));
    }

    #[test]
    fn hybrid_adds_its_outliers_in_f32() {
        let (m, n, k) = (9, 50, 80);
        let x = gauss(m * k, 5);
        let mut wf = gauss(n * k, 6);
        wf.iter_mut().step_by(37).for_each(|v| *v *= 20.0);
        let w = HybridTensor::quantize(&wf, n, k, 0.02, Rounding::Nearest).unwrap();
        assert!(w.nnz() > 0);
        let mut y = vec![0.0; m * n];
        matmul_xwt_int(&x, m, &w, &mut y).unwrap();
        // Dense part on quantized activations, outliers on the f32 activations.
        let acts = quantize_acts(&x, m, k, activation_qmax()).unwrap();
        let mut want = reference(&acts, w.dense());
        let (rp, ci, vals) = w.sparse();
        for i in 0..m {
            for r in 0..n {
                for e in rp[r] as usize..rp[r + 1] as usize {
                    want[i * n + r] += x[i * k + ci[e] as usize] as f64 * vals[e] as f64;
                }
            }
        }
        let (err, scale) = max_err(&y, &want);
        assert!(err <= INT_RTOL * scale, "{err} vs {scale}");
    }

    /// The whole path against the exact f32-weight product: W8 with A8 (or A7) stays within 2% of the output's
    /// scale on Gaussian data (the quantization noise of both operands, ~0.5% each at 8 bits, ~1.5% at 7), W4
    /// within 25% (INT4's half step is 1/14 of the row's absmax).
    #[test]
    fn quantization_error_is_what_the_bits_allow() {
        let (m, n, k) = (16, 64, 256);
        let x = gauss(m * k, 7);
        let wf = gauss(n * k, 8);
        let exact: Vec<f64> =
            (0..m * n).map(|i| (0..k).map(|c| x[(i / n) * k + c] as f64 * wf[(i % n) * k + c] as f64).sum()).collect();
        let rms = |e: &[f64]| (e.iter().map(|v| v * v).sum::<f64>() / e.len() as f64).sqrt();
        for (bits, budget) in [(Bits::B8, 0.02), (Bits::B4, 0.25)] {
            let mut y = vec![0.0; m * n];
            matmul_xwt_int(&x, m, &int(&wf, n, k, bits), &mut y).unwrap();
            let diff: Vec<f64> = y.iter().zip(&exact).map(|(&a, &b)| a as f64 - b).collect();
            let rel = rms(&diff) / rms(&exact);
            assert!(rel < budget, "{bits:?}: relative RMS error {rel}");
        }
    }

    /// dy·W against its f64 reference: dy with W's row scales folded in, quantized per row, times W's codes, plus
    /// the outliers on the f32 dy. Budget [`INT_RTOL`]. Also against the exact f64 dy·W at 8 bits: 2% relative RMS.
    #[test]
    fn input_gradient_equals_its_reference() {
        let (m, n, k) = (7, 60, 45);
        let dy = gauss(m * n, 10);
        let mut wf = gauss(n * k, 11);
        wf.iter_mut().step_by(29).for_each(|v| *v *= 15.0);
        let weights: Vec<Box<dyn IntWeight>> = vec![
            Box::new(int(&wf, n, k, Bits::B8)),
            Box::new(int(&wf, n, k, Bits::B4)),
            Box::new(HybridTensor::quantize(&wf, n, k, 0.02, Rounding::Nearest).unwrap()),
        ];
        for (f, w) in weights.iter().enumerate() {
            let mut dx = vec![0.0; m * k];
            matmul_xw_int(&dy, m, w.as_ref(), &mut dx).unwrap();
            let (mut codes, mut scales) = (vec![0i8; n * k], vec![0f32; n]);
            w.int_rows(0..n, &mut codes, &mut scales).unwrap();
            let folded: Vec<f32> = (0..m * n).map(|i| dy[i] * scales[i % n]).collect();
            let acts = quantize_acts(&folded, m, n, activation_qmax()).unwrap();
            let mut want: Vec<f64> = (0..m * k)
                .map(|i| {
                    let (r0, c) = (i / k, i % k);
                    (0..n)
                        .map(|r| {
                            let a = acts.codes[r0 * n + r] as f64 - acts.zero as f64;
                            acts.scales[r0] as f64 * a * codes[r * k + c] as f64
                        })
                        .sum()
                })
                .collect();
            if let Some(csr) = w.outliers() {
                for i in 0..m {
                    for r in 0..n {
                        for e in csr.row_ptr[r] as usize..csr.row_ptr[r + 1] as usize {
                            want[i * k + csr.col_idx[e] as usize] += dy[i * n + r] as f64 * csr.values[e] as f64;
                        }
                    }
                }
            }
            let (err, scale) = max_err(&dx, &want);
            assert!(err <= INT_RTOL * scale, "weight {f}: {err} vs {scale}");
        }
        let exact: Vec<f64> =
            (0..m * k).map(|i| (0..n).map(|r| dy[(i / k) * n + r] as f64 * wf[r * k + i % k] as f64).sum()).collect();
        let mut dx = vec![0.0; m * k];
        matmul_xw_int(&dy, m, weights[2].as_ref(), &mut dx).unwrap();
        let rms = |e: &mut dyn Iterator<Item = f64>| {
            let v: Vec<f64> = e.collect();
            (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
        };
        let rel = rms(&mut dx.iter().zip(&exact).map(|(&a, &b)| a as f64 - b)) / rms(&mut exact.iter().copied());
        assert!(rel < 0.02, "hybrid dy·W relative RMS error {rel}");
    }

    /// The mixed decomposition: columns with an outlier are exact (f32), the rest quantized on scales computed
    /// without them. Against its f64 reference within [`INT_RTOL`], and far closer to the exact product than the
    /// plain path when a few feature columns are 50× the rest (LLM activations' outlier features).
    #[test]
    fn mixed_decomposition_keeps_outlier_columns_exact() {
        let (m, n, k) = (12, 40, 96);
        let mut x = gauss(m * k, 12);
        for i in 0..m {
            x[i * k + 5] *= 50.0;
            x[i * k + 70] *= 30.0;
        }
        let wf = gauss(n * k, 13);
        let w = int(&wf, n, k, Bits::B8);
        let acts = quantize_acts_mixed(&x, m, k, activation_qmax(), OUTLIER_THRESHOLD).unwrap();
        assert_eq!(acts.f32_cols, vec![5, 70]);
        let mut y = vec![0.0; m * n];
        matmul_xwt_mixed(&x, m, &w, &mut y).unwrap();
        let (mut codes, mut scales) = (vec![0i8; n * k], vec![0f32; n]);
        w.int_rows(0..n, &mut codes, &mut scales).unwrap();
        let want: Vec<f64> = (0..m * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                (0..k)
                    .map(|c| {
                        let xv = if acts.f32_cols.contains(&(c as u32)) {
                            x[i * k + c] as f64
                        } else {
                            acts.scales[i] as f64 * (acts.codes[i * k + c] as f64 - acts.zero as f64)
                        };
                        xv * scales[j] as f64 * codes[j * k + c] as f64
                    })
                    .sum()
            })
            .collect();
        let (err, scale) = max_err(&y, &want);
        assert!(err <= INT_RTOL * scale, "{err} vs {scale}");
        let exact: Vec<f64> =
            (0..m * n).map(|e| (0..k).map(|c| x[(e / n) * k + c] as f64 * wf[(e % n) * k + c] as f64).sum()).collect();
        let mut plain = vec![0.0; m * n];
        matmul_xwt_int(&x, m, &w, &mut plain).unwrap();
        let rms = |v: &[f32]| (v.iter().zip(&exact).map(|(&a, b)| (a as f64 - b).powi(2)).sum::<f64>()).sqrt();
        assert!(rms(&y) * 3.0 < rms(&plain), "mixed {} vs plain {}", rms(&y), rms(&plain));
    }

    #[test]
    fn int_rows_widen_to_the_dequantized_values() {
        let (n, k) = (5, 7); // odd: rows split bytes, and a range may start or end on either nibble
        for (bits, rows) in
            [Bits::B8, Bits::B4].into_iter().flat_map(|b| [0..1, 0..2, 1..4, 2..5, 1..2, 3..3].map(|r| (b, r)))
        {
            let w = int(&gauss(n * k, 9), n, k, bits);
            let qmax = if bits == Bits::B4 { 7 } else { 127 };
            let mut codes = vec![0i8; rows.len() * k];
            let mut scales = vec![0f32; rows.len()];
            w.int_rows(rows.clone(), &mut codes, &mut scales).unwrap();
            let mut d = vec![0f32; rows.len() * k];
            w.dequantize_rows(rows.clone(), &mut d).unwrap();
            for (i, (&c, &v)) in codes.iter().zip(&d).enumerate() {
                assert!((-qmax..=qmax).contains(&c));
                assert_eq!(c as f32 * scales[i / k], v, "{bits:?} rows {rows:?} element {i}");
            }
        }
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let wf = gauss(24, 3);
        let asym =
            IntTensor::quantize(&wf, 4, 6, QuantSpec::asymmetric(Bits::B8, Granularity::PerRow), Rounding::Nearest)
                .unwrap();
        let mut y = vec![0.0; 8];
        assert!(matches!(matmul_xwt_int(&[0.0; 12], 2, &asym, &mut y), Err(QuantError::NoIntegerPath(_))));
        let w = int(&wf, 4, 6, Bits::B8);
        assert!(matmul_xwt_int(&[0.0; 11], 2, &w, &mut y).is_err());
        assert!(matmul_xwt_int(&[0.0; 12], 2, &w, &mut y[..7]).is_err());
        assert!(w.int_rows(3..5, &mut [0; 12], &mut [0.0; 2]).is_err());
    }
}

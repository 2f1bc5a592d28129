//! Matrix products with a quantized weight, for any [`QuantWeight`]: the Linear forward `y = x·Wᵀ` and the
//! input gradient `dx = dy·W` that QFT's backward needs. The weight is never dequantized as a whole: each rayon
//! task dequantizes one tile (a panel of rows for `x·Wᵀ`, a panel of columns for `dy·W`) into a per-thread f32
//! scratch and runs the `gemm` crate's f32 micro-kernels (the ones candle uses) on it, so dequantization costs
//! O(n·k) once per call and is amortized over the m activation rows. Tiles write disjoint column ranges of the
//! output, so tasks never contend. The hybrid format's outliers are part of its dequantized tile (exactly).

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::error::{check_len, Result};
use crate::weight::QuantWeight;

/// Target f32 elements per tile (1 MiB of scratch per thread). Large tiles amortize gemm's packing of the
/// activations, which it redoes for every call; on the bench shapes 2^18 beat 2^15..2^17 by 5–30% and matched
/// 2^19. Tiles are also capped at one per thread so every thread has work.
pub(crate) const TILE_ELEMS: usize = 1 << 18;

/// Output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: every task writes only its own columns of the output (see the callers).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element `offset` places further (a method, so closures capture the whole `Send` wrapper).
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Splits `n` into tiles of at most `TILE_ELEMS / depth` (at least 16), and at least one tile per thread.
pub(crate) fn tile_len(n: usize, depth: usize) -> usize {
    let by_cache = (TILE_ELEMS / depth.max(1)).max(16);
    let by_threads = n.div_ceil(rayon::current_num_threads());
    by_cache.min(by_threads).max(1)
}

/// `dst (m×cols, row stride ld) = a (m×depth, row-major) · b`, where `b` is given by its strides.
///
/// # Safety
/// `dst` must be valid for an m×cols matrix with row stride `ld`, not aliased by other writers of these cells.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    m: usize,
    cols: usize,
    depth: usize,
    dst: *mut f32,
    ld: usize,
    a: &[f32],
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
) {
    gemm(
        m,
        cols,
        depth,
        dst,
        1,
        ld as isize,
        false,
        a.as_ptr(),
        1,
        depth as isize,
        b.as_ptr(),
        b_cs as isize,
        b_rs as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// `y = x·Wᵀ`: x is m×k, W is n×k, y is m×n (row-major). The Linear layer's forward.
pub fn matmul_xwt<W: QuantWeight + ?Sized>(x: &[f32], m: usize, w: &W, y: &mut [f32]) -> Result<()> {
    let (n, k) = (w.rows(), w.cols());
    check_len("matmul_xwt x (m×k)", m * k, x.len())?;
    check_len("matmul_xwt y (m×n)", m * n, y.len())?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        y.fill(0.0);
        return Ok(());
    }
    let nb = tile_len(n, k);
    let out = OutPtr(y.as_mut_ptr());
    (0..n.div_ceil(nb)).into_par_iter().try_for_each_init(
        || vec![0.0f32; nb * k],
        |tile, t| {
            let (j0, j1) = (t * nb, ((t + 1) * nb).min(n));
            let tile = &mut tile[..(j1 - j0) * k];
            w.dequantize_rows(j0..j1, tile)?;
            // SAFETY: this task alone writes columns j0..j1 of y, which is m×n.
            unsafe { gemm_into(m, j1 - j0, k, out.at(j0), n, x, tile, 1, k) };
            Ok(())
        },
    )
}

/// `dx = dy·W`: dy is m×n, W is n×k, dx is m×k (row-major). The input gradient of `y = x·Wᵀ`.
pub fn matmul_xw<W: QuantWeight + ?Sized>(dy: &[f32], m: usize, w: &W, dx: &mut [f32]) -> Result<()> {
    let (n, k) = (w.rows(), w.cols());
    check_len("matmul_xw dy (m×n)", m * n, dy.len())?;
    check_len("matmul_xw dx (m×k)", m * k, dx.len())?;
    if m == 0 || k == 0 {
        return Ok(());
    }
    if n == 0 {
        dx.fill(0.0);
        return Ok(());
    }
    let kb = tile_len(k, n);
    let out = OutPtr(dx.as_mut_ptr());
    (0..k.div_ceil(kb)).into_par_iter().try_for_each_init(
        || vec![0.0f32; n * kb],
        |panel, t| {
            let (c0, c1) = (t * kb, ((t + 1) * kb).min(k));
            let width = c1 - c0;
            let panel = &mut panel[..n * width];
            for (r, row) in panel.chunks_exact_mut(width).enumerate() {
                w.dequantize_span(r * k + c0, row)?;
            }
            // SAFETY: this task alone writes columns c0..c1 of dx, which is m×k.
            unsafe { gemm_into(m, width, n, out.at(c0), k, dy, panel, width, 1) };
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hybrid::HybridTensor;
    use crate::nf4::Nf4Tensor;
    use crate::rng::{fill_gaussian, RngKey};
    use crate::uniform::{Bits, Granularity, IntTensor, QuantSpec};
    use crate::Rounding;

    /// Relative tolerance against the f64 product of the dequantized weight: f32 accumulation over k ≤ 300
    /// terms of O(1) values (gemm's blocked sums) stays well under 1e-5 of the output's scale.
    const MATMUL_RTOL: f64 = 1e-5;

    fn gauss(n: usize, seed: u64) -> Vec<f32> {
        let mut v = vec![0.0; n];
        fill_gaussian(&RngKey::new(seed, 0, 0), 0, &mut v);
        v
    }

    fn weights(n: usize, k: usize) -> Vec<Box<dyn QuantWeight>> {
        let w = gauss(n * k, 1);
        let r = Rounding::Nearest;
        vec![
            Box::new(IntTensor::quantize(&w, n, k, QuantSpec::symmetric(Bits::B8, Granularity::PerRow), r).unwrap()),
            Box::new(
                IntTensor::quantize(&w, n, k, QuantSpec::asymmetric(Bits::B4, Granularity::PerBlock(64)), r).unwrap(),
            ),
            Box::new(Nf4Tensor::quantize(&w, n, k, 64, true).unwrap()),
            Box::new(HybridTensor::quantize(&w, n, k, 0.01, r).unwrap()),
        ]
    }

    /// Checks both orientations against f64 products of the dequantized weight; the error is measured relative
    /// to the largest |output| (sums of random-sign terms can cancel to ~0, where a per-element relative error
    /// means nothing).
    fn check(m: usize, n: usize, k: usize) {
        let x = gauss(m * k, 2);
        let dy = gauss(m * n, 3);
        for (f, w) in weights(n, k).iter().enumerate() {
            let mut wd = vec![0.0; n * k];
            w.dequantize_into(&mut wd).unwrap();
            let mut y = vec![0.0; m * n];
            matmul_xwt(&x, m, w.as_ref(), &mut y).unwrap();
            let mut dx = vec![0.0; m * k];
            matmul_xw(&dy, m, w.as_ref(), &mut dx).unwrap();
            let y_ref: Vec<f64> = (0..m * n)
                .map(|i| (0..k).map(|d| x[(i / n) * k + d] as f64 * wd[(i % n) * k + d] as f64).sum())
                .collect();
            let dx_ref: Vec<f64> = (0..m * k)
                .map(|i| (0..n).map(|j| dy[(i / k) * n + j] as f64 * wd[j * k + i % k] as f64).sum())
                .collect();
            for (name, got, want) in [("x·Wᵀ", &y, &y_ref), ("dy·W", &dx, &dx_ref)] {
                let scale = want.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
                let err = got.iter().zip(want).fold(0.0f64, |a, (&g, &w)| a.max((g as f64 - w).abs()));
                assert!(err <= MATMUL_RTOL * scale, "format {f} {name} m={m} n={n} k={k}: err {err} vs {scale}");
            }
        }
    }

    #[test]
    fn matches_dequantized_f64_reference() {
        check(1, 40, 70); // one token
        check(5, 37, 129); // nothing a multiple of anything
        check(17, 300, 64);
    }

    #[test]
    fn tiles_cover_awkward_sizes() {
        // More rows than one tile: several tasks, a ragged last tile.
        assert_eq!(tile_len(1000, 1 << 22), 16);
        check(3, 50, TILE_ELEMS / 16 + 3);
    }

    #[test]
    fn shape_errors() {
        let w = IntTensor::quantize(
            &[1.0; 12],
            3,
            4,
            QuantSpec::symmetric(Bits::B8, Granularity::PerRow),
            Rounding::Nearest,
        )
        .unwrap();
        assert!(matmul_xwt(&[0.0; 7], 2, &w, &mut [0.0; 6]).is_err());
        assert!(matmul_xwt(&[0.0; 8], 2, &w, &mut [0.0; 5]).is_err());
        assert!(matmul_xw(&[0.0; 6], 2, &w, &mut [0.0; 7]).is_err());
        let mut y = [9.0; 6];
        matmul_xwt(&[1.0; 8], 2, &w, &mut y).unwrap();
        assert_eq!(y, [4.0; 6]);
    }
}

//! Rounding onto an integer grid: round-to-nearest, or stochastic rounding SR(y) = ⌊y⌋ + [u < y − ⌊y⌋] with u
//! drawn from the counter-based RNG at the element's index, so E[SR(y)] = y and the noise of any element can be
//! regenerated. Stochastic rounding is what lets updates much smaller than a grid step survive in expectation
//! (QFT's INT8 weights, QuZO's low-bit updates).

use crate::rng::{fill_uniform_seq, RngKey};

/// How values are rounded to the quantization grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// Round to nearest, ties to even (what `cvtps2dq` does, so SIMD and scalar paths agree bit for bit).
    Nearest,
    /// Stochastic rounding; element `i` of the tensor uses `uniform(key, i)`.
    Stochastic(RngKey),
}

/// Elements rounded per call of the inner loop: the uniforms live in a stack buffer this long.
pub(crate) const ROUND_CHUNK: usize = 256;

impl Rounding {
    /// The uniforms of elements `start .. start + buf.len()` for stochastic rounding (written into `buf`), or
    /// `None` for round-to-nearest.
    #[inline]
    pub(crate) fn uniforms<'a>(&self, start: u64, buf: &'a mut [f32]) -> Option<&'a [f32]> {
        match self {
            Rounding::Nearest => None,
            Rounding::Stochastic(key) => {
                fill_uniform_seq(key, start, buf);
                Some(buf)
            }
        }
    }
}

/// ⌊y⌋, bit for bit `f32::floor` (signed zeros, NaN and infinities included), without the libm call that
/// `floor` becomes on baseline x86-64 (no SSE4.1 `roundps`): through the integer conversion when |y| < 2^23, where
/// that is exact; larger values, infinities and NaN are their own floor.
#[inline(always)]
pub fn floor(y: f32) -> f32 {
    if y.is_nan() || y.abs() >= 8_388_608.0 {
        return y;
    }
    let t = ((y as i32) as f32).copysign(y);
    if t > y {
        t - 1.0
    } else {
        t
    }
}

/// SR(y) with an explicit uniform u ∈ [0, 1). P(round up) = y − ⌊y⌋ up to the 2^-24 resolution of u.
#[inline(always)]
pub fn stochastic_round(y: f32, u: f32) -> f32 {
    let f = floor(y);
    if u < y - f {
        f + 1.0
    } else {
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_is_libm_floor_bit_for_bit() {
        let mut ys = vec![0.0f32, -0.0, 0.5, -0.5, 1.0, -1.0, 2.5, -2.5, 1e-30, -1e-30, 8_388_607.5, -8_388_607.5];
        ys.extend([8_388_608.0, -8_388_609.0, 3e9, -3e9, f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY]);
        ys.extend((0..20_000).map(|i| (i as f32 - 10_000.0) * 0.013_7));
        for y in ys {
            assert_eq!(floor(y).to_bits(), y.floor().to_bits(), "y = {y}");
        }
        assert!(floor(f32::NAN).is_nan());
    }
    use crate::rng::uniform;

    /// Applies a rounding mode to grid values the way the quantizers do (through the fused encode kernel).
    fn round(r: Rounding, start: u64, y: &mut [f32]) {
        let mut u = [0.0; ROUND_CHUNK];
        for (c, y) in y.chunks_mut(ROUND_CHUNK).enumerate() {
            let u = r.uniforms(start + (c * ROUND_CHUNK) as u64, &mut u[..y.len()]);
            let x = y.to_vec();
            crate::simd::encode_grid(&x, None, 1.0, 0.0, 1.0, u, f32::MIN, f32::MAX, y);
        }
    }

    #[test]
    fn nearest_is_ties_to_even() {
        let mut y = [0.5, 1.5, -0.5, -1.5, 2.4999, -2.5001, 7.0];
        round(Rounding::Nearest, 0, &mut y);
        assert_eq!(y, [0.0, 2.0, -0.0, -2.0, 2.0, -3.0, 7.0]);
    }

    #[test]
    fn stochastic_uses_the_element_index() {
        let key = RngKey::new(5, 0, 0);
        let mut y = [0.3f32; 300];
        round(Rounding::Stochastic(key), 1000, &mut y);
        for (j, &v) in y.iter().enumerate() {
            let expect = stochastic_round(0.3, uniform(&key, 1000 + j as u64));
            assert_eq!(v, expect);
            assert!(v == 0.0 || v == 1.0);
        }
        // Integers are fixed points.
        let mut z = [-3.0f32, 0.0, 4.0];
        round(Rounding::Stochastic(key), 0, &mut z);
        assert_eq!(z, [-3.0, 0.0, 4.0]);
    }

    /// Unbiasedness: over n draws the mean rounding error has sd σ/sqrt(n) with σ² = f(1−f); we require it
    /// within 5σ/sqrt(n) at several n, and that it shrinks (n = 2^20 error < n = 2^12 bound).
    #[test]
    fn stochastic_rounding_is_unbiased() {
        const K_SIGMA: f64 = 5.0;
        for &y in &[0.1f32, 0.5, -0.37, 3.9, -126.01] {
            let f = (y - y.floor()) as f64;
            let sigma = (f * (1.0 - f)).sqrt();
            for &n in &[1usize << 12, 1 << 16, 1 << 20] {
                let key = RngKey::new(n as u64, 4, 9);
                let mut buf = vec![y; n];
                round(Rounding::Stochastic(key), 0, &mut buf);
                let sum: f64 = buf.iter().map(|&v| v as f64 - y as f64).sum();
                let mean_err = sum / n as f64;
                let bound = K_SIGMA * sigma / (n as f64).sqrt();
                assert!(mean_err.abs() <= bound, "y={y} n={n}: mean error {mean_err} > {bound}");
            }
        }
    }
}

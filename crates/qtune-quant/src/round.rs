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

/// Puts values onto the symmetric grid `scale·{−qmax..qmax}`: v ← clamp(R(v / scale), ±qmax)·scale, with R
/// stochastic rounding on the uniforms `r` or, without them, round to nearest (ties to even). QuZO's quantized
/// directions. Vectorized where the CPU allows; the same bits either way.
pub fn onto_grid(v: &mut [f32], r: Option<&[f32]>, scale: f32, qmax: f32) {
    crate::simd::onto_grid_f32(v, r, scale, qmax)
}

/// Moves INT8 codes on their own grid by a stochastically rounded number of steps: each code q becomes
/// clamp(q + sign·clamp(SR(ratio·u), ±254), ±127), rounding with the uniforms `r` (QuZO's perturbation on the
/// weight's grid: u the direction, ratio = ε/scale). Vectorized where the CPU allows; the same codes either way.
pub fn move_codes(q: &mut [i8], u: &[f32], r: &[f32], ratio: f32, sign: i32) {
    crate::simd::move_codes_sr(q, u, r, ratio, sign)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `onto_grid` equals its scalar definition bit for bit, with stochastic rounding and to nearest, over
    /// Gaussian values, exact grid points, values past the grid (clamped), ties, and NaN.
    #[test]
    fn onto_grid_is_the_scalar_definition() {
        let n = 10_007;
        let mut x = vec![0f32; n];
        crate::rng::fill_gaussian(&RngKey::new(7, 8, 9), 0, &mut x);
        x[1] = f32::NAN;
        x[2] = 0.25; // a grid point at scale 0.125
        x[3] = 100.0; // past the grid
        x[4] = 0.0625; // a tie at scale 0.125
        let mut r = vec![0f32; n];
        fill_uniform_seq(&RngKey::new(1, 1, 1), 0, &mut r);
        for (scale, qmax) in [(0.125f32, 7.0f32), (0.37, 127.0)] {
            for sr in [true, false] {
                let mut got = x.clone();
                onto_grid(&mut got, sr.then_some(&r[..]), scale, qmax);
                for i in 0..n {
                    let y = x[i] / scale;
                    let q = if sr { stochastic_round(y, r[i]) } else { y.round_ties_even() };
                    let want = q.clamp(-qmax, qmax) * scale;
                    assert_eq!(got[i].to_bits(), want.to_bits(), "element {i} ({}), scale {scale}, SR {sr}", x[i]);
                }
            }
        }
    }

    /// The vectorized move equals the scalar definition (stochastic_round, clamp, clamp) code for code, over
    /// ordinary values, moves past the grid's end (clamped), exact integers, tiny and huge ratios, and NaN.
    #[test]
    fn move_codes_is_the_scalar_definition() {
        let n = 10_007;
        let mut u = vec![0f32; n];
        crate::rng::fill_gaussian(&RngKey::new(1, 2, 3), 0, &mut u);
        u[5] = f32::NAN;
        u[6] = 3.0;
        let mut r = vec![0f32; n];
        fill_uniform_seq(&RngKey::new(4, 5, 6), 0, &mut r);
        let q0: Vec<i8> = (0..n).map(|i| ((i * 37) % 255) as i32 as i8).collect();
        for (ratio, sign) in [(0.37f32, 1), (0.37, -1), (1e-4, 1), (300.0, -1), (1.0, 1)] {
            let mut q = q0.clone();
            move_codes(&mut q, &u, &r, ratio, sign);
            for i in 0..n {
                let v = stochastic_round(ratio * u[i], r[i]).clamp(-254.0, 254.0) as i32;
                let want = (q0[i] as i32 + sign * v).clamp(-127, 127) as i8;
                assert_eq!(q[i], want, "element {i}, ratio {ratio}, sign {sign}");
            }
            assert_ne!(q, q0, "ratio {ratio}: nothing moved");
        }
    }

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

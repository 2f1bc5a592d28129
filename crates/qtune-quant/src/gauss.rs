//! Box–Muller in plain f32 arithmetic: the Gaussians of the Philox streams (`rng`), written out operation by
//! operation so that the scalar code, its AVX2 twin below and the CUDA kernel (`kernels/rng.cu`) compute the same
//! bits. Only IEEE operations that every target rounds the same way are used (+, −, ×, ÷, √, fused multiply-add,
//! exact integer/float conversions); no libm call, whose `logf`/`sincosf` differ between Rust, glibc and CUDA.
//! It is also 5–10× faster than libm's pair, which is what MeZO and QuZO spend regenerating their directions.
//!
//! For a block's word pair (a, b): u₁ = (a >> 8) + 1 over 2²⁴ ∈ (0, 1], t = (b >> 8) over 2²⁴ ∈ [0, 1), and
//! (z₀, z₁) = √(−2 ln u₁)·(cos 2πt, sin 2πt).
//! - ln u₁ = e·ln 2 + ln m with u₁ = m·2ᵉ, m ∈ [√½, √2); ln m = 2 atanh s = 2s(1 + s²/3 + … + s⁸/11) with
//!   s = (m − 1)/(m + 1), |s| ≤ 0.172 (the next term is below 2e-9 relative).
//! - 2πt is reduced exactly in integers: q = the nearest quarter turn, f = 4t − q ∈ [−½, ½); sin and cos of πf/2
//!   (|πf/2| ≤ π/4) are Taylor polynomials to degree 9 and 10 (next terms below 3e-9), and q's quadrant swaps and
//!   negates them.

/// ln 2 split so that e·LN2_HI is exact for |e| ≤ 2⁸ (LN2_HI has 16 significant bits).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
const SQRT2: f32 = std::f32::consts::SQRT_2;
/// 1/3, 1/5, … 1/11: the atanh series' coefficients.
const L: [f32; 5] = [1.0 / 3.0, 1.0 / 5.0, 1.0 / 7.0, 1.0 / 9.0, 1.0 / 11.0];
/// sin(πf/2) = f·(S1 + f²·(S3 + f²·(S5 + f²·(S7 + f²·S9)))).
const S: [f32; 5] = [1.570_796_4, -0.645_964_1, 0.079_692_63, -0.004_681_754, 1.604_411_8e-4];
/// cos(πf/2) = 1 + f²·(C2 + f²·(C4 + f²·(C6 + f²·(C8 + f²·C10)))).
const C: [f32; 5] = [-1.233_700_5, 0.253_669_5, -0.020_863_48, 9.192_603e-4, -2.520_204_2e-5];
/// 2⁻²⁴ and 2⁻²²: the unit and quarter-turn scales of a 24-bit word.
const U24: f32 = 1.0 / 16_777_216.0;
const Q22: f32 = 1.0 / 4_194_304.0;

/// c₀ + x·(c₁ + x·(c₂ + x·(c₃ + x·c₄))), one fused multiply-add per coefficient.
#[inline(always)]
fn horner(x: f32, c: &[f32; 5]) -> f32 {
    x.mul_add(x.mul_add(x.mul_add(x.mul_add(c[4], c[3]), c[2]), c[1]), c[0])
}

/// √(−2 ln u₁) for the word `a` (0 when u₁ = 1).
#[inline(always)]
pub(crate) fn radius(a: u32) -> f32 {
    let u = ((a >> 8) + 1) as f32 * U24;
    let bits = u.to_bits();
    let mut e = (bits >> 23) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    if m > SQRT2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let p = horner(s2, &L);
    let t = s + s;
    let ln_m = (t * s2).mul_add(p, t);
    let ef = e as f32;
    let ln = ef.mul_add(LN2_HI, ef.mul_add(LN2_LO, ln_m));
    (-2.0 * ln).sqrt()
}

/// (sin 2πt, cos 2πt) for the word `b`.
#[inline(always)]
pub(crate) fn sincos_turn(b: u32) -> (f32, f32) {
    let k = b >> 8;
    let q = (k + (1 << 21)) >> 22;
    let f = (k as i32 - (q << 22) as i32) as f32 * Q22;
    let f2 = f * f;
    let (s, c) = (f * horner(f2, &S), f2.mul_add(horner(f2, &C), 1.0));
    let (s, c) = if q & 1 == 1 { (c, s) } else { (s, c) };
    let s = if q & 2 != 0 { -s } else { s };
    let c = if (q + 1) & 2 != 0 { -c } else { c };
    (s, c)
}

/// The two Gaussians (r·cos, r·sin) of the word pair (a, b).
#[inline(always)]
pub(crate) fn pair(a: u32, b: u32) -> (f32, f32) {
    let r = radius(a);
    let (s, c) = sincos_turn(b);
    (r * c, r * s)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    //! The same operations on eight words at once.
    use super::*;
    use std::arch::x86_64::*;

    /// [`horner`] of eight values.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn horner8(x: __m256, c: &[f32; 5]) -> __m256 {
        let k = |i: usize| _mm256_set1_ps(c[i]);
        let p = _mm256_fmadd_ps(x, k(4), k(3));
        let p = _mm256_fmadd_ps(x, p, k(2));
        let p = _mm256_fmadd_ps(x, p, k(1));
        _mm256_fmadd_ps(x, p, k(0))
    }

    /// [`radius`] of eight words.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn radius8(a: __m256i) -> __m256 {
        let k1 = _mm256_add_epi32(_mm256_srli_epi32(a, 8), _mm256_set1_epi32(1));
        let u = _mm256_mul_ps(_mm256_cvtepi32_ps(k1), _mm256_set1_ps(U24));
        let bits = _mm256_castps_si256(u);
        let e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
        let m = _mm256_castsi256_ps(_mm256_or_si256(
            _mm256_and_si256(bits, _mm256_set1_epi32(0x007f_ffff)),
            _mm256_set1_epi32(0x3f80_0000),
        ));
        let big = _mm256_cmp_ps(m, _mm256_set1_ps(SQRT2), _CMP_GT_OQ);
        let m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5)), big);
        // The mask is −1 where m was halved: e − (−1) = e + 1.
        let e = _mm256_sub_epi32(e, _mm256_castps_si256(big));
        let one = _mm256_set1_ps(1.0);
        let s = _mm256_div_ps(_mm256_sub_ps(m, one), _mm256_add_ps(m, one));
        let s2 = _mm256_mul_ps(s, s);
        let c = |x: f32| _mm256_set1_ps(x);
        let p = horner8(s2, &L);
        let t = _mm256_add_ps(s, s);
        let ln_m = _mm256_fmadd_ps(_mm256_mul_ps(t, s2), p, t);
        let ef = _mm256_cvtepi32_ps(e);
        let ln = _mm256_fmadd_ps(ef, c(LN2_HI), _mm256_fmadd_ps(ef, c(LN2_LO), ln_m));
        _mm256_sqrt_ps(_mm256_mul_ps(c(-2.0), ln))
    }

    /// [`sincos_turn`] of eight words: (sin, cos).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn sincos8(b: __m256i) -> (__m256, __m256) {
        let k = _mm256_srli_epi32(b, 8);
        let q = _mm256_srli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(1 << 21)), 22);
        let f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(k, _mm256_slli_epi32(q, 22))), _mm256_set1_ps(Q22));
        let f2 = _mm256_mul_ps(f, f);
        let c = |x: f32| _mm256_set1_ps(x);
        let (s, co) = (_mm256_mul_ps(f, horner8(f2, &S)), _mm256_fmadd_ps(f2, horner8(f2, &C), c(1.0)));
        let bit = |m: i32| {
            let x = _mm256_and_si256(q, _mm256_set1_epi32(m));
            _mm256_castsi256_ps(_mm256_cmpeq_epi32(x, _mm256_set1_epi32(m)))
        };
        let odd = bit(1);
        let (s, co) = (_mm256_blendv_ps(s, co, odd), _mm256_blendv_ps(co, s, odd));
        let sign = _mm256_set1_ps(-0.0);
        let s = _mm256_xor_ps(s, _mm256_and_ps(bit(2), sign));
        let q1 = _mm256_add_epi32(q, _mm256_set1_epi32(1));
        let cneg =
            _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(q1, _mm256_set1_epi32(2)), _mm256_set1_epi32(2)));
        let co = _mm256_xor_ps(co, _mm256_and_ps(cneg, sign));
        (s, co)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    //! The same operations on sixteen words at once (AVX-512F: selections through masks).
    use super::*;
    use std::arch::x86_64::*;

    /// [`horner`] of sixteen values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn horner16(x: __m512, c: &[f32; 5]) -> __m512 {
        let k = |i: usize| _mm512_set1_ps(c[i]);
        let p = _mm512_fmadd_ps(x, k(4), k(3));
        let p = _mm512_fmadd_ps(x, p, k(2));
        let p = _mm512_fmadd_ps(x, p, k(1));
        _mm512_fmadd_ps(x, p, k(0))
    }

    /// [`radius`] of sixteen words.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn radius16(a: __m512i) -> __m512 {
        let i = _mm512_set1_epi32;
        let c = _mm512_set1_ps;
        let k1 = _mm512_add_epi32(_mm512_srli_epi32(a, 8), i(1));
        let u = _mm512_mul_ps(_mm512_cvtepi32_ps(k1), c(U24));
        let bits = _mm512_castps_si512(u);
        let e = _mm512_sub_epi32(_mm512_srli_epi32(bits, 23), i(127));
        let m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(bits, i(0x007f_ffff)), i(0x3f80_0000)));
        let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m, c(SQRT2));
        let m = _mm512_mask_mul_ps(m, big, m, c(0.5));
        let e = _mm512_mask_add_epi32(e, big, e, i(1));
        let s = _mm512_div_ps(_mm512_sub_ps(m, c(1.0)), _mm512_add_ps(m, c(1.0)));
        let s2 = _mm512_mul_ps(s, s);
        let p = horner16(s2, &L);
        let t = _mm512_add_ps(s, s);
        let ln_m = _mm512_fmadd_ps(_mm512_mul_ps(t, s2), p, t);
        let ef = _mm512_cvtepi32_ps(e);
        let ln = _mm512_fmadd_ps(ef, c(LN2_HI), _mm512_fmadd_ps(ef, c(LN2_LO), ln_m));
        _mm512_sqrt_ps(_mm512_mul_ps(c(-2.0), ln))
    }

    /// [`sincos_turn`] of sixteen words: (sin, cos).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn sincos16(b: __m512i) -> (__m512, __m512) {
        let i = _mm512_set1_epi32;
        let c = _mm512_set1_ps;
        let k = _mm512_srli_epi32(b, 8);
        let q = _mm512_srli_epi32(_mm512_add_epi32(k, i(1 << 21)), 22);
        let f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(k, _mm512_slli_epi32(q, 22))), c(Q22));
        let f2 = _mm512_mul_ps(f, f);
        let (s, co) = (_mm512_mul_ps(f, horner16(f2, &S)), _mm512_fmadd_ps(f2, horner16(f2, &C), c(1.0)));
        let odd = _mm512_test_epi32_mask(q, i(1));
        let (s, co) = (_mm512_mask_blend_ps(odd, s, co), _mm512_mask_blend_ps(odd, co, s));
        // A sign flip where q & 2 (sin) and (q + 1) & 2 (cos) are set, as the scalar code negates.
        let flip = |v: __m512, m: __mmask16| {
            let v = _mm512_castps_si512(v);
            _mm512_castsi512_ps(_mm512_mask_xor_epi32(v, m, v, i(i32::MIN)))
        };
        let s = flip(s, _mm512_test_epi32_mask(q, i(2)));
        let co = flip(co, _mm512_test_epi32_mask(_mm512_add_epi32(q, i(1)), i(2)));
        (s, co)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Box–Muller in f64 from the same words: the reference.
    fn pair64(a: u32, b: u32) -> (f64, f64) {
        let u = ((a >> 8) + 1) as f64 / 16_777_216.0;
        let t = (b >> 8) as f64 / 16_777_216.0;
        let r = (-2.0 * u.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * t).sin_cos();
        (r * c, r * s)
    }

    /// Words covering every region: the ends of both ranges, each quadrant boundary and its neighbours, each
    /// power-of-two boundary of u₁ and the √2 split, and a pseudo-random sweep.
    fn words() -> Vec<u32> {
        let mut w: Vec<u32> = vec![0, 1 << 8, u32::MAX, u32::MAX - (1 << 8)];
        for q in 0..=4u32 {
            for d in [-2i64, -1, 0, 1, 2] {
                let k = (q as i64 * (1 << 22) + (1 << 21) * (q < 4) as i64 + d).clamp(0, (1 << 24) - 1);
                w.push((k as u32) << 8);
                w.push(((q as i64 * (1 << 22) + d).clamp(0, (1 << 24) - 1) as u32) << 8);
            }
        }
        for e in 0..24 {
            for d in [-1i64, 0, 1] {
                w.push((((1i64 << e) - 1 + d).clamp(0, (1 << 24) - 1) as u32) << 8);
                let sq = (((1i64 << e) as f64 * SQRT2 as f64) as i64 - 1 + d).clamp(0, (1 << 24) - 1);
                w.push((sq as u32) << 8);
            }
        }
        let mut x = 0x1234_5678_9abc_def0u64;
        w.extend((0..200_000).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u32
        }));
        w
    }

    /// Each Gaussian within 4e-7·max(1, r) of the f64 Box–Muller of the same words (about 3 f32 ulp of the
    /// radius r ≤ 5.77; measured worst 1.6e-7 on 2026-12-06).
    #[test]
    fn matches_f64_box_muller() {
        let w = words();
        let mut worst = 0f64;
        for (i, &a) in w.iter().enumerate() {
            let b = w[(i * 7919 + 13) % w.len()];
            for (a, b) in [(a, b), (b, a)] {
                let (z0, z1) = pair(a, b);
                let (r0, r1) = pair64(a, b);
                let r = (r0 * r0 + r1 * r1).sqrt().max(1.0);
                let err = ((z0 as f64 - r0).abs()).max((z1 as f64 - r1).abs()) / r;
                assert!(err <= 4e-7, "words {a:#x} {b:#x}: ({z0}, {z1}) vs ({r0}, {r1})");
                worst = worst.max(err);
            }
        }
        eprintln!("worst error {worst:e} of max(1, r)");
    }

    /// The AVX2 twin equals the scalar code bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_equals_scalar_bit_for_bit() {
        use std::arch::x86_64::*;
        if !crate::simd::has_avx2() {
            eprintln!("skipped: no AVX2+FMA on this CPU");
            return;
        }
        for chunk in words().chunks_exact(8) {
            let mut r = [0u32; 8];
            let (mut s, mut c) = ([0f32; 8], [0f32; 8]);
            // SAFETY: AVX2+FMA are present; the arrays hold eight lanes.
            unsafe {
                let v = _mm256_loadu_si256(chunk.as_ptr() as *const __m256i);
                _mm256_storeu_ps(r.as_mut_ptr() as *mut f32, avx2::radius8(v));
                let (vs, vc) = avx2::sincos8(v);
                _mm256_storeu_ps(s.as_mut_ptr(), vs);
                _mm256_storeu_ps(c.as_mut_ptr(), vc);
            }
            for (j, &x) in chunk.iter().enumerate() {
                assert_eq!(r[j], radius(x).to_bits(), "radius of {x:#x}");
                let (ss, cc) = sincos_turn(x);
                assert_eq!((s[j].to_bits(), c[j].to_bits()), (ss.to_bits(), cc.to_bits()), "sincos of {x:#x}");
            }
        }
    }

    /// The AVX-512 twin equals the scalar code bit for bit on the same words.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_equals_scalar_bit_for_bit() {
        use std::arch::x86_64::*;
        if !crate::simd::has_avx512() {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        for chunk in words().chunks_exact(16) {
            let (mut r, mut s, mut c) = ([0u32; 16], [0f32; 16], [0f32; 16]);
            // SAFETY: AVX-512F is present; the arrays hold sixteen lanes.
            unsafe {
                let v = _mm512_loadu_si512(chunk.as_ptr() as *const __m512i);
                _mm512_storeu_ps(r.as_mut_ptr() as *mut f32, avx512::radius16(v));
                let (vs, vc) = avx512::sincos16(v);
                _mm512_storeu_ps(s.as_mut_ptr(), vs);
                _mm512_storeu_ps(c.as_mut_ptr(), vc);
            }
            for (j, &x) in chunk.iter().enumerate() {
                assert_eq!(r[j], radius(x).to_bits(), "radius of {x:#x}");
                let (ss, cc) = sincos_turn(x);
                assert_eq!((s[j].to_bits(), c[j].to_bits()), (ss.to_bits(), cc.to_bits()), "sincos of {x:#x}");
            }
        }
    }
}

//! Inner loops of quantization and dequantization, dispatched at run time: on x86-64 with AVX2+FMA the same
//! scalar code is compiled a second time with those features enabled (LLVM vectorizes it), and the nibble
//! unpacking loops that LLVM cannot vectorize well have hand-written AVX2 versions, as have the Philox streams (eight
//! blocks per step, sixteen with AVX-512F: LLVM does not vectorize them well either). Every path computes bit-for-bit
//! the same values (fused multiply-add everywhere, ties-to-even rounding), so results never depend on the CPU.
//!
//! 4-bit layout (shared by INT4 and NF4, bitsandbytes' order): element 2j is the high nibble of byte j, element
//! 2j+1 the low nibble. `phase = true` means the first element of a slice sits in the low nibble of byte 0.

#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Defines `pub(crate) fn $name` whose body is compiled twice: portable, and with AVX2+FMA enabled, picking the
/// second at run time when the CPU has it.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if $crate::simd::has_avx2() {
                    // SAFETY: the CPU supports the features `avx2` was compiled with.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// Lanes of the reductions below: independent accumulators that LLVM turns into vector registers (a single
/// running max is a serial dependency it will not vectorize without fast-math).
const LANES: usize = 16;

multiversion! {
    /// max |x| over a slice (NaN ignored).
    fn absmax(x: &[f32]) -> f32 {
        // `if a > m { a } else { m }` is exactly `maxps(a, m)`, NaN in `a` included.
        let mut acc = [0.0f32; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for (m, &v) in acc.iter_mut().zip(c) {
                let a = v.abs();
                *m = if a > *m { a } else { *m };
            }
        }
        acc.iter().chain(tail).fold(0.0f32, |m, &v| { let a = v.abs(); if a > m { a } else { m } })
    }
}

multiversion! {
    /// Whether a slice holds a NaN or an infinity (`v·0` is NaN exactly for those; summed in lanes, vectorized).
    fn has_non_finite(x: &[f32]) -> bool {
        let mut acc = [0.0f32; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += v * 0.0;
            }
        }
        acc.iter().chain(tail.iter()).any(|v| v.is_nan()) || tail.iter().any(|v| !v.is_finite())
    }
}

multiversion! {
    /// INT8 activation codes of one row: `q = clamp(round(x·inv), −lim, lim) + zero` (ties to even) as a u8.
    fn encode_acts(x: &[f32], inv: f32, lim: f32, zero: f32, out: &mut [u8]) {
        assert!(lim >= 0.0 && zero >= lim && lim + zero <= 255.0 && zero.fract() == 0.0, "codes must fit a u8");
        for (q, &v) in out.iter_mut().zip(x) {
            // `max`/`min` map NaN to a bound (the row's NaN scale carries it), so the value is an integer in
            // [0, 255] and the unchecked conversion is exact: it vectorizes, where the saturating `as` stays scalar.
            let c = (v * inv).round_ties_even().max(-lim).min(lim) + zero;
            // SAFETY: c is finite and integral, within [zero − lim, zero + lim] ⊂ [0, 255] (asserted above).
            *q = unsafe { c.to_int_unchecked::<i32>() } as u8;
        }
    }
}

multiversion! {
    /// (min, max) over a slice (NaN ignored); (0, 0) for an empty slice.
    fn min_max(x: &[f32]) -> (f32, f32) {
        let Some(&x0) = x.iter().find(|v| !v.is_nan()) else { return (0.0, 0.0) };
        let (mut lo, mut hi) = ([x0; LANES], [x0; LANES]);
        let chunks = x.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for ((l, h), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(c) {
                *l = if v < *l { v } else { *l };
                *h = if v > *h { v } else { *h };
            }
        }
        let lo = lo.iter().chain(tail).fold(x0, |m, &v| if v < m { v } else { m });
        let hi = hi.iter().chain(tail).fold(x0, |m, &v| if v > m { v } else { m });
        (lo, hi)
    }
}

multiversion! {
    /// The grid step of encoding, fused into one pass: `y = (x − (b·scale + offset))·inv` where b is the current
    /// grid index (`base`, for re-encoding relative to the current codes) or 0, rounded to nearest (ties to even)
    /// or stochastically with the uniforms `u`, then `q = clamp(b + round(y), lo, hi)`. NaN inputs end at `lo`.
    #[allow(clippy::too_many_arguments)]
    fn encode_grid(
        x: &[f32],
        base: Option<&[f32]>,
        scale: f32,
        offset: f32,
        inv: f32,
        u: Option<&[f32]>,
        lo: f32,
        hi: f32,
        q: &mut [f32],
    ) {
        let n = q.len();
        let (x, base, u) = (&x[..n], base.map(|b| &b[..n]), u.map(|u| &u[..n]));
        for i in 0..n {
            let b = base.map_or(0.0, |b| b[i]);
            let y = (x[i] - b.mul_add(scale, offset)) * inv;
            let r = match u {
                Some(u) => crate::round::stochastic_round(y, u[i]),
                None => y.round_ties_even(),
            };
            q[i] = (b + r).max(lo).min(hi);
        }
    }
}

multiversion! {
    /// Values onto the grid `scale·{−qmax..qmax}`: v ← clamp(R(v / scale), ±qmax)·scale, R stochastic rounding
    /// with the uniforms r, or ties-to-even rounding without them (`round::onto_grid`). Branch-free (the choice of
    /// rounding is per call) so LLVM vectorizes it.
    fn onto_grid_f32(v: &mut [f32], r: Option<&[f32]>, scale: f32, qmax: f32) {
        match r {
            Some(r) => v.iter_mut().zip(r).for_each(|(v, &r)| {
                let y = *v / scale;
                let f = y.floor();
                let q = if r < y - f { f + 1.0 } else { f };
                *v = q.clamp(-qmax, qmax) * scale;
            }),
            None => v.iter_mut().for_each(|v| *v = (*v / scale).round_ties_even().clamp(-qmax, qmax) * scale),
        }
    }
}

multiversion! {
    /// Codes moved on their own grid: q ← clamp(q + sign·clamp(SR(ratio·u), ±254), ±127), SR with the uniforms r
    /// (QuZO's on-grid perturbation, `round::move_codes`). Written without branches so LLVM vectorizes it; `floor`
    /// is `round::floor` bit for bit (tested there).
    fn move_codes_sr(q: &mut [i8], u: &[f32], r: &[f32], ratio: f32, sign: i32) {
        for ((q, &u), &r) in q.iter_mut().zip(u).zip(r) {
            let y = ratio * u;
            let f = y.floor();
            let v = if r < y - f { f + 1.0 } else { f };
            let v = v.clamp(-254.0, 254.0) as i32;
            *q = (*q as i32 + sign * v).clamp(-127, 127) as i8;
        }
    }
}

multiversion! {
    /// Clamped integer-valued grid values plus `add` to bytes: 8-bit codes (add 0; negative values become two's
    /// complement) or 4-bit nibble values (add the nibble zero).
    fn grid_to_bytes(q: &[f32], add: f32, out: &mut [u8]) {
        out.iter_mut().zip(q).for_each(|(o, &q)| {
            // SAFETY: `encode_grid` clamped q to the grid, so q + add is a finite integer in −127..=255.
            *o = unsafe { (q + add).to_int_unchecked::<i32>() } as u8
        });
    }
}

multiversion! {
    /// NF4 codes (0..=15) of one block's values: the number of level midpoints strictly below the scaled value,
    /// scaled as bitsandbytes does (`x·inv` for full blocks, `x/absmax` for the trailing partial block).
    fn nf4_codes(x: &[f32], mids: &[f32; 15], absmax: f32, partial: bool, codes: &mut [u8]) {
        let inv = 1.0 / absmax;
        for (c, &v) in codes.iter_mut().zip(x) {
            let v = if partial { v / absmax } else { v * inv }.clamp(-1.0, 1.0);
            *c = mids.iter().map(|&m| (m < v) as u8).sum();
        }
    }
}

multiversion! {
    /// 8-bit codes to `q·scale + offset`; `signed` reads the bytes as i8.
    fn dequant_b8(codes: &[u8], signed: bool, scale: f32, offset: f32, out: &mut [f32]) {
        if signed {
            out.iter_mut().zip(codes).for_each(|(o, &c)| *o = (c as i8 as f32).mul_add(scale, offset));
        } else {
            out.iter_mut().zip(codes).for_each(|(o, &c)| *o = (c as f32).mul_add(scale, offset));
        }
    }
}

/// Portable 4-bit dequantization: nibble u → `(u − zero)·scale + offset` (NF4 passes its table via `lut`).
#[inline(always)]
fn dequant_nibbles_scalar(bytes: &[u8], phase: bool, out: &mut [f32], f: impl Fn(u8) -> f32) {
    let mut o = 0;
    let mut b = 0;
    if phase && !out.is_empty() {
        out[0] = f(bytes[0] & 15);
        o = 1;
        b = 1;
    }
    while o + 1 < out.len() {
        out[o] = f(bytes[b] >> 4);
        out[o + 1] = f(bytes[b] & 15);
        o += 2;
        b += 1;
    }
    if o < out.len() {
        out[o] = f(bytes[b] >> 4);
    }
}

/// Uniform 4-bit codes to values: `(u − zero)·scale + offset`.
pub(crate) fn dequant_b4(bytes: &[u8], phase: bool, zero: f32, scale: f32, offset: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2+FMA are present; the kernel stays within `bytes` and `out`.
        return unsafe { avx2::dequant_nibbles(bytes, phase, out, avx2::Nibbles::Uniform { zero, scale, offset }) };
    }
    dequant_nibbles_scalar(bytes, phase, out, |u| (u as f32 - zero).mul_add(scale, offset))
}

/// NF4 codes to values: `lut[u]·absmax` (a plain product, as bitsandbytes computes it).
pub(crate) fn dequant_lut4(bytes: &[u8], phase: bool, lut: &[f32; 16], absmax: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { avx2::dequant_nibbles(bytes, phase, out, avx2::Nibbles::Lut { lut, absmax }) };
    }
    dequant_nibbles_scalar(bytes, phase, out, |u| lut[u as usize] * absmax)
}

multiversion! {
    /// Writes 4-bit codes `codes[j]` (0..=15) into the nibbles starting at `phase`, leaving the other nibble of a
    /// shared first or last byte untouched.
    fn pack_nibbles(codes: &[u8], phase: bool, bytes: &mut [u8]) {
        let (mut codes, mut bytes) = (codes, bytes);
        if phase && !codes.is_empty() {
            bytes[0] = (bytes[0] & 0xF0) | codes[0];
            (codes, bytes) = (&codes[1..], &mut bytes[1..]);
        }
        let pairs = codes.chunks_exact(2);
        let last = pairs.remainder();
        let whole = codes.len() / 2;
        for (b, p) in bytes.iter_mut().zip(pairs) {
            *b = (p[0] << 4) | p[1];
        }
        if let [c] = last {
            bytes[whole] = (bytes[whole] & 0x0F) | (c << 4);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::{philox_gaussian16, philox_gaussian8, philox_uniform16, philox_uniform8};

/// Whether the CPU has AVX-512F (with AVX2 and FMA) for the sixteen-block Philox kernels.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f") && has_avx2()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    pub(super) enum Nibbles<'a> {
        Uniform { zero: f32, scale: f32, offset: f32 },
        Lut { lut: &'a [f32; 16], absmax: f32 },
    }

    /// 16 nibbles of 8 bytes → two vectors of 8 values, in element order (high nibble first).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn unpack16(p: *const u8) -> (__m256i, __m256i) {
        let raw = _mm_loadl_epi64(p as *const __m128i);
        let lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
        let idx = _mm_unpacklo_epi8(hi, lo);
        (_mm256_cvtepu8_epi32(idx), _mm256_cvtepu8_epi32(_mm_srli_si128(idx, 8)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dequant_nibbles(bytes: &[u8], phase: bool, out: &mut [f32], kind: Nibbles) {
        let scalar = |u: u8| match &kind {
            Nibbles::Uniform { zero, scale, offset } => (u as f32 - zero).mul_add(*scale, *offset),
            Nibbles::Lut { lut, absmax } => lut[u as usize] * absmax,
        };
        let (mut o, mut b) = (0, 0);
        if phase && !out.is_empty() {
            out[0] = scalar(bytes[0] & 15);
            (o, b) = (1, 1);
        }
        // Vector body: 8 bytes → 16 values per step.
        let steps = (out.len() - o) / 16;
        match &kind {
            Nibbles::Uniform { zero, scale, offset } => {
                let (vz, vs, vo) = (_mm256_set1_ps(*zero), _mm256_set1_ps(*scale), _mm256_set1_ps(*offset));
                for s in 0..steps {
                    let (a, c) = unpack16(bytes.as_ptr().add(b + 8 * s));
                    let fa = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(a), vz), vs, vo);
                    let fc = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(c), vz), vs, vo);
                    _mm256_storeu_ps(out.as_mut_ptr().add(o + 16 * s), fa);
                    _mm256_storeu_ps(out.as_mut_ptr().add(o + 16 * s + 8), fc);
                }
            }
            Nibbles::Lut { lut, absmax } => {
                let (t0, t1) = (_mm256_loadu_ps(lut.as_ptr()), _mm256_loadu_ps(lut.as_ptr().add(8)));
                let va = _mm256_set1_ps(*absmax);
                // permutevar8x32 looks at the low 3 bits; bit 3 (moved to the sign bit) picks the table half.
                let look = |i: __m256i| {
                    let v0 = _mm256_permutevar8x32_ps(t0, i);
                    let v1 = _mm256_permutevar8x32_ps(t1, i);
                    _mm256_mul_ps(_mm256_blendv_ps(v0, v1, _mm256_castsi256_ps(_mm256_slli_epi32(i, 28))), va)
                };
                for s in 0..steps {
                    let (a, c) = unpack16(bytes.as_ptr().add(b + 8 * s));
                    _mm256_storeu_ps(out.as_mut_ptr().add(o + 16 * s), look(a));
                    _mm256_storeu_ps(out.as_mut_ptr().add(o + 16 * s + 8), look(c));
                }
            }
        }
        o += 16 * steps;
        b += 8 * steps;
        super::dequant_nibbles_scalar(&bytes[b..], false, &mut out[o..], scalar);
    }

    /// Eight Philox4x32-10 blocks at once (counters `[b lo, b hi, c2, c3]` for b = b0 .. b0+8, key `key`): word w
    /// of block b0 + j in lane j of the w-th vector.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn philox8(key: [u32; 2], c2: u32, c3: u32, b0: u64) -> [__m256i; 4] {
        let lo: [u32; 8] = std::array::from_fn(|j| (b0 + j as u64) as u32);
        let hi: [u32; 8] = std::array::from_fn(|j| ((b0 + j as u64) >> 32) as u32);
        let mut c0 = _mm256_loadu_si256(lo.as_ptr() as *const __m256i);
        let mut c1 = _mm256_loadu_si256(hi.as_ptr() as *const __m256i);
        let mut c2 = _mm256_set1_epi32(c2 as i32);
        let mut c3 = _mm256_set1_epi32(c3 as i32);
        let (mut k0, mut k1) = (key[0], key[1]);
        // 32×32→64 products of all eight lanes: even lanes directly, odd lanes shifted down; split into hi/lo.
        let mulhilo = |a: __m256i, m: u32| {
            let m = _mm256_set1_epi32(m as i32);
            let even = _mm256_mul_epu32(a, m);
            let odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
            let lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0b1010_1010);
            let hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0b1010_1010);
            (hi, lo)
        };
        for round in 0..10 {
            if round > 0 {
                k0 = k0.wrapping_add(crate::rng::PHILOX_W0);
                k1 = k1.wrapping_add(crate::rng::PHILOX_W1);
            }
            let (hi0, lo0) = mulhilo(c0, crate::rng::PHILOX_M0);
            let (hi1, lo1) = mulhilo(c2, crate::rng::PHILOX_M1);
            c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(k0 as i32));
            c1 = lo1;
            c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(k1 as i32));
            c3 = lo0;
        }
        [c0, c1, c2, c3]
    }

    /// Sixteen Philox4x32-10 blocks at once on AVX-512, the rounds of [`philox8`] on 512-bit vectors (`vpmuludq`
    /// multiplies eight 32-bit pairs per instruction, twice AVX2's): word w of block b0 + j in lane j of the w-th
    /// vector.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn philox16(key: [u32; 2], c2: u32, c3: u32, b0: u64) -> [__m512i; 4] {
        let lo: [u32; 16] = std::array::from_fn(|j| (b0 + j as u64) as u32);
        let hi: [u32; 16] = std::array::from_fn(|j| ((b0 + j as u64) >> 32) as u32);
        let mut c0 = _mm512_loadu_si512(lo.as_ptr() as *const __m512i);
        let mut c1 = _mm512_loadu_si512(hi.as_ptr() as *const __m512i);
        let mut c2 = _mm512_set1_epi32(c2 as i32);
        let mut c3 = _mm512_set1_epi32(c3 as i32);
        let (mut k0, mut k1) = (key[0], key[1]);
        let mulhilo = |a: __m512i, m: u32| {
            let m = _mm512_set1_epi32(m as i32);
            let even = _mm512_mul_epu32(a, m);
            let odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
            let lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
            let hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
            (hi, lo)
        };
        for round in 0..10 {
            if round > 0 {
                k0 = k0.wrapping_add(crate::rng::PHILOX_W0);
                k1 = k1.wrapping_add(crate::rng::PHILOX_W1);
            }
            let (hi0, lo0) = mulhilo(c0, crate::rng::PHILOX_M0);
            let (hi1, lo1) = mulhilo(c2, crate::rng::PHILOX_M1);
            c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(k0 as i32));
            c1 = lo1;
            c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(k1 as i32));
            c3 = lo0;
        }
        [c0, c1, c2, c3]
    }

    /// Stores four vectors of sixteen blocks' values block after block, as [`store_blocks8`] does for each half.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn store_blocks16(z: [__m512; 4], out: &mut [f32; 64]) {
        let lo = z.map(|v| _mm512_castps512_ps256(v));
        let hi = z.map(|v| _mm256_castsi256_ps(_mm512_extracti64x4_epi64::<1>(_mm512_castps_si512(v))));
        let (a, b) = out.split_at_mut(32);
        store_blocks8(lo, a.try_into().expect("32 values"));
        store_blocks8(hi, b.try_into().expect("32 values"));
    }

    /// Sixteen blocks' uniforms ([`philox_uniform8`]'s, sixteen blocks on): `out[4j + l]` = lane l of block b0 + j.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(crate) unsafe fn philox_uniform16(key: [u32; 2], c2: u32, c3: u32, b0: u64, out: &mut [f32; 64]) {
        let unit =
            |w: __m512i| _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8)), _mm512_set1_ps(1.0 / 16_777_216.0));
        store_blocks16(philox16(key, c2, c3, b0).map(unit), out);
    }

    /// Sixteen blocks' Gaussians ([`philox_gaussian8`]'s, on sixteen lanes: `gauss::avx512`).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(crate) unsafe fn philox_gaussian16(key: [u32; 2], c2: u32, c3: u32, b0: u64, out: &mut [f32; 64]) {
        use crate::gauss::avx512::{radius16, sincos16};
        let [w0, w1, w2, w3] = philox16(key, c2, c3, b0);
        let (r01, (s1, c1)) = (radius16(w0), sincos16(w1));
        let (r23, (s3, c3)) = (radius16(w2), sincos16(w3));
        let z = [_mm512_mul_ps(r01, c1), _mm512_mul_ps(r01, s1), _mm512_mul_ps(r23, c3), _mm512_mul_ps(r23, s3)];
        store_blocks16(z, out);
    }

    /// Stores four vectors of eight blocks' values (`u[l]` lane j = element l of block j) block after block:
    /// `out[4j + l]` (a 4×8 → 8×4 transpose).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store_blocks8(u: [__m256; 4], out: &mut [f32; 32]) {
        let t0 = _mm256_unpacklo_ps(u[0], u[1]); // b0w0 b0w1 b1w0 b1w1 | b4w0 b4w1 b5w0 b5w1
        let t1 = _mm256_unpackhi_ps(u[0], u[1]); // b2.. b3.. | b6.. b7..
        let t2 = _mm256_unpacklo_ps(u[2], u[3]);
        let t3 = _mm256_unpackhi_ps(u[2], u[3]);
        let r0 = _mm256_shuffle_ps(t0, t2, 0b01_00_01_00); // b0 | b4
        let r1 = _mm256_shuffle_ps(t0, t2, 0b11_10_11_10); // b1 | b5
        let r2 = _mm256_shuffle_ps(t1, t3, 0b01_00_01_00); // b2 | b6
        let r3 = _mm256_shuffle_ps(t1, t3, 0b11_10_11_10); // b3 | b7
        let p = out.as_mut_ptr();
        _mm256_storeu_ps(p, _mm256_permute2f128_ps(r0, r1, 0x20));
        _mm256_storeu_ps(p.add(8), _mm256_permute2f128_ps(r2, r3, 0x20));
        _mm256_storeu_ps(p.add(16), _mm256_permute2f128_ps(r0, r1, 0x31));
        _mm256_storeu_ps(p.add(24), _mm256_permute2f128_ps(r2, r3, 0x31));
    }

    /// Eight blocks' uniforms, like `rng::uniforms`, stored block after block: `out[4j + l]` = lane l of block
    /// b0 + j.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn philox_uniform8(key: [u32; 2], c2: u32, c3: u32, b0: u64, out: &mut [f32; 32]) {
        let w = philox8(key, c2, c3, b0);
        let unit =
            |w: __m256i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8)), _mm256_set1_ps(1.0 / 16_777_216.0));
        store_blocks8(w.map(unit), out);
    }

    /// Eight blocks' Gaussians, like `rng::gaussians` (the same bits: `gauss`), stored block after block.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn philox_gaussian8(key: [u32; 2], c2: u32, c3: u32, b0: u64, out: &mut [f32; 32]) {
        use crate::gauss::avx2::{radius8, sincos8};
        let [w0, w1, w2, w3] = philox8(key, c2, c3, b0);
        let (r01, (s1, c1)) = (radius8(w0), sincos8(w1));
        let (r23, (s3, c3)) = (radius8(w2), sincos8(w3));
        store_blocks8(
            [_mm256_mul_ps(r01, c1), _mm256_mul_ps(r01, s1), _mm256_mul_ps(r23, c3), _mm256_mul_ps(r23, s3)],
            out,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 and portable nibble kernels agree bit for bit, at every phase and length.
    #[test]
    fn nibble_kernels_match_scalar() {
        let bytes: Vec<u8> = (0..64u32).map(|i| (i.wrapping_mul(0x9E) ^ (i >> 1)) as u8).collect();
        let lut: [f32; 16] = std::array::from_fn(|i| (i as f32 - 7.3) / 8.1);
        for phase in [false, true] {
            for len in [0, 1, 2, 15, 16, 17, 33, 100] {
                let (mut a, mut b, mut c, mut d) = (vec![0.0; len], vec![0.0; len], vec![0.0; len], vec![0.0; len]);
                dequant_b4(&bytes, phase, 8.0, 0.37, -0.1, &mut a);
                dequant_nibbles_scalar(&bytes, phase, &mut b, |u| (u as f32 - 8.0).mul_add(0.37, -0.1));
                dequant_lut4(&bytes, phase, &lut, 1.7, &mut c);
                dequant_nibbles_scalar(&bytes, phase, &mut d, |u| lut[u as usize] * 1.7);
                assert_eq!(a, b, "uniform phase {phase} len {len}");
                assert_eq!(c, d, "lut phase {phase} len {len}");
            }
        }
    }

    #[test]
    fn pack_nibbles_keeps_neighbours() {
        let mut bytes = [0xABu8, 0xCD, 0xEF];
        pack_nibbles(&[1, 2, 3], true, &mut bytes);
        assert_eq!(bytes, [0xA1, 0x23, 0xEF]);
        pack_nibbles(&[4], false, &mut bytes[2..]);
        assert_eq!(bytes, [0xA1, 0x23, 0x4F]);
        let mut out = [0.0; 3];
        dequant_nibbles_scalar(&bytes, true, &mut out, |u| u as f32);
        assert_eq!(out, [1.0, 2.0, 3.0]);
    }

    #[test]
    fn reductions() {
        assert_eq!(absmax(&[1.0, -3.0, 2.0, f32::NAN]), 3.0);
        assert_eq!(min_max(&[1.0, -3.0, 2.0]), (-3.0, 2.0));
        let long: Vec<f32> = (0..100).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        assert_eq!(min_max(&long), (-50.0, 50.0));
        assert_eq!(absmax(&long), 50.0);
        assert_eq!(min_max(&[f32::NAN, 2.0, -1.0]), (-1.0, 2.0));
        assert_eq!(min_max(&[]), (0.0, 0.0));
    }
}

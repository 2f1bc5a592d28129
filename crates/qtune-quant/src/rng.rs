//! Counter-based random numbers (Philox4x32-10, Salmon et al. 2011): every draw is a pure function of
//! (seed, tensor id, stream id, element index), so stochastic-rounding noise and ZO directions can be regenerated
//! in any order and in parallel without being stored. That is what lets MeZO/QuZO replay a perturbation from its
//! seed, and QFT re-derive the rounding of any weight.
//!
//! Layout: element `i` reads lane `i % 4` of the Philox block at counter `[i/4 lo, i/4 hi, tensor, stream]` under key
//! `[seed lo, seed hi]`. One Philox call therefore serves four consecutive elements, and the bulk fills are
//! bit-identical to the element-wise functions whatever the chunking. Uniform and Gaussian draws of the same key
//! share bits: give them different streams.

use rayon::prelude::*;

/// Identifies one random stream: the run/step seed, the tensor it belongs to and what the draws are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RngKey {
    pub seed: u64,
    pub tensor: u32,
    pub stream: u32,
}

impl RngKey {
    pub const fn new(seed: u64, tensor: u32, stream: u32) -> Self {
        Self { seed, tensor, stream }
    }

    /// The same seed and tensor, another purpose.
    pub const fn with_stream(self, stream: u32) -> Self {
        Self { stream, ..self }
    }
}

// Stream ids used by qtune. Distinct streams are independent; reusing one for two purposes correlates them.
/// Gaussian ZO directions u ~ N(0, I) (MeZO, QuZO).
pub const STREAM_GAUSS: u32 = 0;
/// Stochastic rounding of the perturbation direction u₁ (QuZO).
pub const STREAM_SR_PERTURB: u32 = 1;
/// Stochastic rounding of the second, independent quantization u₂ used in the update (QuZO's Q-RGE2).
pub const STREAM_SR_PERTURB2: u32 = 2;
// Stream 3 is left unused (it was reserved for QuZO's update, which rounds on STREAM_SR_WEIGHT).
/// Stochastic rounding when re-encoding quantized weights after an update (QFT's Lion step, QuZO's update).
pub const STREAM_SR_WEIGHT: u32 = 4;
/// Stochastic rounding of INT8 gradients (QFT).
pub const STREAM_SR_GRAD: u32 = 5;
/// Stochastic rounding of the INT8 Lion momentum (QFT).
pub const STREAM_SR_MOMENTUM: u32 = 6;
/// Stochastic rounding of QuZO's perturbation onto the weight's own grid (its integer compute path).
pub const STREAM_SR_ONGRID: u32 = 7;

pub(crate) const PHILOX_M0: u32 = 0xD251_1F53;
pub(crate) const PHILOX_M1: u32 = 0xCD9E_8D57;
pub(crate) const PHILOX_W0: u32 = 0x9E37_79B9;
pub(crate) const PHILOX_W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds, the Random123 reference function.
#[inline]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = ctr;
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(PHILOX_W0);
            k1 = k1.wrapping_add(PHILOX_W1);
        }
        let (hi0, lo0) = mulhilo(PHILOX_M0, c0);
        let (hi1, lo1) = mulhilo(PHILOX_M1, c2);
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);
    }
    [c0, c1, c2, c3]
}

/// The four random words of block `b` (elements 4b .. 4b+3) of a stream.
#[inline]
fn block(key: &RngKey, b: u64) -> [u32; 4] {
    philox4x32_10([b as u32, (b >> 32) as u32, key.tensor, key.stream], [key.seed as u32, (key.seed >> 32) as u32])
}

/// Top 24 bits as a float in [0, 1): exact, equally spaced at 2^-24.
#[inline(always)]
fn unit(w: u32) -> f32 {
    (w >> 8) as f32 * (1.0 / 16_777_216.0)
}

#[inline]
fn uniforms(w: [u32; 4]) -> [f32; 4] {
    w.map(unit)
}

/// Box–Muller on the two word pairs of a block (`gauss`: plain f32 arithmetic, the same bits on every path and
/// device). u1 is shifted into (0, 1] so the log is finite; the largest possible |z| is sqrt(2·24·ln 2) ≈ 5.77, a
/// truncation far out in the tail (P(|z| > 5.77) ≈ 8e-9).
#[inline]
fn gaussians(w: [u32; 4]) -> [f32; 4] {
    let (z0, z1) = crate::gauss::pair(w[0], w[1]);
    let (z2, z3) = crate::gauss::pair(w[2], w[3]);
    [z0, z1, z2, z3]
}

/// Uniform draw in [0, 1) for element `i` of the stream.
#[inline]
pub fn uniform(key: &RngKey, i: u64) -> f32 {
    unit(block(key, i >> 2)[(i & 3) as usize])
}

/// Standard normal draw for element `i` of the stream.
#[inline]
pub fn gaussian(key: &RngKey, i: u64) -> f32 {
    gaussians(block(key, i >> 2))[(i & 3) as usize]
}

/// Chunk of a bulk fill handed to one rayon task; a multiple of 4 keeps Philox blocks whole inside a chunk.
const FILL_CHUNK: usize = 1 << 14;

/// What a fill produces from each Philox block.
#[derive(Clone, Copy)]
enum Draw {
    Uniform,
    Gaussian,
}

impl Draw {
    #[inline]
    fn map(self, w: [u32; 4]) -> [f32; 4] {
        match self {
            Draw::Uniform => uniforms(w),
            Draw::Gaussian => gaussians(w),
        }
    }
}

/// Draws of whole blocks `b0 ..` (4 per block): sixteen blocks per AVX-512 step, then eight per AVX2 step, where
/// the CPU has them (the same bits as the scalar blocks).
fn draw_blocks(key: &RngKey, b0: u64, out: &mut [f32], draw: Draw) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        let k = [key.seed as u32, (key.seed >> 32) as u32];
        if crate::simd::has_avx512() {
            let sixteen = match draw {
                Draw::Uniform => crate::simd::philox_uniform16,
                Draw::Gaussian => crate::simd::philox_gaussian16,
            };
            for (j, o) in out.chunks_exact_mut(64).enumerate() {
                let o: &mut [f32; 64] = o.try_into().expect("chunks of 64");
                // SAFETY: AVX-512F, AVX2 and FMA are present.
                unsafe { sixteen(k, key.tensor, key.stream, b0 + 16 * j as u64, o) };
            }
            done = out.len() / 64 * 64;
        }
        if crate::simd::has_avx2() {
            let eight = match draw {
                Draw::Uniform => crate::simd::philox_uniform8,
                Draw::Gaussian => crate::simd::philox_gaussian8,
            };
            for (j, o) in out[done..].chunks_exact_mut(32).enumerate() {
                let o: &mut [f32; 32] = o.try_into().expect("chunks of 32");
                // SAFETY: AVX2+FMA are present.
                unsafe { eight(k, key.tensor, key.stream, b0 + (done / 4 + 8 * j) as u64, o) };
            }
            done += (out.len() - done) / 32 * 32;
        }
    }
    for (j, o) in out[done..].chunks_exact_mut(4).enumerate() {
        o.copy_from_slice(&draw.map(block(key, b0 + (done / 4 + j) as u64)));
    }
}

/// Elements of a single block, from lane `start % 4` on.
fn fill_partial(key: &RngKey, start: u64, out: &mut [f32], draw: Draw) {
    if !out.is_empty() {
        let lane = (start & 3) as usize;
        out.copy_from_slice(&draw.map(block(key, start >> 2))[lane..lane + out.len()]);
    }
}

/// Fills `out` with elements `start ..` of the stream, one Philox call per four elements.
fn fill_seq(key: &RngKey, start: u64, out: &mut [f32], draw: Draw) {
    let head = ((4 - (start & 3)) & 3).min(out.len() as u64) as usize;
    let (head_out, rest) = out.split_at_mut(head);
    fill_partial(key, start, head_out, draw);
    let body = rest.len() / 4 * 4;
    let (body_out, tail_out) = rest.split_at_mut(body);
    let b0 = (start + head as u64) >> 2;
    draw_blocks(key, b0, body_out, draw);
    fill_partial(key, start + (head + body) as u64, tail_out, draw);
}

fn fill_par(key: &RngKey, start: u64, out: &mut [f32], draw: Draw) {
    if out.len() <= FILL_CHUNK {
        return fill_seq(key, start, out, draw);
    }
    out.par_chunks_mut(FILL_CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| fill_seq(key, start + (c * FILL_CHUNK) as u64, chunk, draw));
}

/// `out[j] = uniform(key, start + j)`, in parallel.
pub fn fill_uniform(key: &RngKey, start: u64, out: &mut [f32]) {
    fill_par(key, start, out, Draw::Uniform)
}

/// `out[j] = gaussian(key, start + j)`, in parallel.
pub fn fill_gaussian(key: &RngKey, start: u64, out: &mut [f32]) {
    fill_par(key, start, out, Draw::Gaussian)
}

/// Sequential uniform fill for small buffers inside already-parallel kernels (stochastic rounding, fused
/// perturbations): one Philox block per four elements, where [`uniform`] spends one per element.
pub fn fill_uniform_seq(key: &RngKey, start: u64, out: &mut [f32]) {
    fill_seq(key, start, out, Draw::Uniform)
}

/// Sequential Gaussian fill for small buffers inside already-parallel kernels; same values as [`gaussian`].
pub fn fill_gaussian_seq(key: &RngKey, start: u64, out: &mut [f32]) {
    fill_seq(key, start, out, Draw::Gaussian)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's published known-answer vectors (tests/kat_vectors).
    #[test]
    fn philox_known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    fn moments(x: &[f32]) -> (f64, f64, f64) {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let m4 = x.iter().map(|&v| (v as f64 - mean).powi(4)).sum::<f64>() / n;
        (mean, var, m4 / (var * var))
    }

    const N: usize = 1 << 18;

    /// Tolerances are ~5 standard errors of the estimator at N = 2^18 draws, so a correct generator fails
    /// with probability < 1e-6 (the seed is fixed anyway; the margin is against a broken generator passing).
    #[test]
    fn uniform_moments() {
        let mut u = vec![0.0; N];
        fill_uniform(&RngKey::new(7, 1, 2), 0, &mut u);
        let (mean, var, _) = moments(&u);
        // sd(mean) = sqrt(1/12 / N) ≈ 5.6e-4; sd(var) ≈ sqrt(1/180 / N) ≈ 1.5e-4.
        assert!((mean - 0.5).abs() < 3e-3, "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 8e-4, "var {var}");
        assert!(u.iter().all(|&v| (0.0..1.0).contains(&v)));
    }

    #[test]
    fn gaussian_moments() {
        let mut z = vec![0.0; N];
        fill_gaussian(&RngKey::new(11, 3, STREAM_GAUSS), 5, &mut z);
        let (mean, var, kurt) = moments(&z);
        // sd(mean) = 1/sqrt(N) ≈ 2e-3; sd(var) = sqrt(2/N) ≈ 2.8e-3; sd(kurtosis) = sqrt(24/N) ≈ 9.6e-3.
        assert!(mean.abs() < 1e-2, "mean {mean}");
        assert!((var - 1.0).abs() < 1.4e-2, "var {var}");
        assert!((kurt - 3.0).abs() < 5e-2, "kurtosis {kurt}");
    }

    #[test]
    fn bulk_equals_elementwise_whatever_the_chunking() {
        let key = RngKey::new(0xDEAD_BEEF_1234, 9, STREAM_SR_GRAD);
        let start = 3; // not a multiple of 4: the first block is entered mid-way
        let n = 2 * FILL_CHUNK + 7;
        let (mut u, mut z) = (vec![0.0; n], vec![0.0; n]);
        fill_uniform(&key, start, &mut u);
        fill_gaussian(&key, start, &mut z);
        for (j, (&a, &b)) in u.iter().zip(&z).enumerate() {
            assert_eq!(a.to_bits(), uniform(&key, start + j as u64).to_bits(), "uniform {j}");
            assert_eq!(b.to_bits(), gaussian(&key, start + j as u64).to_bits(), "gaussian {j}");
        }
        // Reverse order, odd chunk sizes: same values.
        let mut tail = vec![0.0; 11];
        for s in (0..n - 11).step_by(997).rev() {
            fill_uniform_seq(&key, start + s as u64, &mut tail);
            assert_eq!(&tail[..], &u[s..s + 11]);
        }
    }

    /// The sixteen-block (AVX-512) and eight-block (AVX2) kernels equal the scalar blocks bit for bit, across the
    /// counter's 32-bit carry, in every split between them (skipped parts where the CPU lacks a kernel).
    #[test]
    fn wide_kernels_equal_the_scalar_blocks() {
        let key = RngKey::new(0x0123_4567_89AB_CDEF, 3, STREAM_GAUSS);
        let b0 = (1u64 << 32) - 21;
        for draw in [Draw::Uniform, Draw::Gaussian] {
            for blocks in [16, 24, 37, 64] {
                let mut out = vec![0f32; 4 * blocks];
                draw_blocks(&key, b0, &mut out, draw);
                for (i, o) in out.chunks_exact(4).enumerate() {
                    let want = draw.map(block(&key, b0 + i as u64)).map(f32::to_bits);
                    assert_eq!([0, 1, 2, 3].map(|l| o[l].to_bits()), want, "{blocks} blocks, block {i}");
                }
            }
        }
    }

    /// Streams, tensors and seeds must give unrelated draws: the correlation of two streams over N draws has
    /// sd 1/sqrt(N) ≈ 2e-3; 1e-2 is five of those.
    #[test]
    fn different_keys_are_independent() {
        let base = RngKey::new(1, 0, STREAM_GAUSS);
        let others = [base.with_stream(STREAM_SR_PERTURB), RngKey { tensor: 1, ..base }, RngKey { seed: 2, ..base }];
        let mut a = vec![0.0; N];
        fill_gaussian(&base, 0, &mut a);
        for other in others {
            let mut b = vec![0.0; N];
            fill_gaussian(&other, 0, &mut b);
            let corr = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() / N as f64;
            assert!(corr.abs() < 1e-2, "{other:?}: correlation {corr}");
            assert_ne!(a[..8], b[..8]);
        }
    }
}

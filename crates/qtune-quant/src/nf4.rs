//! NF4 exactly as QLoRA / bitsandbytes (0.50.2, CPU) store it: the tensor is flattened, cut into blocks of 64,
//! each block scaled by its absmax and each value mapped to the nearest of the 16 normal-float levels; codes are
//! packed two per byte, even element in the high nibble. Double quantization stores the block absmax values
//! minus their mean as 8-bit codes of bitsandbytes' signed dynamic map, in blocks of 256 with one f32 absmax per
//! block, plus the f32 mean.
//!
//! Bit-exactness with bitsandbytes follows its arithmetic step by step (checked against a fixture written by
//! bitsandbytes itself, `tests/fixtures/nf4_bnb.safetensors`):
//! - 4-bit codes (torch path): `v = clamp(x · (1/absmax), −1, 1)` for full blocks, `x / absmax` for a trailing
//!   partial block (whose stored absmax is clamped to ≥ 1e-38), code = number of level midpoints
//!   `(c[i] + c[i+1]) / 2` strictly below v (`torch.bucketize`, ties to the lower level);
//! - 8-bit absmax codes (bitsandbytes' C++ CPU kernel): a 65536-entry table over [−1, 1] holds the nearest
//!   dynamic-map entry of each bin, indexed by `⌊((v + 1)·0.5)·65535 + 0.5⌋` — an approximation of the nearest
//!   entry near 0 that we reproduce rather than "fix";
//! - the offset is torch's float32 `mean` (see [`torch_mean_f32`]).

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::error::{check_len, check_shape, QuantError, Result};
use crate::simd;
use crate::uniform::for_each_group_run;
use crate::weight::{check_dequant_span, QuantBytes, QuantWeight};

/// The 16 NF4 levels, the float32 values of bitsandbytes' `create_normal_map()`, written as bitsandbytes'
/// source writes them (the extra digits round to exactly these f32 values; the fixture test checks the bits).
#[allow(clippy::excessive_precision)]
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// Decision boundaries between adjacent levels, computed in f32 as bitsandbytes does.
const NF4_MIDS: [f32; 15] = {
    let mut m = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        m[i] = (NF4_LEVELS[i] + NF4_LEVELS[i + 1]) / 2.0;
        i += 1;
    }
    m
};

/// bitsandbytes' `create_dynamic_map(signed=True)` (float32 bits): sign, a run of zero bits as a decimal
/// exponent, an indicator bit and a linear fraction; sorted, from −0.99297 to 1.0, with an exact 0 at index 127.
#[rustfmt::skip]
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The signed dynamic map as floats.
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP_BITS.map(f32::from_bits)
}

/// Elements per NF4 block (QLoRA's default).
pub const NF4_BLOCK: usize = 64;
/// Absmax values per double-quantization block.
pub const DQ_BLOCK: usize = 256;
/// bitsandbytes clamps absmax to this before taking its inverse, so all-zero blocks do not divide by zero.
const ABSMAX_FLOOR: f32 = 1e-38;

/// bitsandbytes' 8-bit quantization table: bin i of 65536 over [−1, 1] → index of the first dynamic-map entry
/// whose midpoint with the next one is not below the bin's value.
fn dynamic_lut() -> &'static [u8; 65536] {
    static LUT: OnceLock<Box<[u8; 65536]>> = OnceLock::new();
    LUT.get_or_init(|| {
        let code = dynamic_map();
        let mids: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut lut = Box::new([0u8; 65536]);
        let mut c = 0;
        for (i, slot) in lut.iter_mut().enumerate() {
            let val = -1.0f32 + (2.0f32 * i as f32) / 65535.0;
            while c < mids.len() && mids[c] < val {
                c += 1;
            }
            *slot = c as u8;
        }
        lut
    })
}

/// Double-quantized block constants.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    /// One dynamic-map code per NF4 block.
    pub codes: Vec<u8>,
    /// One f32 absmax per [`DQ_BLOCK`] codes.
    pub absmax2: Vec<f32>,
    /// Mean of the original absmax values, added back on dequantization.
    pub offset: f32,
}

impl DoubleQuant {
    /// Quantizes NF4 block absmax values as bitsandbytes' `quantize_4bit(compress_statistics=True)` does.
    pub fn quantize(absmax: &[f32]) -> Self {
        let offset = torch_mean_f32(absmax);
        let lut = dynamic_lut();
        let mut codes = vec![0u8; absmax.len()];
        let absmax2 = absmax
            .chunks(DQ_BLOCK)
            .zip(codes.chunks_mut(DQ_BLOCK))
            .map(|(a, c)| {
                let am = a.iter().fold(0.0f32, |m, &v| m.max((v - offset).abs()));
                if am != 0.0 {
                    let inv = 1.0 / am;
                    for (c, &v) in c.iter_mut().zip(a) {
                        let v = ((v - offset) * inv).clamp(-1.0, 1.0);
                        *c = lut[((v + 1.0) * 0.5 * 65535.0 + 0.5) as usize];
                    }
                }
                am
            })
            .collect();
        DoubleQuant { codes, absmax2, offset }
    }

    /// The absmax of NF4 block `b`: `map[code]·absmax2 + offset`, rounded after each operation like bitsandbytes.
    #[inline]
    pub fn absmax(&self, b: usize) -> f32 {
        f32::from_bits(DYNAMIC_MAP_BITS[self.codes[b] as usize]) * self.absmax2[b / DQ_BLOCK] + self.offset
    }
}

/// How the per-block absmax values are stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Nf4Scales {
    Plain(Vec<f32>),
    Double(DoubleQuant),
}

/// A rows×cols matrix in NF4 (flat blocks over the row-major order, like bitsandbytes).
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    rows: usize,
    cols: usize,
    block: usize,
    codes: Vec<u8>,
    scales: Nf4Scales,
}

impl Nf4Tensor {
    /// Exact storage of `n` elements at block `block`, computed from the shape alone (the memory planner's count;
    /// equal to `storage_bytes` of the quantized tensor): packed codes, and the block absmax in f32 or, double
    /// quantized, as one byte each plus an f32 per [`DQ_BLOCK`] blocks and the offset.
    pub fn planned_bytes(n: usize, block: usize, double_quant: bool) -> QuantBytes {
        let blocks = n.div_ceil(block.max(1));
        let scales = if double_quant { blocks + 4 * blocks.div_ceil(DQ_BLOCK) + 4 } else { 4 * blocks };
        QuantBytes { codes: n.div_ceil(2), scales, ..Default::default() }
    }

    /// Quantizes with blocks of `block` elements (bitsandbytes/QLoRA: 64), optionally double-quantizing the
    /// block absmax values.
    pub fn quantize(data: &[f32], rows: usize, cols: usize, block: usize, double_quant: bool) -> Result<Self> {
        check_len("nf4 input", check_shape(rows, cols)?, data.len())?;
        if block == 0 || block % 2 == 1 {
            return Err(QuantError::InvalidBlockSize {
                block,
                reason: "NF4 blocks must hold an even number of elements",
            });
        }
        let n = data.len();
        let mut codes = vec![0u8; n.div_ceil(2)];
        let mut absmax = vec![0.0f32; n.div_ceil(block)];
        // Tasks of whole blocks; even block length keeps each task's bytes to itself.
        let per_task = block * (1usize << 15).div_ceil(block);
        codes
            .par_chunks_mut(per_task / 2)
            .zip(absmax.par_chunks_mut(per_task / block))
            .zip(data.par_chunks(per_task))
            .for_each(|((codes, absmax), x)| {
                let mut buf = [0u8; 256];
                for ((x, am), codes) in x.chunks(block).zip(absmax.iter_mut()).zip(codes.chunks_mut(block / 2)) {
                    *am = encode_block(x, x.len() < block, codes, &mut buf);
                }
            });
        if n % 2 == 1 {
            // bitsandbytes pads an odd count with 0.0, whose code (7) fills the last low nibble.
            codes[n / 2] |= 7;
        }
        let scales =
            if double_quant { Nf4Scales::Double(DoubleQuant::quantize(&absmax)) } else { Nf4Scales::Plain(absmax) };
        Ok(Nf4Tensor { rows, cols, block, codes, scales })
    }

    pub fn block_len(&self) -> usize {
        self.block
    }

    /// Packed codes, two per byte, even element in the high nibble.
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    pub fn scales(&self) -> &Nf4Scales {
        &self.scales
    }

    /// The (dequantized) absmax of block `b`.
    #[inline]
    pub fn block_absmax(&self, b: usize) -> f32 {
        match &self.scales {
            Nf4Scales::Plain(a) => a[b],
            Nf4Scales::Double(dq) => dq.absmax(b),
        }
    }
}

/// Encodes one block into `codes` (its packed bytes) and returns the absmax bitsandbytes stores for it. `buf`
/// is scratch for unpacked codes.
fn encode_block(x: &[f32], partial: bool, codes: &mut [u8], buf: &mut [u8; 256]) -> f32 {
    let am = simd::absmax(x);
    let safe = am.max(ABSMAX_FLOOR);
    for (x, bytes) in x.chunks(256).zip(codes.chunks_mut(128)) {
        let buf = &mut buf[..x.len()];
        simd::nf4_codes(x, &NF4_MIDS, safe, partial, buf);
        simd::pack_nibbles(buf, false, bytes);
    }
    if partial {
        safe
    } else {
        am
    }
}

impl QuantWeight for Nf4Tensor {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn dequantize_span(&self, start: usize, out: &mut [f32]) -> Result<()> {
        check_dequant_span(self, start, out.len())?;
        let mut at = start;
        for_each_group_run(start, out.len(), self.block, |b, run| {
            let o = &mut out[at - start..at - start + run];
            simd::dequant_lut4(&self.codes[at / 2..], at % 2 == 1, &NF4_LEVELS, self.block_absmax(b), o);
            at += run;
        });
        Ok(())
    }

    fn storage_bytes(&self) -> QuantBytes {
        let scales = match &self.scales {
            Nf4Scales::Plain(a) => 4 * a.len(),
            Nf4Scales::Double(dq) => dq.codes.len() + 4 * dq.absmax2.len() + 4,
        };
        QuantBytes { codes: self.codes.len(), scales, ..Default::default() }
    }
}

/// torch's float32 `Tensor.mean()` on a contiguous CPU tensor, operation for operation (ATen `SumKernel.cpp`
/// cascade sum with 8-lane AVX2 vectors and 4 interleaved accumulators, then `sum / n` in f32). bitsandbytes'
/// double-quantization offset is this mean, and every double-quantized code depends on its exact bits. Exact for
/// up to 32768 elements (2M-element tensors at block 64); beyond that torch may split the sum across threads.
pub fn torch_mean_f32(x: &[f32]) -> f32 {
    const LANES: usize = 8;
    if x.is_empty() {
        return f32::NAN;
    }
    let sum = if x.len() < LANES {
        row_sum(x, 1, x.len())[0]
    } else {
        let vecs = x.len() / LANES;
        let acc = row_sum(x, LANES, vecs);
        let tail = x[vecs * LANES..].iter().fold(0.0f32, |s, &v| s + v);
        acc.iter().fold(tail, |s, &v| s + v)
    };
    sum / x.len() as f32
}

/// ATen `row_sum`: `size` items of `width` lanes, 4 interleaved accumulators, the rest into the first.
fn row_sum(x: &[f32], width: usize, size: usize) -> Vec<f32> {
    const ILP: usize = 4;
    let item = |i: usize| &x[i * width..(i + 1) * width];
    let size_ilp = size / ILP;
    let mut acc = multi_row_sum(x, width, ILP, size_ilp);
    for i in size_ilp * ILP..size {
        add_lanes(&mut acc[0], item(i));
    }
    let (first, rest) = acc.split_at_mut(1);
    for r in rest.iter() {
        add_lanes(&mut first[0], r);
    }
    acc.swap_remove(0)
}

/// ATen `multi_row_sum`: `nrows` accumulators over `size` steps, cascaded through 4 levels.
fn multi_row_sum(x: &[f32], width: usize, nrows: usize, size: usize) -> Vec<Vec<f32>> {
    const LEVELS: usize = 4;
    let level_power = 4.max(ceil_log2(size) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = vec![vec![vec![0.0f32; width]; nrows]; LEVELS];
    let item = |i: usize, k: usize| &x[(i * nrows + k) * width..(i * nrows + k + 1) * width];
    // One step: accumulator k of level 0 takes item (i, k).
    let step = |acc: &mut [Vec<f32>], i: usize| {
        for (k, a) in acc.iter_mut().enumerate() {
            add_lanes(a, item(i, k));
        }
    };
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            step(&mut acc[0], i);
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (up, low) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                add_lanes(up, low);
                low.fill(0.0);
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        step(&mut acc[0], i);
        i += 1;
    }
    let mut top = acc.remove(0);
    for level in &acc {
        for (t, l) in top.iter_mut().zip(level) {
            add_lanes(t, l);
        }
    }
    top
}

fn add_lanes(acc: &mut [f32], v: &[f32]) {
    acc.iter_mut().zip(v).for_each(|(a, &v)| *a += v);
}

/// c10's `CeilLog2` (1 for x ≤ 2).
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{fill_gaussian, RngKey};

    #[test]
    fn tables_are_bitsandbytes_ones() {
        let bits: Vec<u32> = NF4_LEVELS.iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits[..4], [0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0]);
        assert_eq!(bits[8..12], [0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a]);
        let d = dynamic_map();
        assert!(d.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((d[0], d[127], d[255]), (-0.99296874, 0.0, 1.0));
        // The table's bins are 3e-5 wide, coarser than the map near 0: a value just below 0 gets −2.1e-5
        // (index 123) and 0 itself +2.1e-5 (131), exactly as bitsandbytes' CPU kernel quantizes them.
        let lut = dynamic_lut();
        assert_eq!((lut[0], lut[32767], lut[32768], lut[65535]), (0, 123, 131, 255));
    }

    /// f64 reference: nearest level, on the same f32 scaled value.
    #[test]
    fn codes_are_nearest_levels() {
        let mut x = vec![0.0; 64 * 40 + 10];
        fill_gaussian(&RngKey::new(1, 0, 0), 0, &mut x);
        // Exact midpoints and levels inside a block whose absmax is 1.
        x[..15].copy_from_slice(&NF4_MIDS);
        x[15] = 1.0;
        x[16..32].copy_from_slice(&NF4_LEVELS);
        x[32..64].iter_mut().for_each(|v| *v = v.clamp(-0.99, 0.99));
        let t = Nf4Tensor::quantize(&x, 1, x.len(), NF4_BLOCK, false).unwrap();
        for (b, blk) in x.chunks(NF4_BLOCK).enumerate() {
            let am = blk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (j, &v) in blk.iter().enumerate() {
                let i = b * NF4_BLOCK + j;
                let s = if blk.len() < NF4_BLOCK { v / am } else { v * (1.0 / am) } as f64;
                // A value exactly on an (f32) midpoint goes to the lower level, elsewhere the nearest one.
                let best = match NF4_MIDS.iter().position(|&m| m as f64 == s) {
                    Some(j) => j,
                    None => (0..16)
                        .min_by(|&p, &q| {
                            let (dp, dq) = ((s - NF4_LEVELS[p] as f64).abs(), (s - NF4_LEVELS[q] as f64).abs());
                            dp.partial_cmp(&dq).unwrap()
                        })
                        .unwrap(),
                };
                let code = (t.codes[i / 2] >> if i.is_multiple_of(2) { 4 } else { 0 }) & 15;
                assert_eq!(code as usize, best, "element {i}, scaled {s}");
            }
        }
        // Dequantization gives level × absmax.
        let mut y = vec![0.0; x.len()];
        t.dequantize_into(&mut y).unwrap();
        assert_eq!(y[16..32], NF4_LEVELS.map(|v| v * t.block_absmax(0)));
    }

    /// NF4 round trip: within half the widest level gap (between −1 and −0.696: 0.152 of the block absmax).
    #[test]
    fn round_trip_error_budget() {
        const NF4_BUDGET: f64 = (1.0 - 0.6961928009986877) / 2.0 + 1e-6;
        let mut x = vec![0.0; 64 * 33];
        fill_gaussian(&RngKey::new(2, 0, 0), 0, &mut x);
        for dq in [false, true] {
            let t = Nf4Tensor::quantize(&x, 33, 64, NF4_BLOCK, dq).unwrap();
            let mut y = vec![0.0; x.len()];
            t.dequantize_into(&mut y).unwrap();
            for (b, (xb, yb)) in x.chunks(64).zip(y.chunks(64)).enumerate() {
                let am = xb.iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
                // Double quantization perturbs the absmax itself by at most half a dynamic-map step (≤ 0.7%).
                let slack = if dq { 0.008 } else { 0.0 };
                for (&a, &c) in xb.iter().zip(yb) {
                    assert!(((a - c) as f64).abs() <= (NF4_BUDGET + slack) * am, "block {b}: {a} vs {c}");
                }
            }
        }
    }

    #[test]
    fn storage_and_errors() {
        // An odd count: the padding nibble is code(0.0) = 7, as bitsandbytes pads with 0.0.
        let odd = Nf4Tensor::quantize(&[1.0, -1.0, 0.5], 1, 3, NF4_BLOCK, false).unwrap();
        assert_eq!(odd.codes(), &[0xF0, 0xC7]);
        let x = vec![0.5f32; 64 * 512];
        let plain = Nf4Tensor::quantize(&x, 512, 64, NF4_BLOCK, false).unwrap().storage_bytes();
        assert_eq!((plain.codes, plain.scales), (16384, 512 * 4));
        let dq = Nf4Tensor::quantize(&x, 512, 64, NF4_BLOCK, true).unwrap().storage_bytes();
        assert_eq!((dq.codes, dq.scales), (16384, 512 + 2 * 4 + 4));
        assert_eq!(Nf4Tensor::planned_bytes(64 * 512, NF4_BLOCK, false), plain);
        assert_eq!(Nf4Tensor::planned_bytes(64 * 512, NF4_BLOCK, true), dq);
        let odd = Nf4Tensor::quantize(&x[..130], 1, 130, NF4_BLOCK, true).unwrap().storage_bytes();
        assert_eq!(Nf4Tensor::planned_bytes(130, NF4_BLOCK, true), odd);
        assert!(Nf4Tensor::quantize(&x, 1, 10, NF4_BLOCK, true).is_err());
        assert!(matches!(Nf4Tensor::quantize(&x[..6], 2, 3, 3, false), Err(QuantError::InvalidBlockSize { .. })));
        // All-zero blocks read back as zeros, double-quantized or not.
        let z = Nf4Tensor::quantize(&[0.0; 130], 1, 130, NF4_BLOCK, true).unwrap();
        let mut y = vec![1.0; 130];
        z.dequantize_into(&mut y).unwrap();
        assert!(y.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn torch_mean_small_cases() {
        assert_eq!(torch_mean_f32(&[1.0, 2.0, 3.0]), 2.0);
        assert_eq!(torch_mean_f32(&[0.5; 1000]), 0.5);
        assert_eq!(ceil_log2(1), 1);
        assert_eq!(ceil_log2(16), 4);
        assert_eq!(ceil_log2(17), 5);
    }
}

//! QFT's INT8 block arrays ([`Int8Blocks`]): a flat f32 array (a gradient, Lion's momentum) stored as symmetric
//! INT8 in blocks of 256 with one absmax scale each, held in pieces of 2¹⁶ elements so it is read and rewritten
//! piece by piece with bounded scratch, summed over ranks from its codes, and saved in checkpoints.
use crate::checkpoint::{StateReader, StateWriter};
use crate::model::quantized::quant_err;
use crate::{Error, Result};
use qtune_quant::rng::RngKey;
use qtune_quant::{Bits, Granularity, IntTensor, QuantSpec, QuantWeight, Rounding};

/// Elements per piece of an [`Int8Blocks`]: a multiple of the block, so pieces never split a block.
pub const PIECE: usize = 1 << 16;
/// Elements per scale of an [`Int8Blocks`].
pub const BLOCK: usize = 256;

/// A flat f32 array stored INT8 block-wise (symmetric absmax, blocks of 256), in pieces of [`PIECE`] elements so it
/// can be read and rewritten piece by piece with bounded scratch. Gradients and Lion's momentum use it.
#[derive(Clone, Debug)]
pub struct Int8Blocks {
    pieces: Vec<IntTensor>,
    len: usize,
}

impl Int8Blocks {
    const SPEC: QuantSpec = QuantSpec::symmetric(Bits::B8, Granularity::PerBlock(BLOCK));

    /// Quantizes `data` with stochastic rounding keyed by `key` (the piece index is folded into the seed).
    pub fn quantize(data: &[f32], key: RngKey) -> Result<Self> {
        let pieces = data
            .chunks(PIECE)
            .enumerate()
            .map(|(p, d)| IntTensor::quantize(d, 1, d.len(), Self::SPEC, Self::rounding(key, p)).map_err(quant_err))
            .collect::<Result<_>>()?;
        Ok(Int8Blocks { pieces, len: data.len() })
    }

    pub fn zeros(len: usize) -> Result<Self> {
        Self::quantize(&vec![0.0; len], RngKey::new(0, 0, 0))
    }

    fn rounding(key: RngKey, piece: usize) -> Rounding {
        Rounding::Stochastic(RngKey { seed: key.seed ^ (piece as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15), ..key })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Dequantizes elements `start .. start + out.len()` (may span pieces).
    pub fn dequantize_span(&self, start: usize, out: &mut [f32]) -> Result<()> {
        let mut done = 0;
        while done < out.len() {
            let i = start + done;
            let (p, off) = (i / PIECE, i % PIECE);
            let take = (PIECE - off).min(out.len() - done);
            self.pieces[p].dequantize_span(off, &mut out[done..done + take]).map_err(quant_err)?;
            done += take;
        }
        Ok(())
    }

    /// Rewrites every piece through `f(start, values)` (dequantized in, new values out), re-quantizing each with
    /// fresh block scales and stochastic rounding. Returns Σ new². Scratch: one piece.
    pub fn rewrite(&mut self, key: RngKey, mut f: impl FnMut(usize, &mut [f32]) -> Result<()>) -> Result<f64> {
        let mut buf = vec![0f32; PIECE.min(self.len)];
        let mut sumsq = 0f64;
        for (p, piece) in self.pieces.iter_mut().enumerate() {
            let n = piece.len();
            let b = &mut buf[..n];
            piece.dequantize_span(0, b).map_err(quant_err)?;
            f(p * PIECE, b)?;
            sumsq += b.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
            piece.recalibrate(b, Self::rounding(key, p)).map_err(quant_err)?;
        }
        Ok(sumsq)
    }

    pub fn bytes(&self) -> usize {
        self.pieces.iter().map(|p| p.storage_bytes().total()).sum()
    }

    /// Rebuilds the pieces from [`Int8Blocks::parts`]' arrays (a state kept elsewhere, e.g. on a GPU).
    pub fn from_parts(codes: &[u8], scales: &[f32]) -> Result<Self> {
        let len = codes.len();
        if scales.len() != len.div_ceil(BLOCK) {
            return Err(Error::Msg(format!("INT8 blocks: {len} codes with {} scales", scales.len())));
        }
        let pieces = (0..len.div_ceil(PIECE))
            .map(|p| {
                let (a, b) = (p * PIECE, ((p + 1) * PIECE).min(len));
                let s = &scales[a / BLOCK..b.div_ceil(BLOCK)];
                IntTensor::from_raw(1, b - a, Self::SPEC, codes[a..b].to_vec(), s.to_vec(), None).map_err(quant_err)
            })
            .collect::<Result<_>>()?;
        Ok(Int8Blocks { pieces, len })
    }

    /// The codes and the scales of all pieces, concatenated: element i's code is `codes[i]` (an i8), its scale
    /// `scales[i / 256]` (pieces hold whole blocks, so the pieces' blocks are the array's). The GPU's layout.
    pub fn parts(&self) -> (Vec<u8>, Vec<f32>) {
        let codes = self.pieces.iter().flat_map(|p| p.codes().iter().copied()).collect();
        let scales = self.pieces.iter().flat_map(|p| p.scales().iter().copied()).collect();
        (codes, scales)
    }

    /// Sums the array over the ranks (`crate::dist`): every rank's INT8 codes and block scales travel (1 + 4/256
    /// bytes an element, about a quarter of f32), are dequantized and added in rank order in f32 (a sum of INT8
    /// codes with different scales, or of many ranks, does not fit INT8), and the sum is re-quantized with
    /// stochastic rounding keyed by `key`, the same on every rank, so every rank keeps the same codes. Returns
    /// Σ sum² (before the re-quantization, as [`Int8Blocks::rewrite`] counts it).
    pub fn all_reduce(&mut self, key: RngKey) -> Result<f64> {
        self.all_reduce_grouped(key, 256)
    }

    /// [`Int8Blocks::all_reduce`], gathering `per_group` pieces at a time (256: 16 MiB of codes), so the transient memory
    /// is one copy of this rank's codes and scales (taken before the rewrite replaces them) and ranks × a group.
    fn all_reduce_grouped(&mut self, key: RngKey, per_group: usize) -> Result<f64> {
        let codes: Vec<u8> = self.pieces.iter().flat_map(|p| p.codes().iter().copied()).collect();
        let scales: Vec<f32> = self.pieces.iter().flat_map(|p| p.scales().iter().copied()).collect();
        let mut group: Option<(usize, Vec<u8>, Vec<f32>)> = None;
        let mut other = vec![0f32; PIECE.min(self.len)];
        let len = self.len;
        self.rewrite(key, |start, v| {
            let p = start / PIECE;
            if group.as_ref().is_none_or(|g| p >= g.0 + per_group) {
                let (a, b) = (start, ((p + per_group) * PIECE).min(len));
                let (sa, sb) = (a / BLOCK, b.div_ceil(BLOCK));
                group = Some((p, crate::dist::gather_bytes(&codes[a..b])?, crate::dist::gather_f32(&scales[sa..sb])?));
            }
            let (first, all_codes, all_scales) = group.as_ref().expect("gathered");
            // Offsets within the group, and the group's length per rank.
            let (at, n) = (start - first * PIECE, all_codes.len() / crate::dist::world().size());
            let ns = all_scales.len() / crate::dist::world().size();
            for r in 0..crate::dist::world().size() {
                let c = &all_codes[r * n + at..r * n + at + v.len()];
                let sc = all_scales[r * ns + at / BLOCK..r * ns + (at + v.len()).div_ceil(BLOCK)].to_vec();
                let piece = IntTensor::from_raw(1, v.len(), Self::SPEC, c.to_vec(), sc, None).map_err(quant_err)?;
                let o = &mut other[..v.len()];
                piece.dequantize_span(0, o).map_err(quant_err)?;
                if r == 0 {
                    v.copy_from_slice(o);
                } else {
                    v.iter_mut().zip(o.iter()).for_each(|(a, b)| *a += b);
                }
            }
            Ok(())
        })
    }

    /// [`Int8Blocks::bytes`] of an array of `len` elements, from its length alone (the memory planner's count).
    pub fn planned_bytes(len: usize) -> Result<usize> {
        (0..len.div_ceil(PIECE))
            .map(|p| Ok(Self::SPEC.planned_bytes(1, PIECE.min(len - p * PIECE)).map_err(quant_err)?.total()))
            .sum()
    }

    pub fn save(&self, w: &mut StateWriter, prefix: &str) {
        for (p, piece) in self.pieces.iter().enumerate() {
            w.u8(&format!("{prefix}.{p}.codes"), piece.codes());
            w.f32(&format!("{prefix}.{p}.scales"), piece.scales());
        }
    }

    /// Reads what [`Int8Blocks::save`] wrote for an array of `len` elements.
    pub fn load(r: &StateReader, prefix: &str, len: usize) -> Result<Self> {
        let pieces = (0..len.div_ceil(PIECE))
            .map(|p| {
                let n = PIECE.min(len - p * PIECE);
                IntTensor::from_raw(
                    1,
                    n,
                    Self::SPEC,
                    r.u8(&format!("{prefix}.{p}.codes"))?,
                    r.f32(&format!("{prefix}.{p}.scales"))?,
                    None,
                )
                .map_err(|e| Error::file(r.path(), format!("`{prefix}` piece {p}: {e}")))
            })
            .collect::<Result<_>>()?;
        Ok(Int8Blocks { pieces, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qtune_quant::rng::{fill_gaussian, STREAM_SR_GRAD};

    fn gauss(n: usize, seed: u64) -> Vec<f32> {
        let mut v = vec![0f32; n];
        fill_gaussian(&RngKey::new(seed, 0, 0), 0, &mut v);
        v
    }

    /// INT8 block round trip: stochastic rounding leaves each element within one step of its block (absmax/127),
    /// budget 1.0001 steps for f32 slack.
    #[test]
    fn int8_blocks_round_trip_within_half_a_step() {
        let n = 2 * PIECE + 1000;
        let x = gauss(n, 3);
        let q = Int8Blocks::quantize(&x, RngKey::new(1, 0, 0)).unwrap();
        let mut y = vec![0f32; n];
        q.dequantize_span(0, &mut y).unwrap();
        for (b, (xs, ys)) in x.chunks(BLOCK).zip(y.chunks(BLOCK)).enumerate() {
            let step = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, c) in xs.iter().zip(ys) {
                // Stochastic rounding moves a value by less than one step.
                assert!((a - c).abs() <= step * 1.0001, "block {b}: {a} vs {c} (step {step})");
            }
        }
        assert_eq!(q.bytes(), n + 4 * n.div_ceil(BLOCK));
    }

    /// In a world of one, summing over the ranks is a re-quantization of the array's own values: the same bits as
    /// `rewrite` with nothing changed, whatever the gathering group (2 pieces: the last group is partial).
    #[test]
    fn all_reduce_in_groups_of_pieces_is_a_rewrite_on_one_rank() {
        let data: Vec<f32> = (0..5 * PIECE + 300).map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i % 7) as f32)).collect();
        let key = RngKey::new(9, 1, STREAM_SR_GRAD);
        let mut a = Int8Blocks::quantize(&data, key).unwrap();
        let mut b = a.clone();
        let sa = a.all_reduce_grouped(RngKey::new(5, 2, STREAM_SR_GRAD), 2).unwrap();
        let sb = b.rewrite(RngKey::new(5, 2, STREAM_SR_GRAD), |_, _| Ok(())).unwrap();
        assert_eq!(sa.to_bits(), sb.to_bits());
        let (mut x, mut y) = (vec![0f32; data.len()], vec![0f32; data.len()]);
        a.dequantize_span(0, &mut x).unwrap();
        b.dequantize_span(0, &mut y).unwrap();
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}

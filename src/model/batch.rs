//! What a batch is: its token rows, right-padded and packed ([`Batch`], [`Packing`]), and what its loss reads
//! ([`Targets`]: the next-token positions and, for classification and multiple choice, the answer tokens).
use super::layers;
use crate::Result;
use candle_core::Tensor;

/// What the loss reads: the next-token distribution at some positions of a right-padded batch.
#[derive(Clone, Debug, Default)]
pub struct Targets {
    /// Flat indices `b·T + t` of the positions whose next-token logits the loss reads.
    pub positions: Vec<u32>,
    /// Candidate token ids (label words); `None` means the whole vocabulary.
    pub classes: Option<Vec<u32>>,
    /// Per position, the right answer: an index into `classes`, or a token id.
    pub labels: Vec<u32>,
    /// Multiple choice: how the positions group into options and the options into examples. The loss is then
    /// cross-entropy over each example's options, scored by their summed token log-likelihoods.
    pub choices: Option<Choices>,
}

/// The grouping of a multiple-choice batch: each option is one row, its tokens consecutive loss positions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Choices {
    /// Per option (batch order): how many consecutive loss positions are its tokens.
    pub option_tokens: Vec<u32>,
    /// Per example: how many consecutive options it has.
    pub options: Vec<u32>,
    /// Per example: the right option's index.
    pub answers: Vec<u32>,
    /// Per option: its length in bytes (for length-normalized accuracy).
    pub bytes: Vec<u32>,
}

impl Targets {
    /// The right answer of each scored row of the output: per example for multiple choice, else per position.
    pub fn answers(&self) -> &[u32] {
        match &self.choices {
            Some(c) => &c.answers,
            None => &self.labels,
        }
    }

    /// The loss over `logits` [P, C] (the positions' logits over the classes or the vocabulary), its gradient, and
    /// the scores evaluation reads: `logits` themselves, or for multiple choice each example's option scores
    /// [E, K] (summed log-likelihoods; −inf where an example has fewer than K options).
    pub fn loss(&self, logits: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let labels = Tensor::new(self.labels.as_slice(), logits.device())?;
        match &self.choices {
            Some(c) => Ok(layers::choice_cross_entropy(logits, &labels, c)?),
            None => {
                let (loss, d) = layers::cross_entropy(logits, &labels)?;
                Ok((loss, d, logits.clone()))
            }
        }
    }
}

/// The most rows a batch and tokens a row may have: bounds that keep every count in range (B·H·T² in bytes fits
/// 64 bits for up to 2^16 heads).
pub const MAX_ROWS: usize = 1 << 16;
pub const MAX_LEN: usize = 1 << 17;

/// A right-padded batch. Rows are padded at the end, so under the causal mask no real position ever attends to
/// padding and the key-padding mask is implied; the loss reads only real positions.
#[derive(Clone, Debug)]
pub struct Batch {
    /// [B, T] token ids (u32).
    pub ids: Tensor,
    /// Real (unpadded) length of each row.
    pub lengths: Vec<usize>,
    pub targets: Targets,
}

impl Batch {
    pub fn real_tokens(&self) -> usize {
        self.lengths.iter().sum()
    }
}

/// Where the rows of a right-padded batch [B, T] sit in the packed activations [N, d] the blocks work on
/// (N = Σ lengths): row b's real tokens are rows `offsets[b] .. offsets[b] + lengths[b]`. Padding is dropped before
/// the first block, so no projection, attention or gradient is ever computed for it (on BoolQ at ≤ 256 tokens, 39%
/// of a padded batch's tokens). Each row attends only to itself, so every real position gets what the padded batch
/// gave it (up to the GEMMs' summation order: the training losses agree to 2e-6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packing {
    /// T: the padded width, so flat padded indices b·T + t can be mapped.
    pub t: usize,
    pub lengths: Vec<usize>,
    offsets: Vec<usize>,
}

impl Packing {
    /// Rows of `lengths` real tokens in a batch padded to `t`; every length in 1..=t.
    pub fn new(lengths: &[usize], t: usize) -> Result<Self> {
        if let Some(&bad) = lengths.iter().find(|&&l| l == 0 || l > t) {
            return Err(crate::Error::Shape(format!("a batch row of length {bad} in a batch padded to {t}")));
        }
        let offsets = lengths.iter().scan(0, |o, &l| Some(std::mem::replace(o, *o + l))).collect();
        Ok(Packing { t, lengths: lengths.to_vec(), offsets })
    }

    /// `b` rows with no padding.
    pub fn full(b: usize, t: usize) -> Result<Self> {
        Packing::new(&vec![t; b], t)
    }

    pub fn of(batch: &Batch) -> Result<Self> {
        let (b, t) = batch.ids.dims2()?;
        if batch.lengths.len() != b {
            return Err(crate::Error::Shape(format!("{} row lengths for a batch of {b} rows", batch.lengths.len())));
        }
        Packing::new(&batch.lengths, t)
    }

    /// N, the packed rows.
    pub fn n(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// The longest row (the RoPE table and causal mask a batch needs).
    pub fn max_len(&self) -> usize {
        self.lengths.iter().copied().max().unwrap_or(1)
    }

    /// (offset, length) of each row in the packed activations.
    pub fn rows(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.offsets.iter().copied().zip(self.lengths.iter().copied())
    }

    /// The real token ids [N] of a padded batch `ids` [B, T].
    pub fn ids(&self, ids: &Tensor) -> Result<Tensor> {
        if self.n() == ids.elem_count() {
            return Ok(ids.flatten_all()?);
        }
        let real: Vec<u32> =
            self.rows().enumerate().flat_map(|(b, (_, l))| (0..l).map(move |i| (b * self.t + i) as u32)).collect();
        Ok(ids.flatten_all()?.index_select(&Tensor::new(real.as_slice(), ids.device())?, 0)?)
    }

    /// Flat padded indices b·T + t (a batch's loss positions) as packed rows; a position in padding is an error.
    pub fn positions(&self, padded: &[u32]) -> Result<Vec<u32>> {
        padded
            .iter()
            .map(|&p| {
                let (b, i) = (p as usize / self.t, p as usize % self.t);
                match (self.offsets.get(b), self.lengths.get(b)) {
                    (Some(&o), Some(&l)) if i < l => Ok((o + i) as u32),
                    _ => Err(crate::Error::Shape(format!("loss position {p} is padding or outside the batch"))),
                }
            })
            .collect()
    }
}

//! Batching: truncation to `max_seq_len`, right padding, and the loss positions of each row. One example per row,
//! except multiple choice, whose example is one row per option. Truncation rules:
//! - classification: a prompt that does not fit loses tokens from its start (the question and the answer position
//!   sit at its end);
//! - language modelling: the window is the `max_len` tokens that end with the first answer (span) when it fits
//!   with at least one token before it, keeping as much of what precedes it as fits; later answers are kept while
//!   they fit. So the first answer is never dropped: at worst its end is cut (an answer longer than the window).
//!   For prompt/completion this keeps the whole completion and cuts the prompt's start;
//! - multiple choice: an option longer than `max_len − 1` loses its end; the context loses its start.
//!
//! The model drops the padding before its first block ([`crate::model::Packing`]).
use super::permutation;
use super::tasks::{Example, Target};
use crate::model::{Batch, Choices, Targets};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::ops::Range;

/// The window `[s, e)` of an LM sequence of `len` tokens whose first answer is `first` (see the module's rule).
pub fn lm_window(len: usize, first: &Range<usize>, max_len: usize) -> Range<usize> {
    let s = first.end.saturating_sub(max_len).min(first.start.saturating_sub(1));
    s..len.min(s + max_len)
}

/// Builds one right-padded batch from `examples`.
pub fn make_batch(
    examples: &[&Example],
    classes: Option<&[u32]>,
    max_len: usize,
    pad: u32,
    dev: &Device,
) -> Result<Batch> {
    if max_len < 2 {
        return Err(Error::Option(format!("--max-seq-len {max_len} is too short (at least 2)")));
    }
    // Each row: its tokens and the offsets (within the row) of the tokens the loss reads; the logits at offset i
    // predict token i+1, so a target token at offset k is read at position k − 1.
    let mut rows: Vec<(Vec<u32>, Vec<usize>)> = Vec::with_capacity(examples.len());
    let mut labels = Vec::new();
    let mut choices: Option<Choices> = None;
    for ex in examples {
        match &ex.target {
            Target::Class(c) => {
                if classes.is_none() {
                    return Err(Error::Msg("a classification example in a task without label words".into()));
                }
                let p = &ex.tokens[ex.tokens.len().saturating_sub(max_len)..];
                if p.is_empty() {
                    return Err(Error::Msg("an example has an empty prompt".into()));
                }
                labels.push(*c);
                rows.push((p.to_vec(), vec![p.len()]));
            }
            Target::Spans(spans) => {
                let first = spans.first().filter(|f| f.start >= 1 && f.end <= ex.tokens.len() && !f.is_empty());
                let first =
                    first.ok_or_else(|| Error::Msg("an LM example without an answer after its first token".into()))?;
                let w = lm_window(ex.tokens.len(), first, max_len);
                let targets: Vec<usize> =
                    spans.iter().flat_map(|r| r.clone()).filter(|k| w.start < *k && *k < w.end).collect();
                labels.extend(targets.iter().map(|&k| ex.tokens[k]));
                rows.push((ex.tokens[w.clone()].to_vec(), targets.iter().map(|k| k - w.start).collect()));
            }
            Target::Choice { options, answer, bytes } => {
                let c = choices.get_or_insert_with(Choices::default);
                c.options.push(options.len() as u32);
                c.answers.push(*answer);
                for (o, &b) in options.iter().zip(bytes) {
                    let o = &o[..o.len().min(max_len - 1)];
                    let ctx = &ex.tokens[ex.tokens.len() - ex.tokens.len().min(max_len - o.len())..];
                    if ctx.is_empty() || o.is_empty() {
                        return Err(Error::Msg("a multiple-choice example with an empty context or option".into()));
                    }
                    c.option_tokens.push(o.len() as u32);
                    c.bytes.push(b as u32);
                    labels.extend_from_slice(o);
                    rows.push(([ctx, o].concat(), (ctx.len()..ctx.len() + o.len()).collect()));
                }
            }
        }
    }
    let kinds = examples.iter().map(|e| std::mem::discriminant(&e.target)).collect::<std::collections::HashSet<_>>();
    if kinds.len() > 1 {
        return Err(Error::Msg("a batch mixes examples of different kinds".into()));
    }
    let t = rows.iter().map(|(s, _)| s.len()).max().unwrap_or(1);
    let (mut ids, mut lengths, mut positions) = (Vec::with_capacity(rows.len() * t), Vec::new(), Vec::new());
    for (b, (seq, targets)) in rows.iter().enumerate() {
        positions.extend(targets.iter().map(|&k| (b * t + k - 1) as u32));
        ids.extend_from_slice(seq);
        ids.extend(std::iter::repeat_n(pad, t - seq.len()));
        lengths.push(seq.len());
    }
    let ids = Tensor::from_vec(ids, (rows.len(), t), dev)?;
    let classes = classes.filter(|_| choices.is_none()).map(|c| c.to_vec());
    Ok(Batch { ids, lengths, targets: Targets { positions, classes, labels, choices } })
}

/// Walks a training set in seeded epochs (a new permutation each epoch); its position is part of a checkpoint.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Batcher {
    pub seed: u64,
    pub epoch: u64,
    pub cursor: usize,
    pub n: usize,
}

impl Batcher {
    pub fn new(n: usize, seed: u64) -> Self {
        Batcher { seed, epoch: 0, cursor: 0, n }
    }

    /// Indices of the next `size` examples, crossing into the next epoch (new permutation) when needed.
    pub fn next_indices(&mut self, size: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(size);
        let mut perm = permutation(self.n, self.seed, 100 + self.epoch as u32);
        while out.len() < size {
            if self.cursor == self.n {
                self.cursor = 0;
                self.epoch += 1;
                perm = permutation(self.n, self.seed, 100 + self.epoch as u32);
            }
            out.push(perm[self.cursor]);
            self.cursor += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_batch_reads_last_prompt_token_and_truncates_from_the_left() {
        let a = Example { tokens: vec![1, 2, 3, 4, 5], target: Target::Class(1) };
        let b = Example { tokens: vec![7, 8], target: Target::Class(0) };
        let batch = make_batch(&[&a, &b], Some(&[10, 11]), 4, 0, &Device::Cpu).unwrap();
        assert_eq!(batch.ids.to_vec2::<u32>().unwrap(), vec![vec![2, 3, 4, 5], vec![7, 8, 0, 0]]);
        assert_eq!(batch.targets.positions, vec![3, 4 + 1]);
        assert_eq!(batch.targets.labels, vec![1, 0]);
        assert_eq!(batch.lengths, vec![4, 2]);
    }

    #[test]
    fn completion_batch_masks_the_loss_to_the_completion() {
        let a = Example { tokens: vec![1, 2, 3, 4, 5], target: Target::Spans(std::iter::once(3..5).collect()) };
        let batch = make_batch(&[&a], None, 4, 0, &Device::Cpu).unwrap();
        // The prompt loses its first token; positions 1 and 2 predict the completion tokens 4 and 5.
        assert_eq!(batch.ids.to_vec2::<u32>().unwrap(), vec![vec![2, 3, 4, 5]]);
        assert_eq!(batch.targets.positions, vec![1, 2]);
        assert_eq!(batch.targets.labels, vec![4, 5]);
    }

    /// The window rule against hand-worked cases: the first answer kept whole with as much before it as fits;
    /// later answers while they fit; an answer longer than the window keeps one token of context and its start.
    #[test]
    fn lm_window_keeps_the_first_answer() {
        assert_eq!(lm_window(10, &(6..8), 4), 4..8);
        assert_eq!(lm_window(10, &(2..4), 6), 0..6);
        assert_eq!(lm_window(20, &(5..15), 4), 4..8);
        // Two turns, the second partly cut: targets are the first turn and the part of the second that fits.
        let a = Example { tokens: (0..12).collect(), target: Target::Spans(vec![3..5, 8..11]) };
        let b = make_batch(&[&a], None, 9, 99, &Device::Cpu).unwrap();
        assert_eq!(b.ids.to_vec2::<u32>().unwrap(), vec![(0..9).collect::<Vec<u32>>()]);
        assert_eq!(b.targets.labels, vec![3, 4, 8]);
        assert_eq!(b.targets.positions, vec![2, 3, 7]);
    }

    /// A multiple-choice example is one row per option: context then option, the option's tokens the loss
    /// positions, the grouping recorded; a long context loses its start.
    #[test]
    fn choice_batch_has_a_row_per_option() {
        let opts = vec![vec![7], vec![8, 9]];
        let a =
            Example { tokens: vec![1, 2, 3], target: Target::Choice { options: opts, answer: 1, bytes: vec![2, 5] } };
        let b = make_batch(&[&a], None, 4, 0, &Device::Cpu).unwrap();
        assert_eq!(b.ids.to_vec2::<u32>().unwrap(), vec![vec![1, 2, 3, 7], vec![2, 3, 8, 9]]);
        assert_eq!(b.targets.labels, vec![7, 8, 9]);
        assert_eq!(b.targets.positions, vec![2, 4 + 1, 4 + 2]);
        let c = b.targets.choices.unwrap();
        assert_eq!((c.option_tokens, c.options, c.answers, c.bytes), (vec![1, 2], vec![2], vec![1], vec![2, 5]));
    }

    #[test]
    fn batcher_covers_every_example_once_per_epoch_and_is_seeded() {
        let mut b = Batcher::new(10, 3);
        let mut seen: Vec<usize> = (0..5).flat_map(|_| b.next_indices(2)).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        let mut c = Batcher::new(10, 3);
        let mut d = Batcher::new(10, 3);
        assert_eq!(c.next_indices(7), d.next_indices(7));
        assert_ne!(Batcher::new(10, 4).next_indices(10), Batcher::new(10, 3).next_indices(10));
    }
}

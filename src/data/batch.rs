//! Batching: truncation to `max_seq_len`, right padding, and the loss positions of each row.
//! Truncation rule: a prompt that does not fit loses tokens from its start (the question and the answer position
//! sit at its end); a causal-LM example keeps at least one prompt token and cuts its completion's end if it must.
//! One example per row; the model drops the padding before its first block ([`crate::model::Packing`]).
use super::permutation;
use super::tasks::{Example, Target};
use crate::model::{Batch, Targets};
use crate::{Error, Result};
use candle_core::{Device, Tensor};

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
    let mut rows = Vec::with_capacity(examples.len());
    let (mut positions, mut labels) = (Vec::new(), Vec::new());
    for ex in examples {
        let (seq, first_target) = match &ex.target {
            Target::Class(c) => {
                let p = &ex.prompt[ex.prompt.len().saturating_sub(max_len)..];
                labels.push(*c);
                (p.to_vec(), p.len())
            }
            Target::Completion(comp) => {
                let keep_prompt = ex.prompt.len().min(max_len.saturating_sub(comp.len()).max(1));
                let p = &ex.prompt[ex.prompt.len() - keep_prompt..];
                let comp = &comp[..comp.len().min(max_len - p.len())];
                labels.extend_from_slice(comp);
                ([p, comp].concat(), p.len())
            }
        };
        if first_target == 0 {
            return Err(Error::Msg("an example has an empty prompt".into()));
        }
        rows.push((seq, first_target));
    }
    let t = rows.iter().map(|(s, _)| s.len()).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(rows.len() * t);
    let mut lengths = Vec::new();
    for (b, (seq, first)) in rows.iter().enumerate() {
        // The logits at position i predict token i+1: a class is read at the prompt's last token; completion
        // token j (at position first+j) is predicted from position first+j−1.
        let n_targets = if classes.is_some() { 1 } else { seq.len() - first };
        for j in 0..n_targets {
            positions.push((b * t + first - 1 + j) as u32);
        }
        ids.extend_from_slice(seq);
        ids.extend(std::iter::repeat_n(pad, t - seq.len()));
        lengths.push(seq.len());
    }
    let ids = Tensor::from_vec(ids, (rows.len(), t), dev)?;
    Ok(Batch { ids, lengths, targets: Targets { positions, classes: classes.map(|c| c.to_vec()), labels } })
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
        let a = Example { prompt: vec![1, 2, 3, 4, 5], target: Target::Class(1) };
        let b = Example { prompt: vec![7, 8], target: Target::Class(0) };
        let batch = make_batch(&[&a, &b], Some(&[10, 11]), 4, 0, &Device::Cpu).unwrap();
        assert_eq!(batch.ids.to_vec2::<u32>().unwrap(), vec![vec![2, 3, 4, 5], vec![7, 8, 0, 0]]);
        assert_eq!(batch.targets.positions, vec![3, 4 + 1]);
        assert_eq!(batch.targets.labels, vec![1, 0]);
        assert_eq!(batch.lengths, vec![4, 2]);
    }

    #[test]
    fn completion_batch_masks_the_loss_to_the_completion() {
        let a = Example { prompt: vec![1, 2, 3], target: Target::Completion(vec![4, 5]) };
        let batch = make_batch(&[&a], None, 4, 0, &Device::Cpu).unwrap();
        // The prompt loses its first token; positions 1 and 2 predict the completion tokens 4 and 5.
        assert_eq!(batch.ids.to_vec2::<u32>().unwrap(), vec![vec![2, 3, 4, 5]]);
        assert_eq!(batch.targets.positions, vec![1, 2]);
        assert_eq!(batch.targets.labels, vec![4, 5]);
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

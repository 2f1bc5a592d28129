//! Tasks and data: label-word classification in the MeZO style (BoolQ, or any labelled jsonl/CSV), multiple
//! choice scored by log-likelihood, and language modelling on chat, instruction or prompt/completion data; seeded
//! train/dev/eval splits or separate files; truncation and right-padded batches.
pub mod batch;
pub mod chat;
pub mod choice;
pub mod classify;
pub mod rows;
pub mod tasks;

pub use batch::{make_batch, Batcher};
pub use tasks::{Example, SplitSizes, Splits, Target, TaskArgs, TaskData, TaskKind};

/// A seeded permutation of `0..n` (Fisher–Yates on the counter-based RNG, so it is reproducible anywhere).
pub fn permutation(n: usize, seed: u64, stream: u32) -> Vec<usize> {
    use qtune_quant::rng::{uniform, RngKey};
    let key = RngKey::new(seed, u32::MAX, stream);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = ((uniform(&key, i as u64) as f64) * (i + 1) as f64) as usize;
        p.swap(i, j.min(i));
    }
    p
}

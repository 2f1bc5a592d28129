//! Tasks and data: label-word classification in the MeZO style (BoolQ by default) and causal-LM fine-tuning on
//! prompt/completion pairs; seeded train/dev/eval splits; truncation and right-padded batches.
pub mod batch;
pub mod tasks;

pub use batch::{make_batch, Batcher};
pub use tasks::{load_task, Example, SplitSizes, Splits, Target, TaskData};

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

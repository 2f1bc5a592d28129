//! Memory accounting. The engine counts the bytes it holds by category — weights, gradients, optimizer states,
//! saved activations and scratch — and the OS reports the process's peak resident set; every run prints both.
use crate::model::{Keep, LlamaConfig};
use serde::Serialize;

/// Bytes by category. `weights + gradients + optimizer` is the model state the papers compare.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Breakdown {
    pub weights: usize,
    pub gradients: usize,
    pub optimizer: usize,
    pub activations: usize,
    pub scratch: usize,
}

impl Breakdown {
    pub fn model_state(&self) -> usize {
        self.weights + self.gradients + self.optimizer
    }
    pub fn total(&self) -> usize {
        self.model_state() + self.activations + self.scratch
    }
    /// Category-wise maximum (peaks of different moments of a step).
    pub fn max(self, o: Breakdown) -> Breakdown {
        Breakdown {
            weights: self.weights.max(o.weights),
            gradients: self.gradients.max(o.gradients),
            optimizer: self.optimizer.max(o.optimizer),
            activations: self.activations.max(o.activations),
            scratch: self.scratch.max(o.scratch),
        }
    }
}

/// Transient bytes of one block's backward beyond the saved activations, for a batch of rows of `lengths` real tokens
/// (packed, see [`crate::model::Packing`]; element size `elem`). Attention runs row by row, so its buffers are one
/// row's (L the longest): softmax-backward buffers [H,L,L]×3 (dprobs, dprobs⊙probs, dscores), repeated K/V
/// [H,L,hd]×2 and the row's whole probabilities [H,L,L] rebuilt from their kept lower triangle; then residual
/// gradients [N,d]×3, MLP gradients [N,f]×4 and the largest weight gradient of a block. With recomputation the
/// block's recomputed activations hold every row's whole probabilities, as a forward holds them (never packed).
pub fn block_scratch_bytes(cfg: &LlamaConfig, lengths: &[usize], keep: Keep, elem: usize) -> usize {
    let n: usize = lengths.iter().sum();
    let l = lengths.iter().copied().max().unwrap_or(0);
    let (d, f, h, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.head_dim);
    let attn = 3 * h * l * l + 2 * h * l * hd;
    let grads = 3 * n * d + 4 * n * f + f * d;
    let probs = if keep == Keep::Inputs { block_activation_elems(cfg, lengths, false) } else { h * l * l };
    (attn + grads + probs) * elem
}

/// Elements of one block's activations (see `BlockActs`) for rows of `lengths` real tokens: with `lower` as a block
/// saves them for its backward (each row's attention probabilities' lower triangle), without as its forward holds
/// them (every row's whole [H, L, L]).
pub fn block_activation_elems(cfg: &LlamaConfig, lengths: &[usize], lower: bool) -> usize {
    let n: usize = lengths.iter().sum();
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let probs: usize = lengths.iter().map(|&l| if lower { l * (l + 1) / 2 } else { l * l }).sum();
    4 * n * d + 2 * n + n * cfg.q_dim() * 2 + 2 * n * cfg.kv_dim() + cfg.num_attention_heads * probs + 2 * n * f
}

/// Peak resident set size of this process (VmHWM), in bytes; 0 where the OS does not say.
pub fn peak_rss_bytes() -> usize {
    proc_status_kb("VmHWM:") * 1024
}

/// Current resident set size (VmRSS), in bytes.
pub fn rss_bytes() -> usize {
    proc_status_kb("VmRSS:") * 1024
}

fn proc_status_kb(key: &str) -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// "1.23 GiB"-style formatting for reports.
pub fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// The report printed at the end of a run.
pub fn report(b: &Breakdown, params: usize, peak_rss: usize) -> String {
    let row =
        |name: &str, v: usize| format!("  {name:<12} {:>12}  {:>6.2} B/param\n", human(v), v as f64 / params as f64);
    let mut s = String::from("memory (counted by the engine):\n");
    s += &row("weights", b.weights);
    s += &row("gradients", b.gradients);
    s += &row("optimizer", b.optimizer);
    s += &row("model state", b.model_state());
    s += &row("activations", b.activations);
    s += &row("scratch", b.scratch);
    s += &format!("  peak RSS     {:>12}  (measured by the OS)\n", human(peak_rss));
    s
}

//! QST (Zhang et al., ACL 2024, arXiv 2401.07159): quantized side tuning. The LLM is frozen in NF4 with double
//! quantization (blocks of 64 / 256, f32 compute on dequantized tiles) and a thin side network learns from its hidden
//! states. Nothing back-propagates through the base, so the base's forward keeps no activation.
//!
//! One forward (N base layers, d base width, s = d/r side width; h_f,0 the embeddings, h_f,i base block i's output):
//!   h_g,0 = down_0(h_f,0)
//!   x_i   = (1 − β_i)·down_i(h_f,i) + β_i·h_g,i−1,  β_i = σ(γ_i)                          (i = 1..N)
//!   h_g,i = side_block_i(x_i)                                  (side decoder block l = i − 1)
//!   h     = α ⊙ norm_f(h_f,N) + (1 − α) ⊙ up(norm_g(h_g,N))  → frozen LM head → cross-entropy
//! The side blocks are LLaMA blocks at width s and FFN width ffn/r with the base's head counts; they run on the
//! decoder's own [`Llama::block_forward`] / [`Llama::block_backward`] with their own
//! [`Geometry`](crate::model::llama::Geometry) (RoPE table and causal mask at the side's head width). Like the base,
//! the head is evaluated only where the loss reads it.
//!
//! Downsample modules (`--downsample`): `adapter` (the default: Linear d→k, SiLU, Linear k→s, LayerNorm; k = 16),
//! `lora` (the same without the SiLU), `linear` (Linear d→s, as in LST; no norm), `maxpool` / `avgpool`
//! (`MaxPool1d(r, r)` over the features, as the 2023 prototypes; no parameters). The linears have no bias, as the
//! code's `AdapterLinear`.
//!
//! Where this follows the paper, the official code (YouAreSpecialToMe/QST), or neither (papers.md §2.6):
//! - Start point (`--qst-start paper`, the default): α is a raw per-dimension vector initialized to 1 (not clamped),
//!   so the first forward is exactly the NF4 base model's (tested: h = α⊙hf + (1 − α)⊙u is hf bit for bit at α = 1).
//!   The upsample keeps PyTorch's random init (the paper does not say; the code). `--zero-upsample` starts it at 0
//!   (papers.md §2.6 suggests it): with the paper's start the side network's entry is then second order (both
//!   α − 1 and W_up start at 0). `--qst-start code` is the official code's α = σ(a), a = 1 (0.73): the random side
//!   network is in the first forward, not the pre-trained model (on BoolQ it lowers the base's AUC from 0.563 to
//!   0.542, docs/qst.md); with `--zero-upsample` the code's first forward is the base's final state scaled by 0.73.
//!   At the exact start only α has a gradient at the first step; the side network's is ∝ (1 − α), so it enters the
//!   output as fast as α leaves 1, about lr per AdamW step. `--alpha-lr-scale` trains α at a multiple of the run's learning rate (neither the paper nor the
//!   code does; the paper trains for epochs, where lr per step is enough).
//! - Gates: γ_i ∈ R^s per dimension (the code's shape), zero-initialized, β = 0.5 (the paper's init; the code: 0.5).
//! - N + 1 downsample modules, one for the embeddings and one per layer; the code reuses module 0 for both the
//!   embeddings and layer 1's output (N modules).
//! - Adapter: no dropout (the code's dropout never runs) and no `alpha_r` scaling (computed, never used, in the code).
//! - Side layers: Kaiming-uniform (PyTorch's `nn.Linear` default; the code never calls `post_init`), norms 1, no
//!   pruning-based init. Heads: the code keeps H query and KV heads, so head_dim = s/H (SmolLM2-135M at r = 16: s = 36,
//!   9 heads, 3 KV heads, head_dim 4). Where H does not divide s, or s/H is odd, head_dim is s/H rounded up to an even
//!   number (RoPE rotates pairs) and Q/K/V project s → H·head_dim, O back to s. `--side-heads h` is papers.md's
//!   optional experiment (not the paper's setting): h query heads, gcd(h, base KV heads) KV heads, head_dim s/h.
//! - Widths are rounded down (d/r, ffn/r), as `MaxPool1d(r, r)` rounds.
//! - f32 compute (the paper: bf16). Weight decay applies to matrices only (HF's Trainer would also decay γ and α).
//! - The embedding is NF4 like every other matrix (bitsandbytes keeps it in 16 bits); see `lora.rs`.
//!
//! Memory: the base forward ([`Llama::hidden_states`]) keeps nothing; each h_f,i is downsampled the moment it exists
//! and only what the downsample's gradient needs survives ([`DownActs`]: the adapter, LoRA-style and linear variants
//! keep their input h_f,i [B·T, d]; pooling keeps nothing). The side keeps its blocks' activations, or with
//! `--recompute` only their inputs [B·T, s]. With the base's head count, a side block's attention probabilities
//! [B, H, T, T] are as large as a base block's: at long sequences they are most of what QST keeps, so the side
//! blocks keep only their lower triangle ([`crate::model::layers::Probs`]), and `--recompute` drops them for one
//! extra side-block forward each. Export writes the side network (`side.safetensors`) and `qst.json`, which names
//! the base model file and how it was quantized; the base itself is not copied. [`QstModel::load`] reads an export
//! back (`qtune eval --model RUN/model`), re-quantizing the base it names.
use super::lora::{kaiming_uniform, nf4_base, FirstOrder, FrozenBase, Trained, NF4_BLOCK};
use super::{Method, StepStats};
use crate::checkpoint::{StateReader, StateWriter};
use crate::model::layers;
use crate::model::llama::{tensor_bytes, Saved};
use crate::model::quantized::{QuantStore, Source};
use crate::model::{Batch, BlockParam, GradSink, Keep, Llama, LlamaConfig, Output, Packing, ParamId, Tok, Weights};
use crate::train::memory::{block_activation_elems, block_scratch_bytes, Breakdown};
use crate::train::DenseGrads;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use qtune_quant::rng::{RngKey, STREAM_GAUSS};
use qtune_quant::Nf4Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The adapter's LayerNorm eps (PyTorch's default).
const LN_EPS: f64 = 1e-5;
/// Mixed into the run seed so QST's init draws differ from other methods' draws under the same seed.
const QST_SEED_TAG: u64 = 0x0051_5354; // "QST"

/// How a base hidden state [B·T, d] is brought down to the side width s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Downsample {
    Adapter,
    Lora,
    Linear,
    MaxPool,
    AvgPool,
}

impl std::str::FromStr for Downsample {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "adapter" => Ok(Downsample::Adapter),
            "lora" => Ok(Downsample::Lora),
            "linear" => Ok(Downsample::Linear),
            "maxpool" => Ok(Downsample::MaxPool),
            "avgpool" => Ok(Downsample::AvgPool),
            _ => Err(Error::Option(format!("--downsample `{s}`: expected adapter, lora, linear, maxpool or avgpool"))),
        }
    }
}

/// Where QST starts (`--qst-start`, papers.md §2.6 item 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    /// The paper's: α a raw vector of ones, so the first forward is the base model's.
    Paper,
    /// The official code's: α = σ(a) with a = 1 (0.73), so the random side network is in the first forward.
    Code,
}

impl std::str::FromStr for Start {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "paper" => Ok(Start::Paper),
            "code" => Ok(Start::Code),
            _ => Err(Error::Option(format!("--qst-start `{s}`: expected paper or code"))),
        }
    }
}

impl Downsample {
    fn factored(self) -> bool {
        matches!(self, Downsample::Adapter | Downsample::Lora)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct QstConfig {
    /// Reduction factor: side width d/r, side FFN width ffn/r.
    pub r: usize,
    /// The side blocks' query heads: `None` keeps the base's (the official code); `Some(h)` is papers.md §2.6
    /// item 4's experiment (not the paper's setting), with gcd(h, base KV heads) KV heads.
    pub side_heads: Option<usize>,
    pub downsample: Downsample,
    /// Inner width k of the adapter and LoRA-style downsamples.
    pub adapter_rank: usize,
    /// What the side blocks keep for their backward: all activations, or their inputs (recomputation).
    pub keep: Keep,
    /// Seeds the side network's init.
    pub seed: u64,
    pub start: Start,
    /// α's learning rate as a multiple of the run's (α is the only path into the output at the paper's start).
    pub alpha_lr_scale: f64,
    /// Paper start: keep α in [0, 1] after every step (papers.md §2.6 item 1), so 1 − α, the side network's share
    /// of the output, never changes sign.
    pub alpha_clamp: bool,
    /// Upsample weight and bias start at 0 (papers.md §2.6 item 1) instead of PyTorch's random init, so the side
    /// network adds nothing to the output until it has learned something: with the code's start the first forward
    /// is the base's final state scaled by α, not mixed with a random network's.
    pub zero_upsample: bool,
}

/// Every tensor QST trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SideParam {
    /// Downsample module i: i = 0 reads the embeddings, i = l + 1 base block l's output.
    Down(usize, DownParam),
    /// γ_i [s], i = 1..=N: β_i = σ(γ_i) weighs the previous side state in side block i − 1's input.
    Gate(usize),
    /// Side decoder block l's parameters (shapes of the side config).
    Block(usize, BlockParam),
    /// The side's final RMSNorm weight [s].
    Norm,
    /// Upsample Linear(s → d): weight [d, s] and bias [d].
    UpWeight,
    UpBias,
    /// α [d]: the weight of the base's final hidden state in the output mix.
    Alpha,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DownParam {
    /// Adapter / LoRA-style first factor [k, d].
    A,
    /// Second factor [s, k].
    B,
    /// The LayerNorm after the factors: weight and bias [s].
    LnWeight,
    LnBias,
    /// Linear downsample [s, d].
    Proj,
}

impl SideParam {
    /// The tensor's name in `side.safetensors`.
    pub fn name(self) -> String {
        match self {
            SideParam::Down(i, p) => match p {
                DownParam::A => format!("downsample.{i}.in_proj.weight"),
                DownParam::B => format!("downsample.{i}.out_proj.weight"),
                DownParam::LnWeight => format!("downsample.{i}.norm.weight"),
                DownParam::LnBias => format!("downsample.{i}.norm.bias"),
                DownParam::Proj => format!("downsample.{i}.weight"),
            },
            SideParam::Gate(i) => format!("gates.{i}"),
            SideParam::Block(l, p) => ParamId::Block(l, p).hf_name().replacen("model.", "side.", 1),
            SideParam::Norm => "side.norm.weight".into(),
            SideParam::UpWeight => "upsample.weight".into(),
            SideParam::UpBias => "upsample.bias".into(),
            SideParam::Alpha => "alpha".into(),
        }
    }

    /// Weight decay applies to matrices only.
    fn decayed(self) -> bool {
        match self {
            SideParam::Down(_, p) => matches!(p, DownParam::A | DownParam::B | DownParam::Proj),
            SideParam::Block(l, p) => ParamId::Block(l, p).is_matrix(),
            SideParam::UpWeight => true,
            SideParam::Gate(_) | SideParam::Norm | SideParam::UpBias | SideParam::Alpha => false,
        }
    }
}

/// The side blocks' config: the base family at width d/r and FFN width ffn/r, with the base's head counts (or
/// `heads` query heads and gcd(heads, base KV heads) KV heads) and head_dim (d/r)/H rounded up to an even number
/// (see the module docs).
pub fn side_config(base: &LlamaConfig, r: usize, heads: Option<usize>) -> Result<LlamaConfig> {
    if r == 0 {
        return Err(Error::Option("--side-r must be at least 1".into()));
    }
    let (s, f) = (base.hidden_size / r, base.intermediate_size / r);
    if s < 2 || f == 0 {
        return Err(Error::Option(format!(
            "--side-r {r} leaves a side network of width {s} and FFN width {f} (the model has {} and {}); use a smaller r",
            base.hidden_size, base.intermediate_size
        )));
    }
    let (h, kv) = match heads {
        None => (base.num_attention_heads, base.num_key_value_heads),
        Some(h) if h == 0 || h > s => {
            return Err(Error::Option(format!("--side-heads {h}: must be between 1 and the side width {s}")))
        }
        Some(h) => (h, gcd(h, base.num_key_value_heads)),
    };
    let head_dim = 2 * s.div_ceil(h).div_ceil(2);
    let cfg = LlamaConfig {
        hidden_size: s,
        intermediate_size: f,
        num_attention_heads: h,
        num_key_value_heads: kv,
        head_dim,
        ..base.clone()
    };
    cfg.validate().map_err(|m| Error::Option(format!("--side-r {r}: side config invalid: {m}")))?;
    Ok(cfg)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Every trained tensor and its shape, in forward order (which is also the optimizer's slot order).
pub fn side_param_shapes(base: &LlamaConfig, side: &LlamaConfig, q: &QstConfig) -> Vec<(SideParam, Vec<usize>)> {
    let (d, s, k) = (base.hidden_size, side.hidden_size, q.adapter_rank);
    let down = |i: usize| -> Vec<(SideParam, Vec<usize>)> {
        let p = |dp| SideParam::Down(i, dp);
        match q.downsample {
            Downsample::Adapter | Downsample::Lora => vec![
                (p(DownParam::A), vec![k, d]),
                (p(DownParam::B), vec![s, k]),
                (p(DownParam::LnWeight), vec![s]),
                (p(DownParam::LnBias), vec![s]),
            ],
            Downsample::Linear => vec![(p(DownParam::Proj), vec![s, d])],
            Downsample::MaxPool | Downsample::AvgPool => vec![],
        }
    };
    let mut out = down(0);
    for i in 1..=base.num_hidden_layers {
        out.extend(down(i));
        out.push((SideParam::Gate(i), vec![s]));
        out.extend(BlockParam::ALL.iter().map(|&p| (SideParam::Block(i - 1, p), ParamId::Block(i - 1, p).shape(side))));
    }
    out.extend([
        (SideParam::Norm, vec![s]),
        (SideParam::UpWeight, vec![d, s]),
        (SideParam::UpBias, vec![d]),
        (SideParam::Alpha, vec![d]),
    ]);
    out
}

/// QST's trained network: downsamples, gates, side blocks, side norm, upsample and α.
pub struct SideNet {
    pub cfg: QstConfig,
    /// The side blocks, as a decoder at the side config (only its block forward/backward are used).
    pub side: Llama,
    pub params: Trained<SideParam>,
}

/// The side blocks read their weights through the model's [`Weights`] interface, by their block ids.
impl Weights for Trained<SideParam> {
    fn linear(&self, id: ParamId, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.get(side_block_param(id)?).t()?)?)
    }
    fn linear_t(&self, id: ParamId, dy: &Tensor) -> Result<Tensor> {
        Ok(dy.matmul(self.get(side_block_param(id)?))?)
    }
    fn vector(&self, id: ParamId) -> Result<Tensor> {
        Ok(self.get(side_block_param(id)?).clone())
    }
    fn rows(&self, id: ParamId, _ids: &Tensor) -> Result<Tensor> {
        Err(Error::Msg(format!("the side network has no rows to read ({id:?})")))
    }
}

fn side_block_param(id: ParamId) -> Result<SideParam> {
    match id {
        ParamId::Block(l, p) => Ok(SideParam::Block(l, p)),
        other => Err(Error::Msg(format!("the side network has no {other:?}"))),
    }
}

/// Routes the side blocks' gradients (pushed by block id) into QST's gradient buffers.
struct BlockSink<'a>(&'a mut DenseGrads<SideParam>);

impl GradSink for BlockSink<'_> {
    fn push(&mut self, id: ParamId, grad: Tensor) -> Result<()> {
        self.0.add(side_block_param(id)?, grad)
    }
}

/// What a downsample's parameter gradients need (N = B·T rows, d base width, k rank, s side width).
pub enum DownActs {
    /// Adapter / LoRA-style.
    Factored {
        h: Tensor,    // [N, d] the input h_f,i
        z: Tensor,    // [N, k] first factor's output (pre-SiLU)
        xhat: Tensor, // [N, s] LayerNorm's normalized input
        rstd: Tensor, // [N, 1]
    },
    Linear {
        h: Tensor, // [N, d] the input h_f,i
    },
    /// Pooling has no parameters and the frozen base takes no gradient: nothing.
    Pool,
}

impl DownActs {
    fn bytes(&self) -> usize {
        match self {
            DownActs::Factored { h, z, xhat, rstd } => [h, z, xhat, rstd].iter().map(|t| tensor_bytes(t)).sum(),
            DownActs::Linear { h } => tensor_bytes(h),
            DownActs::Pool => 0,
        }
    }
}

/// What a QST training forward keeps for the backward (N packed rows, see [`Packing`]; s side width, d base width,
/// P loss positions, C classes). Nothing of the base is kept beyond what the downsamples hold.
pub struct SideTrace {
    packing: Packing,
    downs: Vec<DownActs>,    // N_layers + 1
    diffs: Vec<Tensor>,      // N_layers × [N, s]: h_g,i−1 − down_i(h_f,i), the gates' backward input
    blocks: Vec<Saved>,      // N_layers side blocks: activations, or inputs [N, s] when recomputing
    hg_sel: Tensor,          // [P, s] last side state at the loss positions
    rstd: Tensor,            // [P, 1] side norm's reciprocal std
    sn: Tensor,              // [P, s] side-normed state, the upsample's input
    mix: Tensor,             // [P, d] norm_f(h_f,N) − up(sn), α's gradient input
    dlogits: Tensor,         // [P, C]
    positions: Tensor,       // [P] u32
    classes: Option<Tensor>, // [C] u32
}

/// [`SideTrace::bytes`] from the shapes alone (the memory planner's count): rows of `lengths` real tokens,
/// `head` = (P loss positions, C logits per position).
pub fn trace_bytes(
    base: &LlamaConfig,
    side: &LlamaConfig,
    q: &QstConfig,
    lengths: &[usize],
    head: (usize, usize),
) -> usize {
    let n: usize = lengths.iter().sum();
    let (d, s, k, layers) = (base.hidden_size, side.hidden_size, q.adapter_rank, base.num_hidden_layers);
    let down = match q.downsample {
        Downsample::Adapter | Downsample::Lora => n * (d + k + s + 1),
        Downsample::Linear => n * d,
        Downsample::MaxPool | Downsample::AvgPool => 0,
    };
    let block = if q.keep == Keep::Inputs { n * s } else { block_activation_elems(side, lengths, true) };
    let (p, c) = head;
    4 * ((layers + 1) * down + layers * (n * s + block) + p * (s + 1 + s + d + c))
}

/// Transient bytes beyond the trace (f32) for a batch of rows of `lengths` real tokens, at the larger of two
/// moments: the base forward holds one base block's activations at a time, and when it runs the last side block's
/// saved activations do not exist yet; the side backward holds one side block's scratch (and its activations when
/// recomputing) beside the whole trace.
pub fn scratch_bytes(base: &LlamaConfig, side: &LlamaConfig, keep: Keep, lengths: &[usize]) -> usize {
    let last_side_block = 4 * if keep == Keep::Inputs {
        lengths.iter().sum::<usize>() * side.hidden_size
    } else {
        block_activation_elems(side, lengths, true)
    };
    let base_forward = (4 * block_activation_elems(base, lengths, false)).saturating_sub(last_side_block);
    base_forward.max(block_scratch_bytes(side, lengths, keep, 4))
}

impl SideTrace {
    /// Bytes held for the backward.
    pub fn bytes(&self) -> usize {
        self.downs.iter().map(DownActs::bytes).sum::<usize>()
            + self.diffs.iter().map(tensor_bytes).sum::<usize>()
            + self.blocks.iter().map(Saved::bytes).sum::<usize>()
            + [&self.hg_sel, &self.rstd, &self.sn, &self.mix, &self.dlogits]
                .iter()
                .map(|t| tensor_bytes(t))
                .sum::<usize>()
    }
}

/// Side input x = (1 − β)·ds + β·prev with β = σ(γ), as ds + β·(prev − ds). Returns (x, prev − ds).
fn gate_forward(ds: &Tensor, prev: &Tensor, gamma: &Tensor) -> Result<(Tensor, Tensor)> {
    let beta = candle_nn::ops::sigmoid(gamma)?;
    let diff = (prev - ds)?;
    Ok(((ds + diff.broadcast_mul(&beta)?)?, diff))
}

/// Backward of [`gate_forward`]: (d ds, d prev, dγ) with dγ = Σ_rows dx·(prev − ds)·β(1 − β).
fn gate_backward(dx: &Tensor, diff: &Tensor, gamma: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let beta = candle_nn::ops::sigmoid(gamma)?;
    let one_minus = beta.affine(-1.0, 1.0)?;
    let dgamma = ((dx * diff)?.sum(0)? * (&beta * &one_minus)?)?;
    Ok((dx.broadcast_mul(&one_minus)?, dx.broadcast_mul(&beta)?, dgamma))
}

/// Output mix h = α⊙hf + (1 − α)⊙u, written so α = 1 gives hf bit for bit. Returns (h, hf − u).
fn mix_forward(hf: &Tensor, u: &Tensor, alpha: &Tensor) -> Result<(Tensor, Tensor)> {
    let h = (hf.broadcast_mul(alpha)? + u.broadcast_mul(&alpha.affine(-1.0, 1.0)?)?)?;
    Ok((h, (hf - u)?))
}

/// Backward of [`mix_forward`] in u and α (hf is the frozen base's): (du, dα).
fn mix_backward(dh: &Tensor, diff: &Tensor, alpha: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok((dh.broadcast_mul(&alpha.affine(-1.0, 1.0)?)?, (dh * diff)?.sum(0)?))
}

impl SideNet {
    /// A freshly initialized side network for a base of config `base`, in `dtype`.
    pub fn new(base: &LlamaConfig, cfg: QstConfig, dtype: DType) -> Result<Self> {
        let side = side_config(base, cfg.r, cfg.side_heads)?;
        if cfg.downsample.factored() && cfg.adapter_rank == 0 {
            return Err(Error::Option("--adapter-rank must be at least 1".into()));
        }
        if cfg.keep == Keep::Nothing {
            return Err(Error::Option("QST trains its side network: it must keep activations or block inputs".into()));
        }
        let dev = Device::Cpu;
        let mut items = Vec::new();
        for (slot, (p, shape)) in side_param_shapes(base, &side, &cfg).into_iter().enumerate() {
            let key = RngKey::new(cfg.seed ^ QST_SEED_TAG, slot as u32, STREAM_GAUSS);
            let ones = || Tensor::ones(shape.as_slice(), dtype, &dev);
            let zeros = || Tensor::zeros(shape.as_slice(), dtype, &dev);
            let t = match p {
                SideParam::Down(_, DownParam::LnWeight) | SideParam::Norm | SideParam::Alpha => ones()?,
                // PyTorch's nn.Linear init, the bias too (fan-in s).
                SideParam::UpWeight | SideParam::UpBias if cfg.zero_upsample => zeros()?,
                SideParam::UpWeight | SideParam::UpBias => kaiming_uniform(&shape, side.hidden_size, key, dtype)?,
                SideParam::Down(_, DownParam::LnBias) | SideParam::Gate(_) => zeros()?,
                SideParam::Block(l, bp) if !ParamId::Block(l, bp).is_matrix() => ones()?,
                // Matrices [out, in]: PyTorch's nn.Linear init.
                _ => kaiming_uniform(&shape, shape[1], key, dtype)?,
            };
            items.push((p, t, p.decayed()));
        }
        if !(cfg.alpha_lr_scale.is_finite() && cfg.alpha_lr_scale >= 0.0) {
            return Err(Error::Option(format!(
                "--alpha-lr-scale {}: expected a finite number ≥ 0",
                cfg.alpha_lr_scale
            )));
        }
        let mut params = Trained::new(items);
        if cfg.alpha_clamp && cfg.start != Start::Paper {
            return Err(Error::Option(
                "--alpha-clamp applies to --qst-start paper (the code's α = σ(a) is in (0, 1))".into(),
            ));
        }
        params.scale_lr(SideParam::Alpha, cfg.alpha_lr_scale);
        Ok(SideNet { cfg, side: Llama::new(side), params })
    }

    fn dtype(&self) -> DType {
        self.params.get(SideParam::Alpha).dtype()
    }

    /// The output mix's α: the trained vector itself (paper start) or σ of it (code start).
    fn alpha(&self) -> Result<Tensor> {
        let a = self.params.get(SideParam::Alpha);
        Ok(match self.cfg.start {
            Start::Paper => a.clone(),
            Start::Code => candle_nn::ops::sigmoid(a)?,
        })
    }

    fn down(&self, i: usize, p: DownParam) -> &Tensor {
        self.params.get(SideParam::Down(i, p))
    }

    /// Downsample module `i` on a base hidden state `h` [N, d] → [N, s], and what its gradient needs.
    fn down_forward(&self, i: usize, h: &Tensor) -> Result<(Tensor, DownActs)> {
        let s = self.side.cfg.hidden_size;
        let pooled = || -> Result<Tensor> {
            let n = h.dim(0)?;
            Ok(h.narrow(1, 0, s * self.cfg.r)?.reshape((n, s, self.cfg.r))?)
        };
        Ok(match self.cfg.downsample {
            Downsample::Adapter | Downsample::Lora => {
                let z = h.matmul(&self.down(i, DownParam::A).t()?)?;
                let a = if self.cfg.downsample == Downsample::Adapter { z.silu()? } else { z.clone() };
                let y = a.matmul(&self.down(i, DownParam::B).t()?)?;
                let (out, xhat, rstd) = layers::layer_norm_forward(
                    &y,
                    self.down(i, DownParam::LnWeight),
                    self.down(i, DownParam::LnBias),
                    LN_EPS,
                )?;
                (out, DownActs::Factored { h: h.clone(), z, xhat, rstd })
            }
            Downsample::Linear => (h.matmul(&self.down(i, DownParam::Proj).t()?)?, DownActs::Linear { h: h.clone() }),
            Downsample::MaxPool => (pooled()?.max(D::Minus1)?, DownActs::Pool),
            Downsample::AvgPool => (pooled()?.mean(D::Minus1)?, DownActs::Pool),
        })
    }

    /// Parameter gradients of downsample `i` given the gradient `dy` [N, s] of its output.
    fn down_backward(&self, i: usize, acts: DownActs, dy: &Tensor, grads: &mut DenseGrads<SideParam>) -> Result<()> {
        let key = |p| SideParam::Down(i, p);
        match acts {
            DownActs::Factored { h, z, xhat, rstd } => {
                let (dy, dw, db) = layers::layer_norm_backward(dy, &xhat, self.down(i, DownParam::LnWeight), &rstd)?;
                grads.add(key(DownParam::LnWeight), dw)?;
                grads.add(key(DownParam::LnBias), db)?;
                let adapter = self.cfg.downsample == Downsample::Adapter;
                let a = if adapter { z.silu()? } else { z.clone() };
                grads.add(key(DownParam::B), dy.t()?.matmul(&a)?)?;
                let da = dy.matmul(self.down(i, DownParam::B))?;
                let dz = if adapter { layers::silu_backward(&da, &z)? } else { da };
                grads.add(key(DownParam::A), dz.t()?.matmul(&h)?)
            }
            DownActs::Linear { h } => grads.add(key(DownParam::Proj), dy.t()?.matmul(&h)?),
            DownActs::Pool => Ok(()),
        }
    }

    /// The QST forward over `batch` with the frozen `base` (model `model`): loss and logits at the target positions;
    /// with `keep != Nothing` also the trace the backward needs (what the side blocks keep is `self.cfg.keep`).
    pub fn forward(
        &self,
        model: &Llama,
        base: &dyn Weights,
        batch: &Batch,
        keep: Keep,
    ) -> Result<(Output, Option<SideTrace>)> {
        let train = keep != Keep::Nothing;
        let side_keep = if train { self.cfg.keep } else { Keep::Nothing };
        let dtype = self.dtype();
        let dev = batch.ids.device().clone();
        let packing = Packing::of(batch)?;
        let sc = &self.side.cfg;
        let g = self.side.geometry(&packing, dtype, &dev)?;
        let (mut downs, mut diffs, mut blocks) = (Vec::new(), Vec::new(), Vec::new());
        let mut hg: Option<Tensor> = None;
        let base_dtype = base.vector(ParamId::FinalNorm)?.dtype();
        // Each base state is consumed the moment it exists: downsampled, mixed in, run through its side block.
        let ids = packing.ids(&batch.ids)?;
        let x = model.hidden_states(base, &ids, &packing, base_dtype, &mut |i, hf| {
            let (ds, acts) = self.down_forward(i, &hf.to_dtype(dtype)?)?;
            if train {
                downs.push(acts);
            }
            hg = Some(match hg.take() {
                None => ds,
                Some(prev) => {
                    let (x, diff) = gate_forward(&ds, &prev, self.params.get(SideParam::Gate(i)))?;
                    if train {
                        diffs.push(diff);
                    }
                    let (out, acts) = self.side.block_forward(&self.params, i - 1, x.clone(), &g)?;
                    blocks.extend(Saved::new(side_keep, x, acts)?);
                    out
                }
            });
            Ok(())
        })?;
        let hg = hg.ok_or_else(|| Error::Msg("the base produced no hidden state".into()))?;
        let tg = &batch.targets;
        let positions = Tensor::new(packing.positions(&tg.positions)?.as_slice(), &dev)?;
        let classes = tg.classes.as_ref().map(|c| Tensor::new(c.as_slice(), &dev)).transpose()?;
        let x_sel = x.index_select(&positions, 0)?;
        drop(x);
        let (hf, _) = layers::rms_norm_forward(&x_sel, &base.vector(ParamId::FinalNorm)?, model.cfg.rms_norm_eps)?;
        let hg_sel = hg.index_select(&positions, 0)?;
        drop(hg);
        let (sn, rstd) = layers::rms_norm_forward(&hg_sel, self.params.get(SideParam::Norm), sc.rms_norm_eps)?;
        let u =
            sn.matmul(&self.params.get(SideParam::UpWeight).t()?)?.broadcast_add(self.params.get(SideParam::UpBias))?;
        let alpha = self.alpha()?;
        let (h, mix) = mix_forward(&hf.to_dtype(dtype)?, &u, &alpha)?;
        let logits = model.head_forward(base, &h, classes.as_ref())?;
        // Evaluation on label words also measures the side branch's part of the logits (the head is linear), which
        // says whether the side network is in the answer at all; two rows of the head per example cost nothing.
        let side = match &classes {
            Some(c) if !train => {
                Some(model.head_forward(base, &u.broadcast_mul(&alpha.affine(-1.0, 1.0)?)?, Some(c))?)
            }
            _ => None,
        };
        let labels = Tensor::new(tg.labels.as_slice(), &dev)?;
        let (loss, dlogits) = layers::cross_entropy(&logits, &labels)?;
        let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()? as f32;
        let trace = train.then_some(SideTrace {
            packing,
            downs,
            diffs,
            blocks,
            hg_sel,
            rstd,
            sn,
            mix,
            dlogits,
            positions,
            classes,
        });
        Ok((Output { loss, logits, side }, trace))
    }

    /// The backward of [`SideNet::forward`]: adds every trained tensor's gradient into `grads`. Nothing flows into
    /// the base (the head's input gradient is all it reads of it).
    pub fn backward(
        &self,
        model: &Llama,
        base: &dyn Weights,
        trace: SideTrace,
        grads: &mut DenseGrads<SideParam>,
    ) -> Result<()> {
        let SideTrace { packing, mut downs, mut diffs, mut blocks, hg_sel, rstd, sn, mix, dlogits, positions, classes } =
            trace;
        let dtype = self.dtype();
        let dev = hg_sel.device().clone();
        let sc = &self.side.cfg;
        let dh = model.head_backward(base, &dlogits, classes.as_ref())?.to_dtype(dtype)?;
        let alpha = self.alpha()?;
        let (du, dalpha) = mix_backward(&dh, &mix, &alpha)?;
        let dalpha = match self.cfg.start {
            Start::Paper => dalpha,
            Start::Code => (dalpha * (&alpha * alpha.affine(-1.0, 1.0)?)?)?,
        };
        grads.add(SideParam::Alpha, dalpha)?;
        grads.add(SideParam::UpBias, du.sum(0)?)?;
        grads.add(SideParam::UpWeight, du.t()?.matmul(&sn)?)?;
        let dsn = du.matmul(self.params.get(SideParam::UpWeight))?;
        let (dhg_sel, dnorm) = layers::rms_norm_backward(&dsn, &hg_sel, self.params.get(SideParam::Norm), &rstd)?;
        grads.add(SideParam::Norm, dnorm)?;
        let mut dhg = Tensor::zeros((packing.n(), sc.hidden_size), dtype, &dev)?.index_add(&positions, &dhg_sel, 0)?;
        let g = self.side.geometry(&packing, dtype, &dev)?;
        let missing = || Error::Msg("QST trace is missing a layer".into());
        for i in (1..=model.cfg.num_hidden_layers).rev() {
            let acts = self.side.block_acts(&self.params, i - 1, blocks.pop().ok_or_else(missing)?, &g)?;
            let dx = self.side.block_backward(&self.params, i - 1, &acts, &dhg, &g, &mut BlockSink(grads))?;
            drop(acts);
            let (dds, dprev, dgamma) =
                gate_backward(&dx, &diffs.pop().ok_or_else(missing)?, self.params.get(SideParam::Gate(i)))?;
            grads.add(SideParam::Gate(i), dgamma)?;
            self.down_backward(i, downs.pop().ok_or_else(missing)?, &dds, grads)?;
            dhg = dprev;
        }
        self.down_backward(0, downs.pop().ok_or_else(missing)?, &dhg, grads)
    }

    fn scratch_bytes(&self, model: &Llama, lengths: &[usize]) -> usize {
        scratch_bytes(&model.cfg, &self.side.cfg, self.cfg.keep, lengths)
    }
}

/// A QST model: the frozen NF4 base and the side network. Training wraps it in [`Qst`]; [`QstModel::load`] reads
/// one back from its export for evaluation.
pub struct QstModel {
    base: QuantStore<Nf4Tensor>,
    net: SideNet,
}

impl QstModel {
    fn new(source: Source, cfg: QstConfig) -> Result<Self> {
        // Options are checked before the (slow) quantization.
        let net = SideNet::new(&source.cfg()?, cfg, DType::F32)?;
        Ok(QstModel { base: nf4_base(source)?, net })
    }

    /// Whether `dir` holds a QST export (`qst.json`).
    pub fn is_export(dir: &Path) -> bool {
        dir.join("qst.json").is_file()
    }

    /// Reads a QST export back: the side network from `side.safetensors`, the base re-quantized from the model file
    /// `qst.json` names (NF4 quantization is deterministic, so this is the base the side network was trained on).
    /// Returns the model and the base model's path. Errors name the file: a missing or unreadable base, a base whose
    /// configuration is not the one recorded, a missing, extra, misshapen or non-finite side tensor.
    pub fn load(dir: &Path) -> Result<(Self, PathBuf)> {
        let manifest = dir.join("qst.json");
        let bytes = std::fs::read(&manifest).map_err(|e| Error::file(&manifest, format!("cannot read: {e}")))?;
        let j: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::file(&manifest, format!("malformed JSON: {e}")))?;
        let text = |key: &str| {
            j[key].as_str().ok_or_else(|| Error::file(&manifest, format!("`{key}` is missing or not a string")))
        };
        let count = |key: &str| {
            j[key]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| Error::file(&manifest, format!("`{key}` is missing or not a count")))
        };
        // `side_heads` is absent from exports written before the option existed: the base's heads.
        let side_heads = if j["side_heads"].is_null() { None } else { Some(count("side_heads")?) };
        let cfg = QstConfig {
            r: count("r")?,
            side_heads,
            downsample: text("downsample")?.parse().map_err(|e| Error::file(&manifest, e))?,
            adapter_rank: count("adapter_rank")?,
            keep: Keep::All,
            seed: 0,
            start: text("start")?.parse().map_err(|e| Error::file(&manifest, e))?,
            alpha_lr_scale: 1.0,
            alpha_clamp: false,
            zero_upsample: false,
        };
        let base_path = PathBuf::from(text("base_model")?);
        let base_cfg = crate::model::load::read_header(&base_path)
            .map_err(|e| {
                Error::file(
                    &manifest,
                    format!(
                        "its base model cannot be read ({e}); paths are relative to the directory the training ran in"
                    ),
                )
            })?
            .cfg;
        if j["base_config"] != base_cfg.to_hf_json() {
            return Err(Error::file(
                &manifest,
                format!("the side network was trained on another base than {}", base_path.display()),
            ));
        }
        let mut net = SideNet::new(&base_cfg, cfg, DType::F32).map_err(|e| Error::file(&manifest, e))?;
        let side_path = dir.join("side.safetensors");
        let mut tensors = candle_core::safetensors::load(&side_path, &Device::Cpu)
            .map_err(|e| Error::file(&side_path, format!("cannot read: {e}")))?;
        for k in net.params.keys().to_vec() {
            let name = k.name();
            let t = tensors.remove(&name).ok_or_else(|| Error::file(&side_path, format!("no tensor `{name}`")))?;
            let want = net.params.get(k).dims().to_vec();
            if t.dims() != want.as_slice() {
                return Err(Error::file(&side_path, format!("`{name}` has shape {:?}, expected {want:?}", t.dims())));
            }
            let t = t.to_dtype(DType::F32)?;
            crate::model::load::check_finite(&t).map_err(|e| Error::file(&side_path, format!("`{name}`: {e}")))?;
            net.params.set(k, t);
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(Error::file(&side_path, format!("unexpected tensor `{extra}` for this qst.json")));
        }
        Ok((QstModel { base: nf4_base(Source::File(base_path.clone()))?, net }, base_path))
    }

    /// The inference forward (`model` is the base's decoder): loss and logits at the target positions.
    pub fn forward(&self, model: &Llama, batch: &Batch) -> Result<Output> {
        Ok(self.net.forward(model, &self.base, batch, Keep::Nothing)?.0)
    }

    /// Bytes held: the NF4 base and the side network.
    pub fn weight_bytes(&self) -> usize {
        self.base.weight_bytes() + self.net.params.bytes()
    }

    pub fn trainable_params(&self) -> usize {
        self.net.params.numel()
    }
}

/// The QST method: [`QstModel`] with AdamW (or Lion) on the side network only.
pub struct Qst {
    model: QstModel,
    update: FirstOrder,
}

impl Qst {
    pub fn new(source: Source, cfg: QstConfig, update: FirstOrder) -> Result<Self> {
        Ok(Qst { model: QstModel::new(source, cfg)?, update })
    }

    /// The run's description next to `side.safetensors`: the base model it reads and how, and the wiring.
    fn manifest(&self, base_model: &str) -> serde_json::Value {
        let (q, sc) = (&self.model.net.cfg, &self.model.net.side.cfg);
        serde_json::json!({
            "method": "qst",
            "base_model": base_model,
            "base_quantization": {
                "format": "nf4",
                "block": NF4_BLOCK,
                "double_quant": true,
                "double_quant_block": 256,
                "quantized": "every matrix, the embedding included; norm weights f32",
            },
            "base_config": self.model.base.cfg.to_hf_json(),
            // The side blocks only (no embeddings or head of their own).
            "side_config": {
                "hidden_size": sc.hidden_size,
                "intermediate_size": sc.intermediate_size,
                "num_hidden_layers": sc.num_hidden_layers,
                "num_attention_heads": sc.num_attention_heads,
                "num_key_value_heads": sc.num_key_value_heads,
                "head_dim": sc.head_dim,
                "rope_theta": sc.rope_theta,
                "rms_norm_eps": sc.rms_norm_eps,
            },
            "r": q.r,
            "side_heads": q.side_heads,
            "downsample": q.downsample,
            "adapter_rank": q.adapter_rank,
            "start": q.start,
            "alpha_clamp": q.alpha_clamp,
            "zero_upsample": q.zero_upsample,
            "layer_norm_eps": LN_EPS,
            "wiring": {
                "downsample.{i}": "i = 0 reads the token embeddings, i = l + 1 the output of base layer l",
                "side input of side.layers.{l}": "(1 - b)*downsample.{l+1}(h_f) + b*h_g, b = sigmoid(gates.{l+1}), h_g the previous side state (downsample.0's output before layer 0)",
                "output": match q.start {
                    Start::Paper => "a*model.norm(h_f) + (1 - a)*upsample(side.norm(h_g)) into the frozen LM head, a = alpha",
                    Start::Code => "a*model.norm(h_f) + (1 - a)*upsample(side.norm(h_g)) into the frozen LM head, a = sigmoid(alpha)",
                },
            },
            "tensors": self.model.net.params.keys().iter().map(|k| k.name()).collect::<Vec<_>>(),
        })
    }
}

impl Method for Qst {
    fn name(&self) -> &'static str {
        "qst"
    }

    fn step(&mut self, model: &Llama, micro: &[Batch], lr: f64) -> Result<StepStats> {
        let mut grads = DenseGrads::default();
        let mut loss = 0f32;
        let mut mem = self.state_bytes();
        for batch in micro {
            let (out, trace) = self.model.net.forward(model, &self.model.base, batch, self.model.net.cfg.keep)?;
            let trace = trace.ok_or_else(|| Error::Msg("a training forward keeps a trace".into()))?;
            mem.activations = mem.activations.max(trace.bytes());
            mem.scratch = mem.scratch.max(self.model.net.scratch_bytes(model, &batch.lengths));
            self.model.net.backward(model, &self.model.base, trace, &mut grads)?;
            loss += out.loss / micro.len() as f32;
        }
        let stats = self.update.step(&mut self.model.net.params, grads, micro.len(), loss, mem, lr)?;
        if self.model.net.cfg.alpha_clamp {
            let params = &mut self.model.net.params;
            let alpha = params.get(SideParam::Alpha).clamp(0f32, 1f32)?;
            params.set(SideParam::Alpha, alpha);
        }
        Ok(stats)
    }

    fn forward(&self, model: &Llama, batch: &Batch) -> Result<Output> {
        self.model.forward(model, batch)
    }

    /// The frozen NF4 base (QST's model is base + side network: evaluation goes through [`Method::forward`]).
    fn weights(&self) -> &dyn Weights {
        &self.model.base
    }

    fn trainable_params(&self) -> usize {
        self.model.trainable_params()
    }

    fn state_bytes(&self) -> Breakdown {
        let side = self.model.net.params.bytes();
        Breakdown {
            weights: self.model.weight_bytes(),
            gradients: side,
            optimizer: self.model.net.params.numel() * self.update.opt.state_bytes_per_param(),
            ..Default::default()
        }
    }

    fn saves_state(&self) -> bool {
        true
    }

    /// The side network and its optimizer state (the NF4 base is re-quantized from the model file).
    fn save_state(&self, w: &mut StateWriter) -> Result<()> {
        self.update.save(w, &self.model.net.params)
    }

    fn load_state(&mut self, r: &StateReader) -> Result<()> {
        self.update.load(r, &mut self.model.net.params)
    }

    fn export_tensor(&self, _id: ParamId) -> Result<Tensor> {
        Err(Error::Option(
            "qst: the side network is not a LLaMA checkpoint; the run exports side.safetensors and qst.json".into(),
        ))
    }

    /// Writes `dir/{side.safetensors, qst.json, tokenizer.json}`; the base is referenced, not copied.
    fn export(&self, _cfg: &LlamaConfig, dir: &Path, tok: Option<&Tok>, base_model: &str) -> Result<()> {
        let mut tensors = Vec::new();
        for &k in self.model.net.params.keys() {
            let t = self.model.net.params.get(k).to_dtype(DType::F32)?;
            crate::model::load::check_finite(&t)?;
            tensors.push((k.name(), t));
        }
        let path = dir.join("side.safetensors");
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::tensor::serialize(tensors, Some(metadata))
            .map_err(|e| Error::file(&path, format!("cannot serialize: {e}")))?;
        crate::io::write_bytes_atomic(&path, &bytes)?;
        let json = serde_json::to_vec_pretty(&self.manifest(base_model)).map_err(|e| Error::Msg(e.to_string()))?;
        crate::io::write_bytes_atomic(&dir.join("qst.json"), &json)?;
        if let Some(tok) = tok {
            crate::io::write_bytes_atomic(&dir.join("tokenizer.json"), tok.to_json()?.as_bytes())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Every new backward against central finite differences in f64 (budget 1e-6 relative to the gradient's
    //! scale): gates, output mix, each downsample variant, and the whole QST model with every trained tensor probed.
    //! Plus: the first forward is the NF4 base model's, bit for bit; what the trace keeps; the trainable fraction.
    use super::*;
    use crate::methods::OnNonFinite;
    use crate::model::layers::tests::{check, rand};
    use crate::model::llama::tests::{batch, tiny_config};
    use crate::model::ParamStore;
    use crate::model::Targets;
    use crate::train::optim::{AdamWConfig, Optimizer};

    const FD_BUDGET: f64 = 1e-6;

    fn qcfg(downsample: Downsample, keep: Keep) -> QstConfig {
        let start = Start::Paper;
        let (alpha_lr_scale, alpha_clamp, zero_upsample) = (1.0, false, false);
        QstConfig {
            r: 2,
            side_heads: None,
            downsample,
            adapter_rank: 4,
            keep,
            seed: 5,
            start,
            alpha_lr_scale,
            alpha_clamp,
            zero_upsample,
        }
    }

    pub fn smollm2_config() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rope_theta: 100000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
        }
    }

    /// A side network whose every tensor is random, so no gradient vanishes (at init α = 1 cuts the side network
    /// off).
    fn random_net(base: &LlamaConfig, q: QstConfig) -> SideNet {
        let mut net = SideNet::new(base, q, DType::F64).unwrap();
        for (j, &k) in net.params.keys().to_vec().iter().enumerate() {
            let t = net.params.get(k);
            let noise = rand(t.dims(), 100 + j as u64);
            let v = match k {
                SideParam::Alpha => (noise * 0.3).unwrap().affine(1.0, 0.5).unwrap(),
                _ => (t + (noise * 0.4).unwrap()).unwrap(),
            };
            net.params.set(k, v);
        }
        net
    }

    fn with(net: &SideNet, k: SideParam, t: &Tensor) -> SideNet {
        let mut params = net.params.clone();
        params.set(k, t.clone());
        SideNet { cfg: net.cfg, side: Llama::new(net.side.cfg.clone()), params }
    }

    #[test]
    fn side_config_keeps_the_head_counts() {
        let s = side_config(&smollm2_config(), 16, None).unwrap();
        assert_eq!((s.hidden_size, s.intermediate_size), (36, 96));
        assert_eq!((s.num_attention_heads, s.num_key_value_heads, s.head_dim), (9, 3, 4));
        // 576/64 = 9 = H: head_dim 1 rounds up to 2, so Q/K/V project 9 → 18.
        let s = side_config(&smollm2_config(), 64, None).unwrap();
        assert_eq!((s.hidden_size, s.head_dim, s.q_dim()), (9, 2, 18));
        for r in [0, 300] {
            assert!(matches!(side_config(&smollm2_config(), r, None), Err(Error::Option(_))));
        }
        // --side-heads: KV heads gcd(h, 3); 36/5 = 7.2 rounds up to head_dim 8.
        for (h, want) in [(1, (1, 1, 36)), (3, (3, 3, 12)), (6, (6, 3, 6)), (5, (5, 1, 8))] {
            let s = side_config(&smollm2_config(), 16, Some(h)).unwrap();
            assert_eq!((s.num_attention_heads, s.num_key_value_heads, s.head_dim), want, "{h} heads");
        }
        for h in [0, 37] {
            assert!(matches!(side_config(&smollm2_config(), 16, Some(h)), Err(Error::Option(_))));
        }
    }

    #[test]
    fn gate_and_mix_backward_match_finite_differences() {
        let (ds, prev, gamma, r) = (rand(&[3, 4], 1), rand(&[3, 4], 2), rand(&[4], 3), rand(&[3, 4], 4));
        let (_, diff) = gate_forward(&ds, &prev, &gamma).unwrap();
        let (dds, dprev, dgamma) = gate_backward(&r, &diff, &gamma).unwrap();
        check("gate dds", &ds, &dds, |x| gate_forward(x, &prev, &gamma).unwrap().0, &r);
        check("gate dprev", &prev, &dprev, |x| gate_forward(&ds, x, &gamma).unwrap().0, &r);
        check("gate dgamma", &gamma, &dgamma, |x| gate_forward(&ds, &prev, x).unwrap().0, &r);
        let (hf, u, alpha) = (rand(&[3, 5], 5), rand(&[3, 5], 6), rand(&[5], 7));
        let r = rand(&[3, 5], 8);
        let (_, diff) = mix_forward(&hf, &u, &alpha).unwrap();
        let (du, dalpha) = mix_backward(&r, &diff, &alpha).unwrap();
        check("mix du", &u, &du, |x| mix_forward(&hf, x, &alpha).unwrap().0, &r);
        check("mix dalpha", &alpha, &dalpha, |x| mix_forward(&hf, &u, x).unwrap().0, &r);
    }

    #[test]
    fn downsample_gradients_match_finite_differences() {
        let base = tiny_config(true);
        for ds in [Downsample::Adapter, Downsample::Lora, Downsample::Linear] {
            let net = random_net(&base, qcfg(ds, Keep::All));
            let h = (rand(&[5, base.hidden_size], 9) * 3.0).unwrap();
            let r = rand(&[5, net.side.cfg.hidden_size], 10);
            let i = 1;
            let (_, acts) = net.down_forward(i, &h).unwrap();
            let mut grads = DenseGrads::default();
            net.down_backward(i, acts, &r, &mut grads).unwrap();
            for &k in net.params.keys().iter().filter(|k| matches!(k, SideParam::Down(j, _) if *j == i)) {
                let g = grads.get(k).unwrap_or_else(|| panic!("no gradient for {k:?}"));
                check(
                    &format!("{ds:?} {k:?}"),
                    net.params.get(k),
                    g,
                    |x| with(&net, k, x).down_forward(i, &h).unwrap().0,
                    &r,
                );
            }
        }
    }

    #[test]
    fn pooling_takes_max_and_mean_over_groups_of_r_features() {
        let base = tiny_config(true);
        let h = rand(&[2, 16], 11);
        let hv: Vec<Vec<f64>> = h.to_vec2().unwrap();
        for (ds, r) in [(Downsample::MaxPool, 2), (Downsample::AvgPool, 3)] {
            let net = SideNet::new(&base, QstConfig { r, ..qcfg(ds, Keep::All) }, DType::F64).unwrap();
            let (out, acts) = net.down_forward(0, &h).unwrap();
            assert!(matches!(acts, DownActs::Pool));
            let out: Vec<Vec<f64>> = out.to_vec2().unwrap();
            assert_eq!(out[0].len(), 16 / r);
            for (row, o) in hv.iter().zip(&out) {
                for (j, &v) in o.iter().enumerate() {
                    let g = &row[j * r..(j + 1) * r];
                    let want = if ds == Downsample::MaxPool {
                        g.iter().cloned().fold(f64::MIN, f64::max)
                    } else {
                        g.iter().sum::<f64>() / r as f64
                    };
                    assert!((v - want).abs() < 1e-15, "{ds:?}: {v} vs {want}");
                }
            }
        }
    }

    fn loss(net: &SideNet, m: &Llama, base: &ParamStore, b: &Batch) -> f64 {
        let (out, _) = net.forward(m, base, b, Keep::Nothing).unwrap();
        let labels = Tensor::new(b.targets.labels.as_slice(), &Device::Cpu).unwrap();
        layers::cross_entropy(&out.logits, &labels).unwrap().0.to_scalar::<f64>().unwrap()
    }

    fn check_model(q: QstConfig, classes: bool) {
        let (cfg, keep) = (tiny_config(true), q.keep);
        let m = Llama::new(cfg.clone());
        let base = ParamStore::random(&cfg, 7, 0.3, DType::F64).unwrap();
        let net = random_net(&cfg, q);
        let b = batch(classes);
        let (_, trace) = net.forward(&m, &base, &b, keep).unwrap();
        let mut grads = DenseGrads::default();
        net.backward(&m, &base, trace.unwrap(), &mut grads).unwrap();
        let h = 1e-6;
        for &k in net.params.keys() {
            let g = grads.get(k).unwrap_or_else(|| panic!("no gradient for {k:?}"));
            let gv: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            let scale = gv.iter().fold(1e-4f64, |m, x| m.max(x.abs()));
            let w = net.params.get(k);
            let wv: Vec<f64> = w.flatten_all().unwrap().to_vec1().unwrap();
            for i in [0, wv.len() / 2, wv.len() - 1] {
                let at = |d: f64| {
                    let mut v = wv.clone();
                    v[i] += d;
                    loss(&with(&net, k, &Tensor::from_vec(v, w.shape(), &Device::Cpu).unwrap()), &m, &base, &b)
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                let err = (fd - gv[i]).abs() / scale;
                assert!(
                    err < FD_BUDGET,
                    "{k:?}[{i}] fd {fd} analytic {} rel {err:e} ({q:?}, classes {classes})",
                    gv[i]
                );
            }
        }
    }

    #[test]
    fn qst_backward_matches_finite_differences_adapter() {
        check_model(qcfg(Downsample::Adapter, Keep::All), true);
    }

    #[test]
    fn qst_backward_matches_finite_differences_lora_recompute_full_vocab() {
        check_model(qcfg(Downsample::Lora, Keep::Inputs), false);
    }

    #[test]
    fn qst_backward_matches_finite_differences_one_side_head() {
        check_model(QstConfig { side_heads: Some(1), ..qcfg(Downsample::Adapter, Keep::All) }, true);
    }

    #[test]
    fn qst_backward_matches_finite_differences_linear() {
        check_model(qcfg(Downsample::Linear, Keep::All), true);
    }

    /// The code start's α = σ(a): its chain rule.
    #[test]
    fn qst_backward_matches_finite_differences_code_start() {
        check_model(QstConfig { start: Start::Code, ..qcfg(Downsample::Adapter, Keep::All) }, true);
    }

    #[test]
    fn qst_backward_matches_finite_differences_pooling() {
        check_model(qcfg(Downsample::MaxPool, Keep::All), false);
        check_model(qcfg(Downsample::AvgPool, Keep::Inputs), true);
    }

    fn adamw() -> FirstOrder {
        FirstOrder { opt: Optimizer::adamw(AdamWConfig::default()), clip: Some(1.0), on_nan: OnNonFinite::Stop }
    }

    fn tiny_qst(ds: Downsample) -> (Llama, Qst) {
        let cfg = tiny_config(true);
        let p = ParamStore::random(&cfg, 3, 0.3, DType::F32).unwrap();
        (Llama::new(cfg), Qst::new(Source::Params(p.clone()), qcfg(ds, Keep::All), adamw()).unwrap())
    }

    /// The start point: α = 1 (with a random upsample) reproduces the NF4 base model's logits bit for bit, and the
    /// dequantized f32 model's up to the kernels' summation order.
    #[test]
    fn first_forward_equals_the_base_model() {
        let (m, q) = tiny_qst(Downsample::Adapter);
        let dense = q.model.base.dequantize().unwrap();
        for classes in [true, false] {
            let b = batch(classes);
            let got = q.forward(&m, &b).unwrap();
            let nf4 = m.forward(&q.model.base, &b, Keep::Nothing).unwrap().0;
            let f32_ = m.forward(&dense, &b, Keep::Nothing).unwrap().0;
            let (g, n, d): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                got.logits.flatten_all().unwrap().to_vec1().unwrap(),
                nf4.logits.flatten_all().unwrap().to_vec1().unwrap(),
                f32_.logits.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(g, n, "QST's first forward differs from the NF4 base's");
            assert_eq!(got.loss, nf4.loss);
            let scale = d.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = g.iter().zip(&d).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
            assert!(err < 1e-6, "vs dequantized f32 model: rel err {err:e}");
        }
    }

    /// With `zero_upsample` the code's start is the base model's final state scaled by α = σ(1) (the head is linear,
    /// so the logits are the base's times σ(1)), not mixed with the random side network; after one step the upsample
    /// has learned (the side network's gradient is ∝ 1 − α, here 0.27, not 0). Either way the evaluation's side part
    /// of the logits is what the side network adds to σ(1)·base.
    #[test]
    fn zero_upsample_keeps_the_random_side_network_out_of_the_first_forward() {
        let cfg = tiny_config(true);
        let p = ParamStore::random(&cfg, 3, 0.3, DType::F32).unwrap();
        let (m, b) = (Llama::new(cfg), batch(true));
        let alpha = 1.0 / (1.0 + (-1f32).exp());
        for zero in [false, true] {
            let q = QstConfig { start: Start::Code, zero_upsample: zero, ..qcfg(Downsample::Adapter, Keep::All) };
            let mut qst = Qst::new(Source::Params(p.clone()), q, adamw()).unwrap();
            let out = qst.forward(&m, &b).unwrap();
            let got: Vec<f32> = out.logits.flatten_all().unwrap().to_vec1().unwrap();
            let base = m.forward(&qst.model.base, &b, Keep::Nothing).unwrap().0.logits;
            let want: Vec<f32> = base.flatten_all().unwrap().to_vec1().unwrap();
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = got.iter().zip(&want).fold(0f32, |m, (g, w)| m.max((g - alpha * w).abs())) / scale;
            assert_eq!(err < 1e-6, zero, "zero upsample {zero}: rel err {err:e} against σ(1)·base logits");
            // The side branch's part of the logits is the rest: logits − side = σ(1)·base logits (budget 1e-6
            // relative), and exactly 0 with the zero upsample.
            let side: Vec<f32> = out.side.expect("label words: side part").flatten_all().unwrap().to_vec1().unwrap();
            let err = got.iter().zip(&side).zip(&want).fold(0f32, |m, ((g, s), w)| m.max((g - s - alpha * w).abs()));
            assert!(err / scale < 1e-6, "zero upsample {zero}: logits − side vs σ(1)·base: rel err {:e}", err / scale);
            assert_eq!(side.iter().all(|&x| x == 0.0), zero, "zero upsample {zero}: side part {side:?}");
            qst.step(&m, std::slice::from_ref(&b), 1e-3).unwrap();
            let up: Vec<f32> = qst.model.net.params.get(SideParam::UpWeight).flatten_all().unwrap().to_vec1().unwrap();
            assert!(up.iter().all(|&w| w != 0.0), "zero upsample {zero}: the upsample did not move");
        }
    }

    /// AdamW's first step moves every coordinate by lr (m̂/√v̂ = ±1): α's by `alpha_lr_scale` × lr.
    #[test]
    fn alpha_trains_at_its_own_learning_rate() {
        let cfg = tiny_config(true);
        let p = ParamStore::random(&cfg, 3, 0.3, DType::F32).unwrap();
        let (m, b, lr) = (Llama::new(cfg), batch(true), 1e-3);
        for scale in [1.0, 25.0] {
            let q = QstConfig { alpha_lr_scale: scale, ..qcfg(Downsample::Adapter, Keep::All) };
            let mut qst = Qst::new(Source::Params(p.clone()), q, adamw()).unwrap();
            qst.step(&m, std::slice::from_ref(&b), lr).unwrap();
            let alpha: Vec<f32> = qst.model.net.params.get(SideParam::Alpha).to_vec1().unwrap();
            for a in alpha {
                let moved = (a - 1.0).abs() as f64;
                assert!((moved - scale * lr).abs() < 1e-2 * scale * lr, "α moved {moved}, want {}", scale * lr);
            }
        }
    }

    /// With `alpha_clamp` a step that would push α above 1 leaves it at 1; without, α crosses 1 both ways.
    #[test]
    fn alpha_clamp_keeps_alpha_in_the_unit_interval() {
        let cfg = tiny_config(true);
        let p = ParamStore::random(&cfg, 3, 0.3, DType::F32).unwrap();
        let (m, b) = (Llama::new(cfg), batch(true));
        for clamp in [false, true] {
            let q = QstConfig { alpha_lr_scale: 10.0, alpha_clamp: clamp, ..qcfg(Downsample::Adapter, Keep::All) };
            let mut qst = Qst::new(Source::Params(p.clone()), q, adamw()).unwrap();
            qst.step(&m, std::slice::from_ref(&b), 1e-2).unwrap();
            let alpha: Vec<f32> = qst.model.net.params.get(SideParam::Alpha).to_vec1().unwrap();
            let (above, below) = (alpha.iter().any(|&a| a > 1.0), alpha.iter().any(|&a| a < 1.0));
            assert_eq!((above, below), (!clamp, true), "clamp {clamp}: {alpha:?}");
        }
        let q = QstConfig { alpha_clamp: true, start: Start::Code, ..qcfg(Downsample::Adapter, Keep::All) };
        assert!(Qst::new(Source::Params(p), q, adamw()).is_err());
    }

    #[test]
    fn training_steps_lower_the_loss() {
        let (m, mut q) = tiny_qst(Downsample::Adapter);
        let b = batch(true);
        let first = q.step(&m, std::slice::from_ref(&b), 1e-2).unwrap();
        let mut last = first;
        for _ in 0..15 {
            last = q.step(&m, std::slice::from_ref(&b), 1e-2).unwrap();
            assert!(last.applied);
        }
        assert!(last.loss < first.loss * 0.9, "loss {} → {}", first.loss, last.loss);
    }

    /// What the trace keeps of the base: the adapter keeps its input h_f,i, the rank-wide pre-activation and
    /// LayerNorm's x̂ and rstd per module, pooling nothing; everything else is the side network's own.
    #[test]
    fn trace_keeps_only_what_the_downsamples_need_of_the_base() {
        let cfg = tiny_config(true);
        let m = Llama::new(cfg.clone());
        let base = ParamStore::random(&cfg, 7, 0.3, DType::F32).unwrap();
        let b = batch(true);
        let bytes = |ds| {
            let net = SideNet::new(&cfg, QstConfig { adapter_rank: 4, ..qcfg(ds, Keep::All) }, DType::F32).unwrap();
            net.forward(&m, &base, &b, Keep::All).unwrap().1.unwrap().bytes()
        };
        let n = 10; // real tokens (6 + 4): padding is never computed
        let (d, k, s) = (cfg.hidden_size, 4, cfg.hidden_size / 2);
        let per_module = n * (d + k + s + 1) * 4;
        assert_eq!(bytes(Downsample::Adapter) - bytes(Downsample::MaxPool), (cfg.num_hidden_layers + 1) * per_module);
        assert_eq!(bytes(Downsample::Linear) - bytes(Downsample::AvgPool), (cfg.num_hidden_layers + 1) * n * d * 4);
    }

    /// Model state: NF4 codes (½ byte per weight), one 8-bit code per block of 64, one f32 per 256 block codes
    /// plus the f32 offset, f32 norms; side parameters, their gradients and AdamW's two moments.
    #[test]
    fn state_bytes_count_the_nf4_base_and_the_side_network() {
        let (_, q) = tiny_qst(Downsample::Adapter);
        let cfg = tiny_config(true);
        let nf4: usize = ParamId::all(&cfg)
            .into_iter()
            .map(|id| {
                let n = id.numel(&cfg);
                let blocks = n.div_ceil(64);
                if id.is_matrix() {
                    n.div_ceil(2) + blocks + 4 * blocks.div_ceil(256) + 4
                } else {
                    4 * n
                }
            })
            .sum();
        let side = q.trainable_params();
        let b = q.state_bytes();
        assert_eq!(b.weights, nf4 + 4 * side);
        assert_eq!((b.gradients, b.optimizer), (4 * side, 8 * side));
    }

    #[test]
    fn export_writes_the_side_network_and_a_manifest() {
        let (_, q) = tiny_qst(Downsample::Lora);
        let dir = tempfile::tempdir().unwrap();
        q.export(&tiny_config(true), dir.path(), None, "models/base.gguf").unwrap();
        let t = candle_core::safetensors::load(dir.path().join("side.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(t.len(), q.model.net.params.keys().len());
        assert_eq!(t["alpha"].to_vec1::<f32>().unwrap(), vec![1.0; 16]);
        assert!(t.contains_key("side.layers.1.mlp.down_proj.weight") && t.contains_key("downsample.2.in_proj.weight"));
        let j: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("qst.json")).unwrap()).unwrap();
        assert_eq!(j["base_model"], "models/base.gguf");
        assert_eq!(j["downsample"], "lora");
        assert_eq!(j["side_heads"], serde_json::Value::Null);
        assert_eq!(j["side_config"]["hidden_size"], 8);
        assert!(q.export_tensor(ParamId::Embed).is_err());
    }

    /// Trainable parameters for SmolLM2-135M at r = 16 (`cargo test smollm2 -- --nocapture` prints the table).
    #[test]
    fn smollm2_trainable_fraction() {
        let base = smollm2_config();
        let side = side_config(&base, 16, None).unwrap();
        let total = base.num_params();
        let count = |ds| -> usize {
            let q = QstConfig { r: 16, downsample: ds, adapter_rank: 16, ..qcfg(ds, Keep::All) };
            side_param_shapes(&base, &side, &q).iter().map(|(_, s)| s.iter().product::<usize>()).sum()
        };
        // Per side block: 2 norms (72), q/o 36·36, k/v 12·36, gate/up/down 36·96.
        let common = 30 * (72 + 2 * 1296 + 2 * 432 + 3 * 3456) + 30 * 36 + 36 + 576 * 36 + 576 + 576;
        let adapter = 31 * (16 * 576 + 36 * 16 + 72);
        assert_eq!(count(Downsample::Adapter), common + adapter);
        assert_eq!(count(Downsample::MaxPool), common);
        println!("SmolLM2-135M ({total} parameters), QST r = 16, adapter rank 16:");
        for ds in [Downsample::Adapter, Downsample::Lora, Downsample::Linear, Downsample::MaxPool, Downsample::AvgPool]
        {
            let n = count(ds);
            println!("  {ds:?}: {n} trainable ({:.3}%)", 100.0 * n as f64 / total as f64);
        }
        for r in [8, 16] {
            let n = crate::methods::lora::LoraConfig { r, alpha: 16.0, seed: 0 }.trainable_params(&base);
            println!("  LoRA r = {r}: {n} trainable ({:.3}%)", 100.0 * n as f64 / total as f64);
        }
        let frac = count(Downsample::Adapter) as f64 / total as f64;
        assert!((0.004..0.007).contains(&frac), "{frac}");
    }

    /// Peak RSS of one training step at SmolLM2-135M's shape (random weights), batch 16 × 512 tokens, label-word
    /// loss at the last position: the issue's QST-vs-LoRA memory comparison. Minutes of CPU and ~15 GB; run one
    /// per process, in release, on a big machine: `cargo test --release --lib peak_rss_ -- --ignored --exact
    /// methods::qst::tests::peak_rss_qst` (VmHWM is per process).
    fn probe(method: &str, recompute: bool) {
        let cfg = smollm2_config();
        let params = ParamStore::random(&cfg, 1, 0.02, DType::F32).unwrap();
        let keep = if recompute { Keep::Inputs } else { Keep::All };
        let o = crate::methods::MethodOptions { keep, ..Default::default() };
        let (mut m, lr) = crate::methods::build(method, Source::Params(params), &o).unwrap();
        let (b, t) = (16, 512);
        let ids: Vec<u32> =
            (0..(b * t) as u64).map(|i| (i.wrapping_mul(2654435761) % cfg.vocab_size as u64) as u32).collect();
        let targets = Targets {
            positions: (0..b).map(|r| (r * t + t - 1) as u32).collect(),
            classes: Some(vec![4093, 6369]),
            labels: (0..b).map(|r| (r % 2) as u32).collect(),
        };
        let batch = Batch { ids: Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap(), lengths: vec![t; b], targets };
        let t0 = std::time::Instant::now();
        let stats = m.step(&Llama::new(cfg), &[batch], lr).unwrap();
        println!(
            "{{\"method\": \"{method}\", \"recompute\": {recompute}, \"peak_rss_bytes\": {}, \"step_s\": {:.1}, \"breakdown\": {}}}",
            crate::train::memory::peak_rss_bytes(),
            t0.elapsed().as_secs_f64(),
            serde_json::to_string(&stats.memory).unwrap()
        );
    }

    #[test]
    #[ignore]
    fn peak_rss_qst() {
        probe("qst", false);
    }

    #[test]
    #[ignore]
    fn peak_rss_qst_recompute() {
        probe("qst", true);
    }

    #[test]
    #[ignore]
    fn peak_rss_lora() {
        probe("lora", false);
    }

    #[test]
    #[ignore]
    fn peak_rss_lora_recompute() {
        probe("lora", true);
    }

    #[test]
    #[ignore]
    fn peak_rss_qlora() {
        probe("qlora", false);
    }
}

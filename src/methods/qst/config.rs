//! QST's configuration: its options ([`QstArgs`]), the resolved [`QstConfig`], the side network's config and the
//! names and shapes of every tensor it trains.
use crate::model::{BlockParam, Keep, LlamaConfig, ParamId};
use crate::{Error, Result};

/// QST's own options.
#[derive(clap::Args, Clone, Debug, PartialEq)]
#[command(next_help_heading = "QST")]
pub struct QstArgs {
    /// QST: reduction factor r of the side network (width d/r, FFN width ffn/r).
    #[arg(long, default_value_t = 16)]
    pub side_r: usize,
    /// QST: the side blocks' query heads, with gcd(heads, the base's KV heads) KV heads (default: the base's head
    /// counts, as the official code; another count is papers.md's experiment, not the paper's setting).
    #[arg(long)]
    pub side_heads: Option<usize>,
    /// QST downsample module: adapter, lora, linear, maxpool or avgpool.
    #[arg(long, value_enum, default_value_t = Downsample::Adapter)]
    pub downsample: Downsample,
    /// QST: inner width of the adapter and LoRA-style downsamples.
    #[arg(long, default_value_t = 16)]
    pub adapter_rank: usize,
    /// QST start: paper (α = 1: the first forward is the base model's) or code (the official code's
    /// α = sigmoid(1): the random side network is in the first forward).
    #[arg(long, value_enum, default_value_t = Start::Paper)]
    pub qst_start: Start,
    /// QST experiment (docs/qst.md): α's learning rate as a multiple of --lr.
    #[arg(long, default_value_t = 1.0)]
    pub alpha_lr_scale: f64,
    /// QST experiment (docs/qst.md), paper start: keep α in [0, 1] after every step.
    #[arg(long)]
    pub alpha_clamp: bool,
    /// QST experiment (docs/qst.md): start the upsample's weight and bias at 0, so the random side network is not
    /// in the first forward.
    #[arg(long)]
    pub zero_upsample: bool,
}
crate::options::defaults_from_clap!(QstArgs);

impl QstArgs {
    /// The configuration of a run: these options, what the side blocks keep, and the seed of the init.
    pub fn config(&self, keep: Keep, seed: u64) -> QstConfig {
        QstConfig {
            r: self.side_r,
            side_heads: self.side_heads,
            downsample: self.downsample,
            adapter_rank: self.adapter_rank,
            keep,
            seed,
            start: self.qst_start,
            alpha_lr_scale: self.alpha_lr_scale,
            alpha_clamp: self.alpha_clamp,
            zero_upsample: self.zero_upsample,
        }
    }
}

/// The adapter's LayerNorm eps (PyTorch's default).
pub(super) const LN_EPS: f64 = 1e-5;
/// Mixed into the run seed so QST's init draws differ from other methods' draws under the same seed.
pub(super) const QST_SEED_TAG: u64 = 0x0051_5354; // "QST"

/// How a base hidden state [B·T, d] is brought down to the side width s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Downsample {
    Adapter,
    Lora,
    Linear,
    #[value(name = "maxpool")]
    MaxPool,
    #[value(name = "avgpool")]
    AvgPool,
}

/// Where QST starts (`--qst-start`, papers.md §2.6 item 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    /// The paper's: α a raw vector of ones, so the first forward is the base model's.
    Paper,
    /// The official code's: α = σ(a) with a = 1 (0.73), so the random side network is in the first forward.
    Code,
}

impl Downsample {
    pub(super) fn factored(self) -> bool {
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    pub(super) fn decayed(self) -> bool {
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
        // The side blocks have no q/k/v biases, and per-frequency RoPE factors are for the base's head width.
        attention_bias: false,
        rope_scaling: base
            .rope_scaling
            .clone()
            .filter(|r| !matches!(r, crate::model::rope::RopeScaling::Factors { .. })),
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

//! QST's side network as a forward/backward pair: the downsamples of the base's hidden states, the gates, the side
//! blocks (the decoder's own blocks at the side config), the side norm, the upsample and the output mix with α;
//! what a training forward keeps ([`SideTrace`]) and its size from shapes alone ([`trace_bytes`],
//! [`scratch_bytes`]), which the step report and the memory planner both use.
use super::config::{side_config, side_param_shapes, DownParam, Downsample, QstConfig, SideParam, Start};
use super::config::{LN_EPS, QST_SEED_TAG};
use crate::methods::lora::kaiming_uniform;
use crate::model::layers;
use crate::model::llama::{tensor_bytes, Saved};
use crate::model::{Batch, GradSink, Keep, Llama, LlamaConfig, Output, Packing, ParamId, Weights};
use crate::train::memory::{block_activation_elems, block_scratch_bytes};
use crate::train::trained::Trained;
use crate::train::DenseGrads;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use qtune_quant::rng::{RngKey, STREAM_GAUSS};

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
    pub(super) packing: Packing,
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
pub(super) fn gate_forward(ds: &Tensor, prev: &Tensor, gamma: &Tensor) -> Result<(Tensor, Tensor)> {
    let beta = candle_nn::ops::sigmoid(gamma)?;
    let diff = (prev - ds)?;
    Ok(((ds + diff.broadcast_mul(&beta)?)?, diff))
}

/// Backward of [`gate_forward`]: (d ds, d prev, dγ) with dγ = Σ_rows dx·(prev − ds)·β(1 − β).
pub(super) fn gate_backward(dx: &Tensor, diff: &Tensor, gamma: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let beta = candle_nn::ops::sigmoid(gamma)?;
    let one_minus = beta.affine(-1.0, 1.0)?;
    let dgamma = ((dx * diff)?.sum(0)? * (&beta * &one_minus)?)?;
    Ok((dx.broadcast_mul(&one_minus)?, dx.broadcast_mul(&beta)?, dgamma))
}

/// Output mix h = α⊙hf + (1 − α)⊙u, written so α = 1 gives hf bit for bit. Returns (h, hf − u).
pub(super) fn mix_forward(hf: &Tensor, u: &Tensor, alpha: &Tensor) -> Result<(Tensor, Tensor)> {
    let h = (hf.broadcast_mul(alpha)? + u.broadcast_mul(&alpha.affine(-1.0, 1.0)?)?)?;
    Ok((h, (hf - u)?))
}

/// Backward of [`mix_forward`] in u and α (hf is the frozen base's): (du, dα).
pub(super) fn mix_backward(dh: &Tensor, diff: &Tensor, alpha: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok((dh.broadcast_mul(&alpha.affine(-1.0, 1.0)?)?, (dh * diff)?.sum(0)?))
}

impl SideNet {
    /// A freshly initialized side network for a base of config `base`, in `dtype`.
    pub fn new(base: &LlamaConfig, cfg: QstConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let side = side_config(base, cfg.r, cfg.side_heads)?;
        if cfg.downsample.factored() && cfg.adapter_rank == 0 {
            return Err(Error::Option("--adapter-rank must be at least 1".into()));
        }
        if cfg.keep == Keep::Nothing {
            return Err(Error::Option("QST trains its side network: it must keep activations or block inputs".into()));
        }
        let mut items = Vec::new();
        for (slot, (p, shape)) in side_param_shapes(base, &side, &cfg).into_iter().enumerate() {
            let key = RngKey::new(cfg.seed ^ QST_SEED_TAG, slot as u32, STREAM_GAUSS);
            let ones = || Tensor::ones(shape.as_slice(), dtype, dev);
            let zeros = || Tensor::zeros(shape.as_slice(), dtype, dev);
            let t = match p {
                SideParam::Down(_, DownParam::LnWeight) | SideParam::Norm | SideParam::Alpha => ones()?,
                // PyTorch's nn.Linear init, the bias too (fan-in s).
                SideParam::UpWeight | SideParam::UpBias if cfg.zero_upsample => zeros()?,
                SideParam::UpWeight | SideParam::UpBias => kaiming_uniform(&shape, side.hidden_size, key, dtype, dev)?,
                SideParam::Down(_, DownParam::LnBias) | SideParam::Gate(_) => zeros()?,
                SideParam::Block(l, bp) if !ParamId::Block(l, bp).is_matrix() => ones()?,
                // Matrices [out, in]: PyTorch's nn.Linear init.
                _ => kaiming_uniform(&shape, shape[1], key, dtype, dev)?,
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

    pub(super) fn dtype(&self) -> DType {
        self.params.get(SideParam::Alpha).dtype()
    }

    /// The output mix's α: the trained vector itself (paper start) or σ of it (code start).
    pub(super) fn alpha(&self) -> Result<Tensor> {
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
    pub(super) fn down_forward(&self, i: usize, h: &Tensor) -> Result<(Tensor, DownActs)> {
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
    pub(super) fn down_backward(
        &self,
        i: usize,
        acts: DownActs,
        dy: &Tensor,
        grads: &mut DenseGrads<SideParam>,
    ) -> Result<()> {
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
        let (loss, dlogits, logits) = tg.loss(&logits)?;
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

    pub(super) fn scratch_bytes(&self, model: &Llama, lengths: &[usize]) -> usize {
        scratch_bytes(&model.cfg, &self.side.cfg, self.cfg.keep, lengths)
    }
}

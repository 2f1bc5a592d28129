//! The LLaMA-family decoder as a forward pass that saves named activations and a hand-written backward that hands
//! each weight gradient to a [`GradSink`] the moment it exists (in exactly the reverse of [`ParamId::all`]'s order,
//! so a stack of gradients pops in forward order). Weights come through the [`Weights`] trait, so the same model
//! code runs on f32 tensors (the baselines) and on quantized stores (QFT, QST, QuZO) that apply a matrix without
//! materializing a whole-model f32 copy.
use super::batch::{Batch, Packing};
use super::config::LlamaConfig;
use super::layers::{self, Probs};
use super::params::{BlockParam as P, ParamId, ParamStore};
use super::rope::Rope;
use crate::Result;
use candle_core::{DType, Device, Tensor};

/// Where the model's weights come from. Every method that runs the model implements it.
pub trait Weights {
    /// y = x·Wᵀ for the matrix `id` (x: [N, in] → [N, out]).
    fn linear(&self, id: ParamId, x: &Tensor) -> Result<Tensor>;
    /// [`Weights::linear`] for several matrices reading the same x (q, k, v; gate, up): a store that copies or
    /// quantizes its input does so once for all of them. The default applies them one by one.
    fn linears(&self, ids: &[ParamId], x: &Tensor) -> Result<Vec<Tensor>> {
        ids.iter().map(|&id| self.linear(id, x)).collect()
    }
    /// dx = dy·W for the matrix `id` (dy: [N, out] → [N, in]): the input gradient of [`Weights::linear`].
    fn linear_t(&self, id: ParamId, dy: &Tensor) -> Result<Tensor>;
    /// A norm weight vector.
    fn vector(&self, id: ParamId) -> Result<Tensor>;
    /// Rows `ids` of the matrix `id` (token embeddings, or the LM head's rows for a set of label words).
    fn rows(&self, id: ParamId, ids: &Tensor) -> Result<Tensor>;
    /// Whether `id` is trained: the backward forms no gradient for a frozen parameter.
    fn trains(&self, _id: ParamId) -> bool {
        true
    }
    /// Hands on the gradient of the matrix `id` in y = x·Wᵀ given the upstream gradient `dy`. The default forms
    /// dW = dyᵀ·x; a method that trains something other than W itself (LoRA's factors) forms that instead.
    fn weight_grad(&self, id: ParamId, dy: &Tensor, x: &Tensor, sink: &mut dyn GradSink) -> Result<()> {
        if self.trains(id) {
            sink.push(id, dy.t()?.matmul(x)?)?;
        }
        Ok(())
    }
}

/// Called with (i, hidden state [B·T, d]) for the embeddings (i = 0) and each block's output (i = l + 1).
pub type Visit<'a> = &'a mut dyn FnMut(usize, &Tensor) -> Result<()>;

/// Receives each trained parameter's gradient once per backward, in reverse forward order.
pub trait GradSink {
    fn push(&mut self, id: ParamId, grad: Tensor) -> Result<()>;
}

impl Weights for ParamStore {
    fn linear(&self, id: ParamId, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.get(id).t()?)?)
    }
    fn linear_t(&self, id: ParamId, dy: &Tensor) -> Result<Tensor> {
        Ok(dy.matmul(self.get(id))?)
    }
    fn vector(&self, id: ParamId) -> Result<Tensor> {
        Ok(self.get(id).clone())
    }
    fn rows(&self, id: ParamId, ids: &Tensor) -> Result<Tensor> {
        Ok(self.get(id).index_select(ids, 0)?)
    }
}

/// [`Weights::linears`] for a fixed number of matrices.
pub(crate) fn linears<const N: usize>(w: &dyn Weights, ids: [ParamId; N], x: &Tensor) -> Result<[Tensor; N]> {
    let ys = w.linears(&ids, x)?;
    let got = ys.len();
    ys.try_into().map_err(|_| crate::Error::Msg(format!("{got} outputs for {N} matrices")))
}

/// What every block of one batch shares, built once per pass: the packing of its rows, the RoPE table and the causal
/// mask [T, T] for its longest row T (at the width of the model that builds it: the side network's head width is not
/// the base's).
pub struct Geometry<'a> {
    pub packing: &'a Packing,
    pub rope: Rope,
    pub mask: Tensor,
}

/// One row's attention activations (L its length).
struct RowAttn {
    q: Tensor,    // [1, H, L, hd] after RoPE
    k: Tensor,    // [1, KV, L, hd] after RoPE
    v: Tensor,    // [1, KV, L, hd]
    probs: Probs, // [1, H, L, L] attention probabilities, or their lower triangle [H, L(L+1)/2]
}

/// Activations one block's backward needs (N = Σ row lengths packed rows, see [`Packing`]; d hidden, f FFN width,
/// H/KV heads, hd head width).
pub struct BlockActs {
    x: Tensor,          // [N, d] block input (residual stream)
    rstd1: Tensor,      // [N, 1] attention RMSNorm reciprocal std
    xn1: Tensor,        // [N, d] normalized input to Q/K/V
    attn: Vec<RowAttn>, // per row: q, k, v and the attention probabilities
    ctx: Tensor,        // [N, H·hd] attention output, input to O
    x2: Tensor,         // [N, d] residual after attention
    rstd2: Tensor,      // [N, 1]
    xn2: Tensor,        // [N, d] normalized input to gate/up
    gate: Tensor,       // [N, f] gate pre-activation
    up: Tensor,         // [N, f]
}

impl BlockActs {
    pub fn bytes(&self) -> usize {
        [&self.x, &self.rstd1, &self.xn1, &self.ctx, &self.x2, &self.rstd2, &self.xn2, &self.gate, &self.up]
            .iter()
            .map(|t| tensor_bytes(t))
            .sum::<usize>()
            + self
                .attn
                .iter()
                .map(|a| tensor_bytes(&a.q) + tensor_bytes(&a.k) + tensor_bytes(&a.v) + a.probs.bytes())
                .sum::<usize>()
    }
}

fn push_if_trained(w: &dyn Weights, sink: &mut dyn GradSink, id: ParamId, g: Tensor) -> Result<()> {
    if w.trains(id) {
        sink.push(id, g)?;
    }
    Ok(())
}

pub fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// Saved state of one block: everything, or (activation recomputation) only its input.
pub enum Saved {
    All(Box<BlockActs>),
    Input(Tensor),
}

impl Saved {
    /// What `keep` keeps of a block whose forward took `input` and produced `acts` (`None` for inference). The kept
    /// attention probabilities are packed to their lower triangle here, not in the forward, so an inference pass does
    /// not pay for a pack it throws away: under the causal mask the rest is exactly 0, and the half it drops is most
    /// of a block's saved bytes at long sequences, for a gather here and a scatter in the backward.
    pub fn new(keep: Keep, input: Tensor, mut acts: BlockActs) -> Result<Option<Saved>> {
        Ok(match keep {
            Keep::Nothing => None,
            Keep::All => {
                for a in acts.attn.iter_mut() {
                    if let Probs::Full(p) = &a.probs {
                        a.probs = Probs::lower(p)?;
                    }
                }
                Some(Saved::All(Box::new(acts)))
            }
            Keep::Inputs => Some(Saved::Input(input)),
        })
    }

    pub fn bytes(&self) -> usize {
        match self {
            Saved::All(a) => a.bytes(),
            Saved::Input(x) => tensor_bytes(x),
        }
    }
}

/// What a training forward keeps for the backward.
pub struct Trace {
    ids: Tensor, // [N] token ids (packed: padding dropped)
    packing: Packing,
    blocks: Vec<Saved>,
    x_sel: Tensor,           // [P, d] final residual at the loss positions
    rstd_sel: Tensor,        // [P, 1]
    xn_sel: Tensor,          // [P, d] final-normed hidden at the loss positions
    dlogits: Tensor,         // [P, C] gradient of the loss w.r.t. the logits it read
    positions: Tensor,       // [P] u32
    classes: Option<Tensor>, // [C] u32 label-word ids
}

impl Trace {
    /// Bytes of activations held for the backward.
    pub fn bytes(&self) -> usize {
        let blocks: usize = self.blocks.iter().map(Saved::bytes).sum();
        blocks
            + [&self.x_sel, &self.rstd_sel, &self.xn_sel, &self.dlogits].iter().map(|t| tensor_bytes(t)).sum::<usize>()
    }
}

/// The result of a forward over a batch.
pub struct Output {
    /// Mean cross-entropy over the target positions.
    pub loss: f32,
    /// [P, C] logits the loss read (C = number of classes, or the vocabulary); for multiple choice [E, K], each
    /// example's option scores ([`Targets::loss`]).
    pub logits: Tensor,
    /// [P, C] the part of `logits` a side branch adds (QST's evaluation on label words: the LM head applied to
    /// (1 − α) ⊙ upsample(side state)); `None` for a model without one.
    pub side: Option<Tensor>,
}

/// How much of the forward to keep for a backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Inference: keep nothing.
    Nothing,
    /// Keep every block's activations.
    All,
    /// Keep each block's input and recompute the block during the backward.
    Inputs,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    /// Where the batches and every tensor of a pass live: the engine takes the device from here.
    device: Device,
}

impl Llama {
    /// The decoder on the CPU (the loaders' default device).
    pub fn new(cfg: LlamaConfig) -> Self {
        Self::on(cfg, Device::Cpu)
    }

    pub fn on(cfg: LlamaConfig, device: Device) -> Self {
        Llama { cfg, device }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The [`Geometry`] of `packing`'s rows for this model's blocks.
    pub fn geometry<'a>(&self, packing: &'a Packing, dtype: DType, dev: &Device) -> Result<Geometry<'a>> {
        let t = packing.max_len();
        let rope = Rope::new(t, &self.cfg.inv_freq(t), dtype, dev)?;
        Ok(Geometry { packing, rope, mask: layers::window_mask(t, self.cfg.sliding_window, dtype, dev)? })
    }

    /// Block `l` over the packed rows `x` [N, d] of `g.packing`.
    pub fn block_forward(&self, w: &dyn Weights, l: usize, x: Tensor, g: &Geometry) -> Result<(Tensor, BlockActs)> {
        let c = &self.cfg;
        let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let id = |p| ParamId::Block(l, p);
        let (xn1, rstd1) = layers::rms_norm_forward(&x, &w.vector(id(P::AttnNorm))?, c.rms_norm_eps)?;
        let [q, k, v] = self.qkv(w, l, &xn1)?;
        // Attention row by row: a row attends only to itself, so padding needs no mask and costs nothing.
        let (mut attn, mut ctx) = (Vec::new(), Vec::new());
        for (o, len) in g.packing.rows() {
            let heads = |y: &Tensor, n: usize| -> Result<Tensor> {
                Ok(y.narrow(0, o, len)?.reshape((1, len, n, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let (q, k, v) = (g.rope.forward(&heads(&q, h)?)?, g.rope.forward(&heads(&k, kv)?)?, heads(&v, kv)?);
            let m = g.mask.narrow(0, 0, len)?.narrow(1, 0, len)?;
            let (c_row, probs) = layers::attention_forward(&q, &k, &v, c.group_size(), &m)?;
            ctx.push(c_row.transpose(1, 2)?.reshape((len, h * hd))?);
            attn.push(RowAttn { q, k, v, probs: Probs::Full(probs) });
        }
        drop((q, k, v));
        let ctx = Tensor::cat(&ctx, 0)?;
        let x2 = (&x + w.linear(id(P::O), &ctx)?)?;
        let (xn2, rstd2) = layers::rms_norm_forward(&x2, &w.vector(id(P::MlpNorm))?, c.rms_norm_eps)?;
        let [gate, up] = linears(w, [id(P::Gate), id(P::Up)], &xn2)?;
        let hmid = layers::swiglu_forward(&gate, &up)?;
        let out = (&x2 + w.linear(id(P::Down), &hmid)?)?;
        Ok((out, BlockActs { x, rstd1, xn1, attn, ctx, x2, rstd2, xn2, gate, up }))
    }

    /// Block `l`'s q/k/v projections of its normed input, with their biases where the family has them.
    pub(crate) fn qkv(&self, w: &dyn Weights, l: usize, x: &Tensor) -> Result<[Tensor; 3]> {
        let [q, k, v] = linears(w, [P::Q, P::K, P::V].map(|p| ParamId::Block(l, p)), x)?;
        let bias = |y: Tensor, p: P| -> Result<Tensor> {
            match p.bias().filter(|_| self.cfg.attention_bias) {
                Some(b) => Ok(y.broadcast_add(&w.vector(ParamId::Block(l, b))?)?),
                None => Ok(y),
            }
        };
        Ok([bias(q, P::Q)?, bias(k, P::K)?, bias(v, P::V)?])
    }

    /// Backward of one block: returns dx and pushes the block's weight gradients (Down … AttnNorm).
    pub fn block_backward(
        &self,
        w: &dyn Weights,
        l: usize,
        a: &BlockActs,
        dout: &Tensor,
        g: &Geometry,
        sink: &mut dyn GradSink,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let id = |p| ParamId::Block(l, p);
        // MLP
        let hmid = layers::swiglu_forward(&a.gate, &a.up)?; // recomputed: cheaper than keeping [N, f]
        let dh = w.linear_t(id(P::Down), dout)?;
        w.weight_grad(id(P::Down), dout, &hmid, sink)?;
        drop(hmid);
        let (dgate, dup) = layers::swiglu_backward(&dh, &a.gate, &a.up)?;
        drop(dh);
        let dxn2 = (w.linear_t(id(P::Gate), &dgate)? + w.linear_t(id(P::Up), &dup)?)?;
        w.weight_grad(id(P::Up), &dup, &a.xn2, sink)?;
        w.weight_grad(id(P::Gate), &dgate, &a.xn2, sink)?;
        let (dx2n, dw) = layers::rms_norm_backward(&dxn2, &a.x2, &w.vector(id(P::MlpNorm))?, &a.rstd2)?;
        push_if_trained(w, sink, id(P::MlpNorm), dw)?;
        let dx2 = (dout + dx2n)?;
        // Attention
        let dctx = w.linear_t(id(P::O), &dx2)?;
        w.weight_grad(id(P::O), &dx2, &a.ctx, sink)?;
        let (mut dq, mut dk, mut dv) = (Vec::new(), Vec::new(), Vec::new());
        for ((o, len), r) in g.packing.rows().zip(&a.attn) {
            let dctx = dctx.narrow(0, o, len)?.reshape((1, len, h, hd))?.transpose(1, 2)?.contiguous()?;
            let (q, k, v) = layers::attention_backward(&dctx, &r.q, &r.k, &r.v, &r.probs.full()?, c.group_size())?;
            let flat = |y: Tensor, n: usize| -> Result<Tensor> { Ok(y.transpose(1, 2)?.reshape((len, n * hd))?) };
            dq.push(flat(g.rope.backward(&q)?, h)?);
            dk.push(flat(g.rope.backward(&k)?, kv)?);
            dv.push(flat(v, kv)?);
        }
        drop(dctx);
        let (dq, dk, dv) = (Tensor::cat(&dq, 0)?, Tensor::cat(&dk, 0)?, Tensor::cat(&dv, 0)?);
        let dxn1 = ((w.linear_t(id(P::Q), &dq)? + w.linear_t(id(P::K), &dk)?)? + w.linear_t(id(P::V), &dv)?)?;
        for (p, dy) in [(P::V, &dv), (P::K, &dk), (P::Q, &dq)] {
            if let Some(b) = p.bias().filter(|_| c.attention_bias) {
                push_if_trained(w, sink, id(b), dy.sum(0)?)?;
            }
            w.weight_grad(id(p), dy, &a.xn1, sink)?;
        }
        let (dxn, dw) = layers::rms_norm_backward(&dxn1, &a.x, &w.vector(id(P::AttnNorm))?, &a.rstd1)?;
        push_if_trained(w, sink, id(P::AttnNorm), dw)?;
        Ok((dx2 + dxn)?)
    }

    /// Block `l`'s activations for its backward: the saved ones, or recomputed from its saved input.
    pub fn block_acts(&self, w: &dyn Weights, l: usize, saved: Saved, g: &Geometry) -> Result<BlockActs> {
        Ok(match saved {
            Saved::All(a) => *a,
            Saved::Input(x) => self.block_forward(w, l, x, g)?.1,
        })
    }

    /// Runs the blocks over the packed token ids `ids` [N] of `packing`; returns the final residual stream [N, d]
    /// and what `keep` asks for. `visit` sees the embeddings (i = 0) and each block's output (i = l + 1) the moment
    /// they exist.
    fn trunk(
        &self,
        w: &dyn Weights,
        ids: &Tensor,
        packing: &Packing,
        keep: Keep,
        dtype: DType,
        visit: Visit,
    ) -> Result<(Tensor, Vec<Saved>)> {
        let dev = ids.device();
        let mut x = w.rows(ParamId::Embed, ids)?.to_dtype(dtype)?;
        visit(0, &x)?;
        let g = self.geometry(packing, dtype, dev)?;
        let mut saved = Vec::new();
        for l in 0..self.cfg.num_hidden_layers {
            let input = x.clone();
            let (out, acts) = self.block_forward(w, l, x, &g)?;
            saved.extend(Saved::new(keep, input, acts)?);
            x = out;
            visit(l + 1, &x)?;
        }
        Ok((x, saved))
    }

    /// An inference pass over the blocks that keeps nothing and hands the embeddings (i = 0) and each block's
    /// output (i = l + 1), all packed [N, d], to `visit` as soon as they exist; returns the final residual stream.
    /// `ids` [N] are the packed ids of `packing` ([`Packing::ids`]). QST's side network reads the frozen base this
    /// way, keeping only what it derives from each state.
    pub fn hidden_states(
        &self,
        w: &dyn Weights,
        ids: &Tensor,
        packing: &Packing,
        dtype: DType,
        visit: Visit,
    ) -> Result<Tensor> {
        Ok(self.trunk(w, ids, packing, Keep::Nothing, dtype, visit)?.0)
    }

    /// LM-head logits of final-normed hidden states `xn` [P, d]: over the label words `classes` [C] when the task
    /// has them (only those rows of the head are read), else over the vocabulary.
    pub fn head_forward(&self, w: &dyn Weights, xn: &Tensor, classes: Option<&Tensor>) -> Result<Tensor> {
        let head = ParamId::head(&self.cfg);
        Ok(match classes {
            Some(c) => xn.matmul(&w.rows(head, c)?.to_dtype(xn.dtype())?.t()?)?,
            None => w.linear(head, xn)?,
        })
    }

    /// The input gradient of [`Llama::head_forward`]: dxn [P, d] from dlogits [P, C].
    pub fn head_backward(&self, w: &dyn Weights, dlogits: &Tensor, classes: Option<&Tensor>) -> Result<Tensor> {
        let head = ParamId::head(&self.cfg);
        Ok(match classes {
            Some(cl) => dlogits.matmul(&w.rows(head, cl)?.to_dtype(dlogits.dtype())?)?,
            None => w.linear_t(head, dlogits)?,
        })
    }

    /// The forward over a batch: loss and logits at the target positions; with `keep != Nothing` also the trace a
    /// backward needs. The LM head is evaluated only where the loss reads it, and only for the label words when
    /// the task has them.
    pub fn forward(&self, w: &dyn Weights, batch: &Batch, keep: Keep) -> Result<(Output, Option<Trace>)> {
        let dtype = w.vector(ParamId::FinalNorm)?.dtype();
        let dev = batch.ids.device().clone();
        let packing = Packing::of(batch)?;
        let ids = packing.ids(&batch.ids)?;
        let (x, blocks) = self.trunk(w, &ids, &packing, keep, dtype, &mut |_, _| Ok(()))?;
        let tg = &batch.targets;
        let positions = Tensor::new(packing.positions(&tg.positions)?.as_slice(), &dev)?;
        let x_sel = x.index_select(&positions, 0)?;
        drop(x);
        let (xn_sel, rstd_sel) =
            layers::rms_norm_forward(&x_sel, &w.vector(ParamId::FinalNorm)?, self.cfg.rms_norm_eps)?;
        let classes = tg.classes.as_ref().map(|c| Tensor::new(c.as_slice(), &dev)).transpose()?;
        let logits = self.head_forward(w, &xn_sel, classes.as_ref())?;
        let (loss, dlogits, scores) = tg.loss(&logits)?;
        let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()? as f32;
        let trace = (keep != Keep::Nothing).then_some(Trace {
            ids,
            packing,
            blocks,
            x_sel,
            rstd_sel,
            xn_sel,
            dlogits,
            positions,
            classes,
        });
        Ok((Output { loss, logits: scores, side: None }, trace))
    }

    /// The backward of [`Llama::forward`]: pushes every parameter's gradient into `sink` in reverse forward order.
    pub fn backward(&self, w: &dyn Weights, trace: Trace, sink: &mut dyn GradSink) -> Result<()> {
        let c = &self.cfg;
        let Trace { ids, packing, mut blocks, x_sel, rstd_sel, xn_sel, dlogits, positions, classes } = trace;
        let dtype = xn_sel.dtype();
        let dev = xn_sel.device().clone();
        let head = ParamId::head(c);
        let vocab_zeros = || Tensor::zeros((c.vocab_size, c.hidden_size), dtype, &dev);
        // LM head: only the rows the loss read get a gradient when the task has label words.
        let dxn_sel = self.head_backward(w, &dlogits, classes.as_ref())?;
        let dhead = if w.trains(head) {
            Some(match &classes {
                Some(cl) => vocab_zeros()?.index_add(cl, &dlogits.t()?.matmul(&xn_sel)?, 0)?,
                None => dlogits.t()?.matmul(&xn_sel)?,
            })
        } else {
            None
        };
        // A tied head's gradient joins the embedding gradient at the end of the backward.
        let mut dembed = None;
        if c.tie_word_embeddings {
            dembed = dhead;
        } else if let Some(d) = dhead {
            sink.push(ParamId::LmHead, d)?;
        }
        let (dx_sel, dnorm) = layers::rms_norm_backward(&dxn_sel, &x_sel, &w.vector(ParamId::FinalNorm)?, &rstd_sel)?;
        push_if_trained(w, sink, ParamId::FinalNorm, dnorm)?;
        let mut dx = Tensor::zeros((packing.n(), c.hidden_size), dtype, &dev)?.index_add(&positions, &dx_sel, 0)?;
        let g = self.geometry(&packing, dtype, &dev)?;
        for l in (0..c.num_hidden_layers).rev() {
            let saved = blocks.pop().expect("one saved entry per block");
            let acts = self.block_acts(w, l, saved, &g)?;
            dx = self.block_backward(w, l, &acts, &dx, &g, sink)?;
        }
        if w.trains(ParamId::Embed) {
            let demb_rows = vocab_zeros()?.index_add(&ids, &dx, 0)?;
            let dembed = match dembed {
                Some(d) => (d + demb_rows)?,
                None => demb_rows,
            };
            sink.push(ParamId::Embed, dembed)?;
        }
        Ok(())
    }

    /// Logits at every position, [B, T, vocab] (parity tests and generation; training never needs them).
    pub fn logits(&self, w: &dyn Weights, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let dtype = w.vector(ParamId::FinalNorm)?.dtype();
        let x = self.hidden_states(w, &ids.flatten_all()?, &Packing::full(b, t)?, dtype, &mut |_, _| Ok(()))?;
        let (xn, _) = layers::rms_norm_forward(&x, &w.vector(ParamId::FinalNorm)?, self.cfg.rms_norm_eps)?;
        let logits = w.linear(ParamId::head(&self.cfg), &xn)?;
        Ok(logits.reshape((b, t, self.cfg.vocab_size))?)
    }

    /// Next-token logits [vocab] after the prompt `ids` (no KV cache: generation here is for eyeballing).
    pub fn next_logits(&self, w: &dyn Weights, ids: &[u32], dev: &Device) -> Result<Tensor> {
        let t = ids.len();
        let dtype = w.vector(ParamId::FinalNorm)?.dtype();
        let x = self.hidden_states(w, &Tensor::new(ids, dev)?, &Packing::full(1, t)?, dtype, &mut |_, _| Ok(()))?;
        let last = x.narrow(0, t - 1, 1)?;
        let (xn, _) = layers::rms_norm_forward(&last, &w.vector(ParamId::FinalNorm)?, self.cfg.rms_norm_eps)?;
        Ok(w.linear(ParamId::head(&self.cfg), &xn)?.flatten_all()?.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The whole model's backward against central finite differences of its loss in f64, for tied and untied
    //! heads, label-word and full-vocabulary losses, and with activation recomputation. Budget: 1e-6 relative.
    use super::*;
    use crate::model::batch::Targets;
    use crate::train::DenseGrads;

    const FD_BUDGET: f64 = 1e-6;

    pub fn tiny_config(tied: bool) -> LlamaConfig {
        LlamaConfig {
            vocab_size: 32,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 4,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 64,
            tie_word_embeddings: tied,
            bos_token_id: None,
            eos_token_id: None,
            arch: Default::default(),
            attention_bias: false,
            rope_scaling: None,
            sliding_window: None,
        }
    }

    /// A right-padded two-row batch on the tiny vocabulary: label words at the last real token, or every next token.
    pub fn batch(classes: bool) -> Batch {
        let ids = Tensor::new(&[[3u32, 7, 1, 30, 12, 5], [9, 2, 2, 17, 0, 0]], &Device::Cpu).unwrap();
        let targets = if classes {
            Targets { positions: vec![5, 6 + 3], classes: Some(vec![4, 11, 20]), labels: vec![2, 0], choices: None }
        } else {
            Targets {
                positions: vec![0, 1, 2, 3, 4, 6, 7, 8],
                classes: None,
                labels: vec![7, 1, 30, 12, 5, 2, 2, 17],
                choices: None,
            }
        };
        Batch { ids, lengths: vec![6, 4], targets }
    }

    fn loss(m: &Llama, p: &ParamStore, b: &Batch) -> f64 {
        let (out, _) = m.forward(p, b, Keep::Nothing).unwrap();
        // Recompute in f64 from the logits: Output::loss is rounded to f32.
        let labels = Tensor::new(b.targets.labels.as_slice(), &Device::Cpu).unwrap();
        layers::cross_entropy(&out.logits, &labels).unwrap().0.to_scalar::<f64>().unwrap()
    }

    fn check_model(tied: bool, classes: bool, keep: Keep) {
        let cfg = tiny_config(tied);
        let m = Llama::new(cfg.clone());
        let p = ParamStore::random(&cfg, 7, 0.3, DType::F64).unwrap();
        let b = batch(classes);
        let (_, trace) = m.forward(&p, &b, keep).unwrap();
        let mut grads = DenseGrads::default();
        m.backward(&p, trace.unwrap(), &mut grads).unwrap();
        let h = 1e-6;
        for id in ParamId::all(&cfg) {
            let g = grads.get(id).unwrap_or_else(|| panic!("no gradient for {id:?}"));
            let gv: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            let scale = gv.iter().fold(1e-4f64, |m, x| m.max(x.abs()));
            let w: Vec<f64> = p.get(id).flatten_all().unwrap().to_vec1().unwrap();
            // Probe a few entries per tensor, including ones the classes subset leaves at zero.
            for i in [0, w.len() / 3, w.len() / 2, w.len() - 1] {
                let mut q = p.clone();
                let mut wp = w.clone();
                wp[i] += h;
                q.set(id, Tensor::from_vec(wp, p.get(id).shape(), &Device::Cpu).unwrap());
                let lp = loss(&m, &q, &b);
                let mut wm = w.clone();
                wm[i] -= h;
                q.set(id, Tensor::from_vec(wm, p.get(id).shape(), &Device::Cpu).unwrap());
                let lm = loss(&m, &q, &b);
                let fd = (lp - lm) / (2.0 * h);
                let err = (fd - gv[i]).abs() / scale;
                assert!(
                    err < FD_BUDGET,
                    "{id:?}[{i}] fd {fd} analytic {} rel {err:e} (tied {tied}, classes {classes}, {keep:?})",
                    gv[i]
                );
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences_tied_label_words() {
        check_model(true, true, Keep::All);
    }

    #[test]
    fn backward_matches_finite_differences_untied_full_vocab() {
        check_model(false, false, Keep::All);
    }

    #[test]
    fn backward_with_recomputation_matches_finite_differences() {
        check_model(true, false, Keep::Inputs);
    }

    /// The gradient stack contract: gradients arrive in exactly the reverse of `ParamId::all`, once each.
    #[test]
    fn gradients_arrive_in_reverse_forward_order() {
        struct Order(Vec<ParamId>);
        impl GradSink for Order {
            fn push(&mut self, id: ParamId, _g: Tensor) -> Result<()> {
                self.0.push(id);
                Ok(())
            }
        }
        for tied in [true, false] {
            let cfg = tiny_config(tied);
            let m = Llama::new(cfg.clone());
            let p = ParamStore::random(&cfg, 1, 0.3, DType::F32).unwrap();
            let (_, trace) = m.forward(&p, &batch(true), Keep::All).unwrap();
            let mut order = Order(vec![]);
            m.backward(&p, trace.unwrap(), &mut order).unwrap();
            let mut want = ParamId::all(&cfg);
            want.reverse();
            assert_eq!(order.0, want);
        }
    }

    /// A packed batch gives each row what the row gives alone: logits and gradients (f64, budget 1e-12 relative).
    #[test]
    fn packed_rows_match_rows_run_alone() {
        let cfg = tiny_config(true);
        let m = Llama::new(cfg.clone());
        let p = ParamStore::random(&cfg, 5, 0.3, DType::F64).unwrap();
        let both = batch(true);
        let alone = |row: usize, len: usize| Batch {
            ids: both.ids.narrow(0, row, 1).unwrap().narrow(1, 0, len).unwrap().contiguous().unwrap(),
            lengths: vec![len],
            targets: Targets {
                positions: vec![len as u32 - 1],
                labels: vec![both.targets.labels[row]],
                ..both.targets.clone()
            },
        };
        let grads = |b: &Batch| {
            let (out, trace) = m.forward(&p, b, Keep::All).unwrap();
            let mut g = DenseGrads::default();
            m.backward(&p, trace.unwrap(), &mut g).unwrap();
            (out.logits, g)
        };
        let (logits, g) = grads(&both);
        let rows: Vec<_> = [(0, 6), (1, 4)].iter().map(|&(r, l)| grads(&alone(r, l))).collect();
        let close = |a: &Tensor, b: &Tensor| {
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1e-12);
            let err = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() / scale;
            assert!(err < 1e-12, "rel err {err:e}");
        };
        close(&logits, &Tensor::cat(&[&rows[0].0, &rows[1].0], 0).unwrap());
        // The batch loss is the mean over its rows, so its gradient is the mean of the rows' gradients.
        for id in ParamId::all(&cfg) {
            let mean = ((rows[0].1.get(id).unwrap() + rows[1].1.get(id).unwrap()).unwrap() * 0.5).unwrap();
            close(g.get(id).unwrap(), &mean);
        }
    }

    /// A loss position in a row's padding, or past the batch, is an error, not a silent read of a pad token.
    #[test]
    fn loss_positions_in_padding_are_rejected() {
        let pk = Packing::new(&[6, 4], 6).unwrap();
        assert_eq!(pk.positions(&[5, 6, 9]).unwrap(), vec![5, 6, 9]);
        assert!(pk.positions(&[10]).is_err());
        assert!(pk.positions(&[12]).is_err());
        assert!(Packing::new(&[7], 6).is_err() && Packing::new(&[0], 6).is_err());
    }

    /// Right padding: the loss positions of a row do not depend on what follows them.
    #[test]
    fn padding_does_not_change_real_positions() {
        let cfg = tiny_config(true);
        let m = Llama::new(cfg.clone());
        let p = ParamStore::random(&cfg, 3, 0.3, DType::F64).unwrap();
        let a = m.logits(&p, &Tensor::new(&[[9u32, 2, 2, 17, 0, 0]], &Device::Cpu).unwrap()).unwrap();
        let b = m.logits(&p, &Tensor::new(&[[9u32, 2, 2, 17, 31, 8]], &Device::Cpu).unwrap()).unwrap();
        let d = (a.narrow(1, 0, 4).unwrap() - b.narrow(1, 0, 4).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f64>().unwrap(), 0.0);
    }
}

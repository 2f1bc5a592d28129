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
pub mod config;
pub mod export;
pub mod side;

pub use config::{side_config, side_param_shapes, Downsample, QstArgs, QstConfig, SideParam, Start};
pub use export::QstModel;
pub use side::{scratch_bytes, trace_bytes, SideNet};

use super::lora::Update;
use super::Storage;
use crate::checkpoint::{StateReader, StateWriter};
use crate::model::quantized::Source;
use crate::model::{Batch, Llama, LlamaConfig, Output, ParamId, Tok, Weights};
use crate::train::eval::EvalProbe;
use crate::train::first_order::{self, FirstOrder, Micro};
use crate::train::memory::Breakdown;
use crate::train::trained;
use crate::train::{DenseGrads, Figures, Method, OnNonFinite, StepStats};
use crate::{Error, Result};
use candle_core::Tensor;
use std::path::Path;

/// The QST method: [`QstModel`] with AdamW (or Lion) on the side network only.
pub struct Qst {
    model: QstModel,
    update: Update,
    /// The step's side-network gradients, summed over its micro-batches.
    grads: DenseGrads<SideParam>,
}

impl Qst {
    /// QST with its side network (and NF4 base) on `dev`.
    pub fn new(source: Source, cfg: QstConfig, update: Update, dev: &candle_core::Device) -> Result<Self> {
        Ok(Qst { model: QstModel::new(source, cfg, dev)?, update, grads: DenseGrads::default() })
    }
}

impl FirstOrder for Qst {
    fn loop_options(&self) -> (Option<f64>, OnNonFinite) {
        (self.update.clip, self.update.on_nan)
    }

    fn accumulate(&mut self, model: &Llama, batch: &Batch, _micro: (usize, usize), _lr: f64) -> Result<Micro> {
        let net = &self.model.net;
        let (out, trace) = net.forward(model, self.model.base.as_ref(), batch, net.cfg.keep)?;
        let trace = trace.ok_or_else(|| Error::Msg("a training forward keeps a trace".into()))?;
        let (activations, scratch) = (trace.bytes(), net.scratch_bytes(model, &batch.lengths));
        net.backward(model, self.model.base.as_ref(), trace, &mut self.grads)?;
        Ok(Micro { loss: out.loss, activations, scratch })
    }

    fn summed(&mut self) -> Result<(usize, Option<f64>)> {
        Ok((self.grads.bytes(), Some(self.grads.global_norm()?)))
    }

    fn update(&mut self, scale: Option<f64>, lr: f64) -> Result<Figures> {
        let params = &mut self.model.net.params;
        trained::apply(&mut self.update.opt, params, &mut self.grads, scale, lr)?;
        if self.model.net.cfg.alpha_clamp {
            let alpha = params.get(SideParam::Alpha).clamp(0f32, 1f32)?;
            params.set(SideParam::Alpha, alpha);
        }
        Ok(Vec::new())
    }

    fn optimizer_bytes(&self) -> usize {
        self.update.opt.state_bytes()
    }

    /// Only the side network's gradients travel: the base is frozen.
    fn reduce(&mut self) -> Result<()> {
        self.grads.all_reduce()
    }
}

impl Method for Qst {
    fn name(&self) -> &'static str {
        "qst"
    }

    fn step(&mut self, model: &Llama, micro: &[Batch], lr: f64) -> Result<StepStats> {
        first_order::step(self, model, micro, lr)
    }

    fn forward(&self, model: &Llama, batch: &Batch) -> Result<Output> {
        self.model.forward(model, batch)
    }

    fn eval_probe(&self) -> Option<Box<dyn EvalProbe>> {
        Some(Box::new(SideShare::default()))
    }

    /// The frozen NF4 base (QST's model is base + side network: evaluation goes through [`Method::forward`]).
    fn weights(&self) -> &dyn Weights {
        self.model.base.as_ref()
    }

    fn trainable_params(&self) -> usize {
        self.model.trainable_params()
    }

    fn state_bytes(&self) -> Breakdown {
        let (base, net) = (self.model.base.cfg(), &self.model.net);
        planned_state(base, &net.cfg, self.update.opt.state_bytes_per_param())
            .expect("the model was built with this configuration")
    }

    fn held_bytes(&self) -> Breakdown {
        Breakdown {
            weights: self.model.weight_bytes(),
            gradients: self.grads.bytes(),
            optimizer: self.update.opt.state_bytes(),
            ..Default::default()
        }
    }

    /// The frozen base runs forward only; the side network is ~1% of it.
    fn flops_per_param(&self) -> f64 {
        2.0
    }

    /// The side network and its optimizer state (the NF4 base is re-quantized from the model file).
    fn save_state(&self, w: &mut StateWriter) -> Result<()> {
        trained::save(w, &self.model.net.params, &self.update.opt)
    }

    fn load_state(&mut self, r: &StateReader) -> Result<()> {
        trained::load(r, &mut self.model.net.params, &mut self.update.opt)
    }

    fn export_tensor(&self, _id: ParamId) -> Result<Tensor> {
        Err(Error::Option(
            "qst: the side network is not a LLaMA checkpoint; the run exports side.safetensors and qst.json".into(),
        ))
    }

    /// Writes `dir/{side.safetensors, qst.json, tokenizer.json}`; the base is referenced, not copied.
    fn export(
        &self,
        _cfg: &LlamaConfig,
        dir: &Path,
        tok: Option<&Tok>,
        base_model: &str,
        _opts: &crate::model::export::ExportArgs,
    ) -> Result<()> {
        self.model.export(dir, tok, base_model)
    }
}

/// The model state of a QST step: the NF4 base, the f32 side network, its gradients and `optimizer` bytes of state
/// per side-network entry.
pub fn planned_state(base: &LlamaConfig, q: &QstConfig, optimizer: usize) -> Result<Breakdown> {
    let side = side_config(base, q.r, q.side_heads)?;
    let sp: usize = side_param_shapes(base, &side, q).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    Ok(Breakdown {
        weights: Storage::Nf4.model_bytes(base)? + 4 * sp,
        gradients: 4 * sp,
        optimizer: optimizer * sp,
        ..Default::default()
    })
}

/// QST's evaluation figure on label words: Σ‖side‖ / Σ‖rest‖ over the examples, each a row of label-word logits
/// centred over the classes (softmax ignores a common shift), where `side` is the side branch's part of the logits
/// ([`Output::side`]: the head applied to (1 − α) ⊙ up(side state)) and `rest` the others': how far the side branch
/// moves the answer against the frozen base (with two label words, the ratio of their |logit margins|).
#[derive(Default)]
pub struct SideShare {
    /// (Σ‖side‖, Σ‖rest‖) over the rows seen, None before any row with a side part.
    sums: Option<(f64, f64)>,
}

impl EvalProbe for SideShare {
    fn observe(&mut self, out: &Output) -> Result<()> {
        let Some(side) = &out.side else { return Ok(()) };
        let (logits, side): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (out.logits.to_vec2()?, side.to_vec2()?);
        // ‖v − mean(v)‖ of a row of logits.
        let centred_norm = |v: &[f64]| {
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            v.iter().map(|x| (x - mean).powi(2)).sum::<f64>().sqrt()
        };
        let (s, r) = self.sums.get_or_insert((0.0, 0.0));
        for (row, side) in logits.iter().zip(&side) {
            let sv: Vec<f64> = side.iter().map(|&x| x as f64).collect();
            let rv: Vec<f64> = row.iter().zip(side).map(|(&l, &x)| l as f64 - x as f64).collect();
            *s += centred_norm(&sv);
            *r += centred_norm(&rv);
        }
        Ok(())
    }

    fn figures(&self) -> Vec<(&'static str, f64)> {
        self.sums.map(|(s, r)| vec![("side_share", s / r)]).unwrap_or_default()
    }

    fn describe(&self) -> String {
        self.sums.map_or(String::new(), |(s, r)| format!("side branch {:.2}% of the logit spread", 100.0 * s / r))
    }
}

#[cfg(test)]
mod tests {
    //! Every new backward against central finite differences in f64 (budget 1e-6 relative to the gradient's
    //! scale): gates, output mix, each downsample variant, and the whole QST model with every trained tensor probed.
    //! Plus: the first forward is the NF4 base model's, bit for bit; what the trace keeps; the trainable fraction.
    use super::config::*;
    use super::side::*;
    use super::*;
    use crate::model::layers;
    use crate::model::layers::tests::{check, rand};
    use crate::model::llama::tests::{batch, tiny_config};
    use crate::model::Keep;
    use crate::model::ParamStore;
    use crate::model::Targets;
    use crate::train::optim::{AdamWConfig, Optimizer};
    use candle_core::{DType, Device};

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
            arch: Default::default(),
            attention_bias: false,
            rope_scaling: None,
            sliding_window: None,
        }
    }

    /// A side network whose every tensor is random, so no gradient vanishes (at init α = 1 cuts the side network
    /// off).
    fn random_net(base: &LlamaConfig, q: QstConfig) -> SideNet {
        let mut net = SideNet::new(base, q, DType::F64, &Device::Cpu).unwrap();
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
            let net = SideNet::new(&base, QstConfig { r, ..qcfg(ds, Keep::All) }, DType::F64, &Device::Cpu).unwrap();
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

    fn adamw() -> Update {
        Update { opt: Optimizer::adamw(AdamWConfig::default()), clip: Some(1.0), on_nan: OnNonFinite::Stop }
    }

    fn tiny_qst(ds: Downsample) -> (Llama, Qst) {
        let cfg = tiny_config(true);
        let p = ParamStore::random(&cfg, 3, 0.3, DType::F32).unwrap();
        (Llama::new(cfg), Qst::new(Source::Params(p.clone()), qcfg(ds, Keep::All), adamw(), &Device::Cpu).unwrap())
    }

    /// The start point: α = 1 (with a random upsample) reproduces the NF4 base model's logits bit for bit, and the
    /// dequantized f32 model's up to the kernels' summation order.
    #[test]
    fn first_forward_equals_the_base_model() {
        let (m, q) = tiny_qst(Downsample::Adapter);
        let dense = q.model.base.dense_model().unwrap();
        for classes in [true, false] {
            let b = batch(classes);
            let got = q.forward(&m, &b).unwrap();
            let nf4 = m.forward(q.model.base.as_ref(), &b, Keep::Nothing).unwrap().0;
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
            let mut qst = Qst::new(Source::Params(p.clone()), q, adamw(), &Device::Cpu).unwrap();
            let out = qst.forward(&m, &b).unwrap();
            let got: Vec<f32> = out.logits.flatten_all().unwrap().to_vec1().unwrap();
            let base = m.forward(qst.model.base.as_ref(), &b, Keep::Nothing).unwrap().0.logits;
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
            let mut qst = Qst::new(Source::Params(p.clone()), q, adamw(), &Device::Cpu).unwrap();
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
            let mut qst = Qst::new(Source::Params(p.clone()), q, adamw(), &Device::Cpu).unwrap();
            qst.step(&m, std::slice::from_ref(&b), 1e-2).unwrap();
            let alpha: Vec<f32> = qst.model.net.params.get(SideParam::Alpha).to_vec1().unwrap();
            let (above, below) = (alpha.iter().any(|&a| a > 1.0), alpha.iter().any(|&a| a < 1.0));
            assert_eq!((above, below), (!clamp, true), "clamp {clamp}: {alpha:?}");
        }
        let q = QstConfig { alpha_clamp: true, start: Start::Code, ..qcfg(Downsample::Adapter, Keep::All) };
        assert!(Qst::new(Source::Params(p), q, adamw(), &Device::Cpu).is_err());
    }

    #[test]
    fn training_steps_lower_the_loss() {
        let (m, mut q) = tiny_qst(Downsample::Adapter);
        let b = batch(true);
        let first = q.step(&m, std::slice::from_ref(&b), 1e-2).unwrap();
        let mut last = first.clone();
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
            let net =
                SideNet::new(&cfg, QstConfig { adapter_rank: 4, ..qcfg(ds, Keep::All) }, DType::F32, &Device::Cpu)
                    .unwrap();
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
        let b = Method::state_bytes(&q);
        assert_eq!(b.weights, nf4 + 4 * side);
        assert_eq!((b.gradients, b.optimizer), (4 * side, 8 * side));
    }

    #[test]
    fn export_writes_the_side_network_and_a_manifest() {
        let (_, q) = tiny_qst(Downsample::Lora);
        let dir = tempfile::tempdir().unwrap();
        q.export(&tiny_config(true), dir.path(), None, "models/base.gguf", &Default::default()).unwrap();
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
    /// loss at the last position: the QST-vs-LoRA memory comparison. Minutes of CPU and ~15 GB; run one
    /// per process, in release, on a big machine: `cargo test --release --lib peak_rss_ -- --ignored --exact
    /// methods::qst::tests::peak_rss_qst` (VmHWM is per process).
    fn probe(method: &str, recompute: bool) {
        let cfg = smollm2_config();
        let params = ParamStore::random(&cfg, 1, 0.02, DType::F32).unwrap();
        let mut o = crate::methods::MethodOptions::default();
        o.first_order.recompute = recompute;
        let kind: crate::methods::MethodKind = clap::ValueEnum::from_str(method, false).unwrap();
        let ctx = crate::methods::RunContext::cpu(0, OnNonFinite::Stop, 1);
        let mut m = kind.build(&o, Source::Params(params), &ctx).unwrap();
        let lr = kind.default_lr(&o);
        let (b, t) = (16, 512);
        let ids: Vec<u32> =
            (0..(b * t) as u64).map(|i| (i.wrapping_mul(2654435761) % cfg.vocab_size as u64) as u32).collect();
        let targets = Targets {
            positions: (0..b).map(|r| (r * t + t - 1) as u32).collect(),
            classes: Some(vec![4093, 6369]),
            labels: (0..b).map(|r| (r % 2) as u32).collect(),
            choices: None,
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

    /// The side share against a hand computation: rows of 3 label-word logits, each centred over the classes.
    /// Example 0: logits [3, 1, 2] with side part [1, 0, 2], so rest [2, 1, 0]: centred norms √2 and √2.
    /// Example 1: logits [4, 1, 1], side [0, 0, 0]: rest's centred norm √6. Share √2 / (√2 + √6); budget 1e-12.
    /// Seen in one batch or in two, the share is the same; an output without a side part adds nothing.
    #[test]
    fn side_share_matches_a_hand_computation() {
        let out = |rows: &[([f32; 3], [f32; 3])]| {
            let p = rows.len();
            let logits = Tensor::from_vec(rows.iter().flat_map(|r| r.0).collect(), (p, 3), &Device::Cpu).unwrap();
            let side = Tensor::from_vec(rows.iter().flat_map(|r| r.1).collect(), (p, 3), &Device::Cpu).unwrap();
            Output { loss: 0.0, logits, side: Some(side) }
        };
        let (a, b) = (([3., 1., 2.], [1., 0., 2.]), ([4., 1., 1.], [0., 0., 0.]));
        let want = 2f64.sqrt() / (2f64.sqrt() + 6f64.sqrt());
        let mut one = SideShare::default();
        one.observe(&out(&[a, b])).unwrap();
        let mut two = SideShare::default();
        two.observe(&out(&[a])).unwrap();
        two.observe(&out(&[b])).unwrap();
        two.observe(&Output { side: None, ..out(&[a]) }).unwrap();
        for p in [one, two] {
            let got = p.figures()[0].1;
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        assert!(SideShare::default().figures().is_empty(), "no side part seen, no figure");
    }
}

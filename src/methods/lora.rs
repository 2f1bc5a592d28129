//! LoRA (Hu et al. 2021) and QLoRA (Dettmers et al. 2023): the parameter-efficient baselines QST is compared
//! against, in the same engine. The base is frozen: f32 ([`ParamStore`], `lora`) or NF4 with double quantization
//! ([`QuantStore<Nf4Tensor>`], `qlora`, blocks of 64 / 256 as bitsandbytes stores them). Every attention and MLP
//! projection (q, k, v, o, gate, up, down: PEFT's `all-linear` minus the LM head, QLoRA's setting) gets a pair of
//! factors A [r, in], B [out, r]:
//!   y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ,  s = alpha / r,
//! with PEFT's defaults: A Kaiming-uniform (PyTorch's `nn.Linear` init), B zero (so the first forward is the base
//! model's), no dropout, r = 8, alpha = 16. Embeddings, norms and the LM head stay frozen.
//!
//! Gradients flow through the frozen base as in QLoRA: the model's hand-written backward calls
//! [`Weights::weight_grad`] with (dy, x) for each projection, and [`LoraWeights`] forms the factor gradients there,
//! without materializing dyᵀ·x ([out, in]):
//!   dB = s·dyᵀ·(x·Aᵀ) [out, r],   dA = s·(dy·B)ᵀ·x [r, in].
//! The model's [`GradSink`] is keyed by model parameter, and every model parameter is frozen here, so the factor
//! gradients collect in a buffer inside the weights (a `RefCell`, written during the backward that only borrows
//! them) rather than widening the sink interface for one method.
//!
//! Deviation from QLoRA/bitsandbytes: `qlora` quantizes the (tied) embedding too, as every matrix of a
//! [`QuantStore`] is quantized; bitsandbytes keeps embeddings and the LM head in 16 bits. QST shares this base.
//!
//! Export merges W + s·B·A into a full f32 checkpoint (for `qlora`, into the dequantized NF4 base: the model that
//! was trained, which is what a user merging a QLoRA adapter wants).
//!
//! [`Update`] (the optimizer of a method's own tensors) and [`FrozenBase`] are shared with QST.
use super::Storage;
use crate::checkpoint::{StateReader, StateWriter};
use crate::model::quantized::{quant_err, Compute, QuantStore, Source};
use crate::model::{Batch, BlockParam, GradSink, Keep, Llama, LlamaConfig, ParamId, ParamStore, Weights};
use crate::train::first_order::{self, FirstOrder, Micro};
use crate::train::memory::{block_scratch_bytes, Breakdown};
use crate::train::optim::Optimizer;
use crate::train::trained::{self, Trained};
use crate::train::{DenseGrads, Figures, Method, OnNonFinite, StepStats};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use qtune_quant::rng::{fill_uniform, RngKey, STREAM_GAUSS};
use qtune_quant::{Nf4Tensor, QuantWeight};
use std::cell::RefCell;

/// LoRA's options (read by lora, qlora, and mezo/quzo --lora).
#[derive(clap::Args, Clone, Debug, PartialEq)]
#[command(next_help_heading = "LoRA (lora, qlora, mezo --lora, quzo --lora)")]
pub struct LoraArgs {
    /// LoRA/QLoRA (and mezo/quzo --lora) rank.
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    /// LoRA/QLoRA alpha (the update is scaled by alpha / r).
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
}
crate::options::defaults_from_clap!(LoraArgs);

/// The optimizer half of a first-order method over its own tensors (LoRA factors, QST's side network).
pub struct Update {
    pub opt: Optimizer,
    /// Global-norm clip (None: no clipping).
    pub clip: Option<f64>,
    pub on_nan: OnNonFinite,
}

/// NF4 block size (QLoRA / bitsandbytes); the double quantization's block of 256 is fixed in `Nf4Tensor`.
pub const NF4_BLOCK: usize = 64;

/// The projections LoRA adapts, in forward order.
pub const TARGETS: [BlockParam; 7] =
    [BlockParam::Q, BlockParam::K, BlockParam::V, BlockParam::O, BlockParam::Gate, BlockParam::Up, BlockParam::Down];

/// Quantizes a model to NF4 with double quantization, matrix by matrix (the frozen base of `qlora` and `qst`).
pub fn nf4_base(source: Source) -> Result<QuantStore<Nf4Tensor>> {
    source.quantize(&mut nf4_quantizer)
}

/// QLoRA's quantizer of one matrix: NF4, blocks of [`NF4_BLOCK`], double quantization.
pub fn nf4_quantizer(_: ParamId, d: &[f32], r: usize, c: usize) -> Result<Nf4Tensor> {
    Nf4Tensor::quantize(d, r, c, NF4_BLOCK, true).map_err(quant_err)
}

/// PyTorch's default `nn.Linear` weight init (`kaiming_uniform_(a=√5)`): U(−1/√fan_in, 1/√fan_in), drawn from the
/// counter-based RNG so `key` fixes it. Callers key it by a method-tagged seed on the Gaussian stream (the stream
/// registry has no init stream, and nothing else draws from those seeds).
pub fn kaiming_uniform(shape: &[usize], fan_in: usize, key: RngKey, dtype: DType, dev: &Device) -> Result<Tensor> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let mut v = vec![0f32; shape.iter().product()];
    fill_uniform(&key, 0, &mut v);
    v.iter_mut().for_each(|x| *x = (2.0 * *x - 1.0) * bound);
    Ok(Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)?)
}

/// A frozen base model: its weights, config, exact bytes, and its dense f32 form for a merged export.
pub trait FrozenBase: Weights {
    fn cfg(&self) -> &LlamaConfig;
    fn weight_bytes(&self) -> usize;
    /// Parameter `id` as a dense f32 tensor (for a merged export, one at a time).
    fn dense(&self, id: ParamId) -> Result<Tensor>;
    /// How the base stores its matrices (what its planned bytes are counted from).
    fn storage(&self) -> Storage;
    /// The arithmetic of the base's products.
    fn compute(&self) -> Compute {
        Compute::F32
    }
    /// The whole model dequantized to f32 (tests and references only: a method never builds it).
    fn dense_model(&self) -> Result<ParamStore> {
        let map = ParamId::all(self.cfg()).into_iter().map(|id| Ok((id, self.dense(id)?))).collect::<Result<_>>()?;
        ParamStore::from_map(self.cfg().clone(), map, std::path::Path::new("<dequantized>"))
    }
}

impl FrozenBase for ParamStore {
    fn cfg(&self) -> &LlamaConfig {
        &self.cfg
    }
    fn weight_bytes(&self) -> usize {
        self.bytes()
    }
    fn dense(&self, id: ParamId) -> Result<Tensor> {
        Ok(self.get(id).clone())
    }
    fn storage(&self) -> Storage {
        Storage::F32
    }
}

/// A quantized base: QuZO's INT8/INT4 (`quzo --lora`) or NF4 (QLoRA, QST).
impl<W: QuantWeight + QuantFormat> FrozenBase for QuantStore<W> {
    fn cfg(&self) -> &LlamaConfig {
        &self.cfg
    }
    fn weight_bytes(&self) -> usize {
        self.quant_bytes().total() + self.f32_bytes()
    }
    fn dense(&self, id: ParamId) -> Result<Tensor> {
        QuantStore::dense(self, id)
    }
    fn storage(&self) -> Storage {
        self.mat(ParamId::Embed).storage()
    }
    fn compute(&self) -> Compute {
        self.compute
    }
}

/// A quantized base on a GPU (QLoRA's NF4, `quzo --lora`'s INT8/INT4): f32 products over one dequantized matrix
/// at a time.
#[cfg(feature = "cuda")]
impl FrozenBase for crate::model::quantized_gpu::GpuStore {
    fn cfg(&self) -> &LlamaConfig {
        &self.cfg
    }
    fn weight_bytes(&self) -> usize {
        self.quant_bytes() + self.f32_bytes()
    }
    fn dense(&self, id: ParamId) -> Result<Tensor> {
        if id.is_matrix() {
            self.mat(id).dequantize()
        } else {
            self.vector(id)
        }
    }
    fn storage(&self) -> Storage {
        use crate::model::quantized_gpu::GpuMat;
        match self.mat(ParamId::Embed) {
            GpuMat::Int(w) => Storage::Int(w.spec()),
            GpuMat::Nf4(_) => Storage::Nf4,
            GpuMat::Hybrid(w) => Storage::Hybrid(w.fraction()),
        }
    }
}

/// The [`Storage`] a quantized matrix format is counted as.
pub trait QuantFormat {
    fn storage(&self) -> Storage;
}

impl QuantFormat for qtune_quant::IntTensor {
    fn storage(&self) -> Storage {
        Storage::Int(self.spec())
    }
}

impl QuantFormat for Nf4Tensor {
    fn storage(&self) -> Storage {
        Storage::Nf4
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Factor {
    /// [r, in]
    A,
    /// [out, r]
    B,
}

pub type LoraKey = (ParamId, Factor);

#[derive(Clone, Copy, Debug)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    /// Seeds A's init.
    pub seed: u64,
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Option("--lora-r must be at least 1".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::Option(format!("--lora-alpha {} must be positive", self.alpha)));
        }
        Ok(())
    }

    /// Trainable parameters for a model config: r·(in + out) per adapted projection.
    pub fn trainable_params(&self, cfg: &LlamaConfig) -> usize {
        let per_block: usize =
            TARGETS.iter().map(|&p| ParamId::Block(0, p).shape(cfg).iter().sum::<usize>() * self.r).sum();
        per_block * cfg.num_hidden_layers
    }
}

/// The model state of a LoRA step: the frozen base as `base` stores it, f32 factors, their gradients, and
/// `optimizer` bytes of state per factor entry.
pub fn planned_state(cfg: &LlamaConfig, base: Storage, lc: &LoraConfig, optimizer: usize) -> Result<Breakdown> {
    lc.validate()?;
    let f = lc.trainable_params(cfg);
    Ok(Breakdown {
        weights: base.model_bytes(cfg)? + 4 * f,
        gradients: 4 * f,
        optimizer: optimizer * f,
        ..Default::default()
    })
}

/// Mixed into the run seed so LoRA's init draws differ from other methods' draws under the same seed.
const LORA_SEED_TAG: u64 = 0x4C4F_5241; // "LORA"

/// A frozen base plus LoRA factors, behind the [`Weights`] trait the model runs on.
pub struct LoraWeights<B> {
    pub base: B,
    /// The factors' rank and scale.
    pub lc: LoraConfig,
    /// alpha / r.
    scale: f64,
    pub(crate) factors: Trained<LoraKey>,
    /// Factor gradients formed during a backward, summed over a step's micro-batches.
    pub(crate) grads: RefCell<DenseGrads<LoraKey>>,
}

impl<B: FrozenBase> LoraWeights<B> {
    /// Factors for every [`TARGETS`] projection of every block, in `dtype`.
    pub fn new(base: B, cfg: &LlamaConfig, lc: LoraConfig, dtype: DType) -> Result<Self> {
        lc.validate()?;
        // The factors live where the base's (f32) tensors do.
        let dev = base.vector(ParamId::FinalNorm)?.device().clone();
        let mut items = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            for &p in &TARGETS {
                let id = ParamId::Block(l, p);
                let (out, inp) = (id.shape(cfg)[0], id.shape(cfg)[1]);
                let key = RngKey::new(lc.seed ^ LORA_SEED_TAG, items.len() as u32, STREAM_GAUSS);
                items.push(((id, Factor::A), kaiming_uniform(&[lc.r, inp], inp, key, dtype, &dev)?, true));
                items.push(((id, Factor::B), Tensor::zeros((out, lc.r), dtype, &dev)?, true));
            }
        }
        let scale = lc.alpha / lc.r as f64;
        Ok(LoraWeights { base, lc, scale, factors: Trained::new(items), grads: RefCell::default() })
    }

    fn factors(&self, id: ParamId) -> Option<(&Tensor, &Tensor)> {
        self.factors
            .contains((id, Factor::A))
            .then(|| (self.factors.get((id, Factor::A)), self.factors.get((id, Factor::B))))
    }

    /// Parameter `id` of the base with W replaced by W + s·B·A where adapted, dense.
    pub fn merged(&self, id: ParamId) -> Result<Tensor> {
        let w = self.base.dense(id)?;
        match self.factors(id) {
            Some((a, b)) => Ok((&w + (b.matmul(a)? * self.scale)?.to_dtype(w.dtype())?)?),
            None => Ok(w),
        }
    }
}

impl<B: FrozenBase> crate::model::export::Adapter for LoraWeights<B> {
    fn rank(&self) -> usize {
        self.lc.r
    }
    fn alpha(&self) -> f64 {
        self.lc.alpha
    }
    fn targets(&self) -> &[BlockParam] {
        &TARGETS
    }
    fn factors(&self, id: ParamId) -> Result<(Tensor, Tensor)> {
        let (a, b) = LoraWeights::factors(self, id)
            .ok_or_else(|| Error::Msg(format!("no LoRA factors for {}", id.hf_name())))?;
        Ok((a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?))
    }
}

impl<B: FrozenBase> LoraWeights<B> {
    /// The base's output y = x·Wᵀ plus the adapter's scale·(x·Aᵀ)·Bᵀ where `id` has one.
    fn add_update(&self, id: ParamId, x: &Tensor, y: Tensor) -> Result<Tensor> {
        match self.factors(id) {
            Some((a, b)) => Ok((y + (x.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scale)?)?),
            None => Ok(y),
        }
    }
}

impl<B: FrozenBase> Weights for LoraWeights<B> {
    fn linear(&self, id: ParamId, x: &Tensor) -> Result<Tensor> {
        self.add_update(id, x, self.base.linear(id, x)?)
    }
    fn linears(&self, ids: &[ParamId], x: &Tensor) -> Result<Vec<Tensor>> {
        let ys = self.base.linears(ids, x)?;
        ids.iter().zip(ys).map(|(&id, y)| self.add_update(id, x, y)).collect()
    }
    fn linear_t(&self, id: ParamId, dy: &Tensor) -> Result<Tensor> {
        let dx = self.base.linear_t(id, dy)?;
        match self.factors(id) {
            Some((a, b)) => Ok((dx + (dy.matmul(b)?.matmul(a)? * self.scale)?)?),
            None => Ok(dx),
        }
    }
    fn vector(&self, id: ParamId) -> Result<Tensor> {
        self.base.vector(id)
    }
    fn rows(&self, id: ParamId, ids: &Tensor) -> Result<Tensor> {
        self.base.rows(id, ids)
    }
    /// Every model parameter is frozen; the factors are trained through [`Weights::weight_grad`].
    fn trains(&self, _id: ParamId) -> bool {
        false
    }
    fn weight_grad(&self, id: ParamId, dy: &Tensor, x: &Tensor, _sink: &mut dyn GradSink) -> Result<()> {
        let Some((a, b)) = self.factors(id) else {
            return Ok(());
        };
        let db = (dy.t()?.matmul(&x.matmul(&a.t()?)?)? * self.scale)?;
        let da = (dy.matmul(b)?.t()?.matmul(x)? * self.scale)?;
        let mut g = self.grads.borrow_mut();
        g.add((id, Factor::B), db)?;
        g.add((id, Factor::A), da)
    }
}

/// The sink of a backward whose model parameters are all frozen: a gradient arriving there is a bug.
pub(crate) struct FrozenSink;

impl GradSink for FrozenSink {
    fn push(&mut self, id: ParamId, _grad: Tensor) -> Result<()> {
        Err(Error::Msg(format!("{id:?} is frozen but received a gradient")))
    }
}

/// LoRA over an f32 base (`lora`) or QLoRA over an NF4 base (`qlora`).
pub struct Lora<B> {
    weights: LoraWeights<B>,
    update: Update,
    keep: Keep,
    /// The step's factor gradients, taken from the weights once every micro-batch has run.
    grads: DenseGrads<LoraKey>,
    name: &'static str,
}

impl<B: FrozenBase> Lora<B> {
    pub fn new(name: &'static str, base: B, lc: LoraConfig, update: Update, keep: Keep) -> Result<Self> {
        let cfg = base.cfg().clone();
        let dtype = base.vector(ParamId::FinalNorm)?.dtype();
        let weights = LoraWeights::new(base, &cfg, lc, dtype)?;
        Ok(Lora { weights, update, keep, grads: DenseGrads::default(), name })
    }
}

impl<B: FrozenBase> FirstOrder for Lora<B> {
    fn loop_options(&self) -> (Option<f64>, OnNonFinite) {
        (self.update.clip, self.update.on_nan)
    }

    fn accumulate(&mut self, model: &Llama, batch: &Batch, _micro: (usize, usize), _lr: f64) -> Result<Micro> {
        let (out, trace) = model.forward(&self.weights, batch, self.keep)?;
        let trace = trace.ok_or_else(|| Error::Msg("a training forward keeps a trace".into()))?;
        let (activations, scratch) = (trace.bytes(), block_scratch_bytes(&model.cfg, &batch.lengths, self.keep, 4));
        // The factor gradients collect inside the weights; the sink receives nothing.
        model.backward(&self.weights, trace, &mut FrozenSink)?;
        Ok(Micro { loss: out.loss, activations, scratch })
    }

    fn summed(&mut self) -> Result<(usize, Option<f64>)> {
        self.grads = self.weights.grads.take();
        Ok((self.grads.bytes(), Some(self.grads.global_norm()?)))
    }

    fn update(&mut self, scale: Option<f64>, lr: f64) -> Result<Figures> {
        trained::apply(&mut self.update.opt, &mut self.weights.factors, &mut self.grads, scale, lr)?;
        Ok(Vec::new())
    }

    fn optimizer_bytes(&self) -> usize {
        self.update.opt.state_bytes()
    }

    /// Only the factors' gradients travel: the frozen base has none.
    fn reduce(&mut self) -> Result<()> {
        self.weights.grads.get_mut().all_reduce()
    }
}

impl<B: FrozenBase> Method for Lora<B> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn step(&mut self, model: &Llama, micro: &[Batch], lr: f64) -> Result<StepStats> {
        first_order::step(self, model, micro, lr)
    }

    fn weights(&self) -> &dyn Weights {
        &self.weights
    }

    fn trainable_params(&self) -> usize {
        self.weights.factors.numel()
    }

    fn state_bytes(&self) -> Breakdown {
        let base = &self.weights.base;
        planned_state(base.cfg(), base.storage(), &self.weights.lc, self.update.opt.state_bytes_per_param())
            .expect("the model was built with this configuration")
    }

    fn held_bytes(&self) -> Breakdown {
        Breakdown {
            weights: self.weights.base.weight_bytes() + self.weights.factors.bytes(),
            gradients: self.weights.grads.borrow().bytes() + self.grads.bytes(),
            optimizer: self.update.opt.state_bytes(),
            ..Default::default()
        }
    }

    /// Forward and input gradients through the frozen base; the factors' own matmuls are negligible.
    fn flops_per_param(&self) -> f64 {
        4.0
    }

    /// The LoRA factors and their optimizer state (the frozen base is the model file).
    fn save_state(&self, w: &mut StateWriter) -> Result<()> {
        trained::save(w, &self.weights.factors, &self.update.opt)
    }

    fn load_state(&mut self, r: &StateReader) -> Result<()> {
        trained::load(r, &mut self.weights.factors, &mut self.update.opt)
    }

    fn export_tensor(&self, id: ParamId) -> Result<Tensor> {
        self.weights.merged(id)
    }

    fn adapter(&self) -> Option<&dyn crate::model::export::Adapter> {
        Some(&self.weights)
    }
}

#[cfg(test)]
mod tests {
    //! LoRA's factor gradients through the model's backward against central finite differences in f64 (budget
    //! 1e-6 relative), the merged export against the adapted forward, and the exact start of QLoRA (B = 0).
    use super::*;
    use crate::model::layers::{self, tests::rand};
    use crate::model::llama::tests::{batch, tiny_config};

    use crate::train::optim::AdamWConfig;

    const FD_BUDGET: f64 = 1e-6;

    /// LoRA over a random f64 base with random B (at init B = 0 would zero A's gradient).
    fn random_lora(tied: bool) -> (Llama, LoraWeights<ParamStore>) {
        let cfg = tiny_config(tied);
        let base = ParamStore::random(&cfg, 7, 0.3, DType::F64).unwrap();
        let mut w = LoraWeights::new(base, &cfg, LoraConfig { r: 3, alpha: 6.0, seed: 1 }, DType::F64).unwrap();
        for (j, k) in w.factors.keys().to_vec().into_iter().enumerate() {
            if k.1 == Factor::B {
                let shape = w.factors.get(k).dims().to_vec();
                w.factors.set(k, (rand(&shape, 50 + j as u64) * 0.5).unwrap());
            }
        }
        (Llama::new(cfg), w)
    }

    fn loss(m: &Llama, w: &dyn Weights, b: &Batch) -> f64 {
        let (out, _) = m.forward(w, b, Keep::Nothing).unwrap();
        let labels = Tensor::new(b.targets.labels.as_slice(), &Device::Cpu).unwrap();
        layers::cross_entropy(&out.logits, &labels).unwrap().0.to_scalar::<f64>().unwrap()
    }

    fn check(tied: bool, classes: bool, keep: Keep) {
        let (m, w) = random_lora(tied);
        let b = batch(classes);
        let (_, trace) = m.forward(&w, &b, keep).unwrap();
        m.backward(&w, trace.unwrap(), &mut FrozenSink).unwrap();
        let grads = w.grads.take();
        let h = 1e-6;
        for &k in w.factors.keys() {
            let g = grads.get(k).unwrap_or_else(|| panic!("no gradient for {k:?}"));
            let gv: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            let scale = gv.iter().fold(1e-4f64, |m, x| m.max(x.abs()));
            let t = w.factors.get(k);
            let tv: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
            for i in [0, tv.len() / 2, tv.len() - 1] {
                let at = |d: f64| {
                    let mut v = tv.clone();
                    v[i] += d;
                    let mut f = w.factors.clone();
                    f.set(k, Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap());
                    let wp = LoraWeights {
                        base: w.base.clone(),
                        lc: w.lc,
                        scale: w.scale,
                        factors: f,
                        grads: RefCell::default(),
                    };
                    loss(&m, &wp, &b)
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                let err = (fd - gv[i]).abs() / scale;
                assert!(
                    err < FD_BUDGET,
                    "{k:?}[{i}] fd {fd} analytic {} rel {err:e} (classes {classes}, {keep:?})",
                    gv[i]
                );
            }
        }
    }

    #[test]
    fn factor_gradients_match_finite_differences() {
        check(true, true, Keep::All);
    }

    #[test]
    fn factor_gradients_match_finite_differences_untied_recompute() {
        check(false, false, Keep::Inputs);
    }

    #[test]
    fn peft_adapter_applied_as_peft_does_gives_the_merged_model() {
        // PEFT's LoRA forward: W x + (alpha / r)·B (A x), with A = lora_A.weight [r, in], B = lora_B.weight [out, r].
        let (_, w) = random_lora(true);
        let cfg = w.base.cfg.clone();
        let dir = tempfile::tempdir().unwrap();
        crate::model::export::write_peft(&cfg, &w, "base", dir.path()).unwrap();
        let conf: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("adapter_config.json")).unwrap()).unwrap();
        let s = conf["lora_alpha"].as_f64().unwrap() / conf["r"].as_f64().unwrap();
        let t = candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(t.len(), 2 * TARGETS.len() * cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            for p in TARGETS {
                let id = ParamId::Block(l, p);
                let module = id.hf_name().trim_end_matches(".weight").to_string();
                let a = &t[&format!("base_model.model.{module}.lora_A.weight")];
                let b = &t[&format!("base_model.model.{module}.lora_B.weight")];
                let peft =
                    (w.base.get(id).to_dtype(DType::F32).unwrap() + (b.matmul(a).unwrap() * s).unwrap()).unwrap();
                let merged = w.merged(id).unwrap().to_dtype(DType::F32).unwrap();
                let err = (peft - merged).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(err < 1e-6, "{id:?}: {err}");
            }
        }
    }

    #[test]
    fn merged_export_equals_the_adapted_model() {
        let (m, w) = random_lora(true);
        let ids = Tensor::new(&[[1u32, 4, 9, 30], [2, 2, 7, 0]], &Device::Cpu).unwrap();
        let a = m.logits(&w, &ids).unwrap();
        let cfg = m.cfg.clone();
        let merged = ParamId::all(&cfg).into_iter().map(|id| (id, w.merged(id).unwrap())).collect();
        let merged = ParamStore::from_map(cfg, merged, std::path::Path::new("merged")).unwrap();
        let b = m.logits(&merged, &ids).unwrap();
        let err = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(err < 1e-12, "{err}");
    }

    fn qlora() -> (Llama, Lora<QuantStore<Nf4Tensor>>) {
        let cfg = tiny_config(true);
        let p = ParamStore::random(&cfg, 3, 0.3, DType::F32).unwrap();
        let update =
            Update { opt: Optimizer::adamw(AdamWConfig::default()), clip: Some(1.0), on_nan: OnNonFinite::Stop };
        (
            Llama::new(cfg),
            Lora::new(
                "qlora",
                nf4_base(Source::Params(p.clone())).unwrap(),
                LoraConfig { r: 4, alpha: 8.0, seed: 0 },
                update,
                Keep::All,
            )
            .unwrap(),
        )
    }

    #[test]
    fn qlora_starts_at_the_nf4_base_and_learns() {
        let (m, mut q) = qlora();
        let b = batch(true);
        let got = q.forward(&m, &b).unwrap();
        let base = m.forward(&q.weights.base, &b, Keep::Nothing).unwrap().0;
        assert_eq!(
            got.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            base.logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let first = q.step(&m, std::slice::from_ref(&b), 1e-2).unwrap();
        let mut last = first.clone();
        for _ in 0..10 {
            last = q.step(&m, std::slice::from_ref(&b), 1e-2).unwrap();
        }
        assert!(last.loss < first.loss * 0.9, "loss {} → {}", first.loss, last.loss);
        // Model state: the NF4 base, the factors, their gradients and AdamW's moments.
        let n = q.trainable_params();
        assert_eq!(n, LoraConfig { r: 4, alpha: 8.0, seed: 0 }.trainable_params(&m.cfg));
        let s = q.state_bytes();
        assert_eq!(s.weights, q.weights.base.weight_bytes() + 4 * n);
        assert_eq!((s.gradients, s.optimizer), (4 * n, 8 * n));
    }

    #[test]
    fn bad_options_are_errors() {
        for lc in [LoraConfig { r: 0, alpha: 16.0, seed: 0 }, LoraConfig { r: 8, alpha: f64::NAN, seed: 0 }] {
            assert!(matches!(lc.validate(), Err(Error::Option(_))));
        }
    }
}

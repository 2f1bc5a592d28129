//! Full-parameter fine-tuning in FP32 with AdamW or Lion: the baselines every quantized method is measured
//! against. Gradients are summed over micro-batches in dense f32 buffers, averaged, clipped by global norm, and
//! each parameter is updated and its gradient freed in turn.
//!
//! With `fake_quant`, the same loop is quantization-aware training (`qat`, QuZO's "quantized first-order"
//! baseline): forward and backward run on an INT8/INT4 copy of the matrices, re-quantized from the f32 master
//! weights after every update, and the weight gradient passes to the master unchanged (straight-through
//! estimator).
use super::lora::FrozenBase;
use super::Storage;
use crate::checkpoint::{StateReader, StateWriter};
use crate::model::quantized::{quant_err, QuantStore};
use crate::model::{Batch, Keep, Llama, LlamaConfig, ParamId, ParamStore, Weights};
use crate::train::first_order::{self, FirstOrder, FirstOrderArgs, Micro};
use crate::train::memory::{block_scratch_bytes, Breakdown};
use crate::train::optim::Optimizer;
use crate::train::{trained, DenseGrads, Figures, Method, OnNonFinite, StepStats};
use crate::Result;
use candle_core::Tensor;
use qtune_quant::{IntTensor, QuantSpec, Rounding};

pub struct FullFinetune {
    pub params: ParamStore,
    pub opt: Optimizer,
    /// Global-norm clip (None: no clipping).
    pub clip: Option<f64>,
    pub keep: Keep,
    pub on_nan: OnNonFinite,
    /// QAT: the quantized copy the model runs on (where the parameters are), and how it is quantized.
    fake_quant: Option<(QuantSpec, Box<dyn FrozenBase>)>,
    /// The step's gradients, summed over its micro-batches.
    grads: DenseGrads,
    name: &'static str,
}

impl FullFinetune {
    pub fn new(params: ParamStore, opt: Optimizer, fo: &FirstOrderArgs, on_nan: OnNonFinite) -> Self {
        let name = match opt {
            Optimizer::AdamW { .. } => "full-adamw",
            Optimizer::Lion { .. } => "full-lion",
        };
        let (clip, keep) = (fo.clip(), fo.keep());
        FullFinetune { params, opt, clip, keep, on_nan, fake_quant: None, grads: DenseGrads::default(), name }
    }

    /// Quantization-aware training: the model runs on `spec`-quantized matrices (straight-through estimator).
    pub fn qat(
        params: ParamStore,
        opt: Optimizer,
        spec: QuantSpec,
        fo: &FirstOrderArgs,
        on_nan: OnNonFinite,
    ) -> Result<Self> {
        let q = quantize(&params, spec)?;
        Ok(FullFinetune { fake_quant: Some((spec, q)), name: "qat", ..Self::new(params, opt, fo, on_nan) })
    }

    fn compute_weights(&self) -> &dyn Weights {
        match &self.fake_quant {
            Some((_, q)) => q.as_ref(),
            None => &self.params,
        }
    }
}

/// The model state of a step: f32 weights (with `qat`, also their quantized copy), f32 gradients of every
/// parameter, and `optimizer` bytes of state per parameter.
pub fn planned_state(cfg: &LlamaConfig, optimizer: usize, qat: Option<QuantSpec>) -> Result<Breakdown> {
    let n = cfg.num_params();
    let copy = qat.map(|spec| Storage::Int(spec).model_bytes(cfg)).transpose()?.unwrap_or(0);
    Ok(Breakdown { weights: 4 * n + copy, gradients: 4 * n, optimizer: optimizer * n, ..Default::default() })
}

/// QAT's quantized copy of `params`, made where they are: on the host, or on their GPU by its kernels (the same
/// codes and scales).
fn quantize(params: &ParamStore, spec: QuantSpec) -> Result<Box<dyn FrozenBase>> {
    #[cfg(feature = "cuda")]
    if params.device().is_cuda() {
        return Ok(Box::new(crate::model::quantized_gpu::GpuStore::quantize_params(params, spec)?));
    }
    Ok(Box::new(QuantStore::from_params(params, &mut |_, d, r, c| {
        IntTensor::quantize(d, r, c, spec, Rounding::Nearest).map_err(quant_err)
    })?))
}

impl FirstOrder for FullFinetune {
    fn loop_options(&self) -> (Option<f64>, OnNonFinite) {
        (self.clip, self.on_nan)
    }

    fn accumulate(&mut self, model: &Llama, batch: &Batch, _micro: (usize, usize), _lr: f64) -> Result<Micro> {
        let w: &dyn Weights = match &self.fake_quant {
            Some((_, q)) => q.as_ref(),
            None => &self.params,
        };
        let (out, trace) = model.forward(w, batch, self.keep)?;
        let trace = trace.expect("training forward keeps a trace");
        let (activations, scratch) = (trace.bytes(), block_scratch_bytes(&model.cfg, &batch.lengths, self.keep, 4));
        model.backward(w, trace, &mut self.grads)?;
        Ok(Micro { loss: out.loss, activations, scratch })
    }

    fn summed(&mut self) -> Result<(usize, Option<f64>)> {
        Ok((self.grads.bytes(), Some(self.grads.global_norm()?)))
    }

    fn update(&mut self, scale: Option<f64>, lr: f64) -> Result<Figures> {
        trained::apply(&mut self.opt, &mut self.params, &mut self.grads, scale, lr)?;
        if let (Some((spec, q)), Some(_)) = (&mut self.fake_quant, scale) {
            *q = quantize(&self.params, *spec)?;
        }
        Ok(Vec::new())
    }

    fn optimizer_bytes(&self) -> usize {
        self.opt.state_bytes()
    }

    fn reduce(&mut self) -> Result<()> {
        self.grads.all_reduce()
    }
}

impl Method for FullFinetune {
    fn name(&self) -> &'static str {
        self.name
    }

    fn step(&mut self, model: &Llama, micro: &[Batch], lr: f64) -> Result<StepStats> {
        first_order::step(self, model, micro, lr)
    }

    fn weights(&self) -> &dyn Weights {
        self.compute_weights()
    }

    fn trainable_params(&self) -> usize {
        self.params.cfg.num_params()
    }

    fn state_bytes(&self) -> Breakdown {
        let qat = self.fake_quant.as_ref().map(|(spec, _)| *spec);
        planned_state(&self.params.cfg, self.opt.state_bytes_per_param(), qat).expect("the spec quantized this model")
    }

    fn held_bytes(&self) -> Breakdown {
        let quantized = self.fake_quant.as_ref().map_or(0, |(_, q)| q.weight_bytes());
        Breakdown {
            weights: self.params.bytes() + quantized,
            gradients: self.grads.bytes(),
            optimizer: self.opt.state_bytes(),
            ..Default::default()
        }
    }

    fn flops_per_param(&self) -> f64 {
        6.0
    }

    fn export_tensor(&self, id: ParamId) -> Result<Tensor> {
        Ok(self.params.get(id).clone())
    }

    /// The f32 weights (QAT: the master; its quantized copy is rebuilt on load) and the optimizer states.
    fn save_state(&self, w: &mut StateWriter) -> Result<()> {
        w.params(&self.params)?;
        self.opt.save(w, "opt")
    }

    fn load_state(&mut self, r: &StateReader) -> Result<()> {
        r.params(&mut self.params)?;
        let shapes: Vec<_> =
            self.params.ids().iter().map(|id| (id.index(&self.params.cfg), id.shape(&self.params.cfg))).collect();
        self.opt.load(r, "opt", &shapes)?;
        if let Some((spec, q)) = &mut self.fake_quant {
            *q = quantize(&self.params, *spec)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::tests::{batch, tiny_config};

    use crate::train::optim::AdamWConfig;
    use candle_core::DType;
    use qtune_quant::{Bits, Granularity};

    /// QAT's straight-through gradient is the f32 model's gradient evaluated at the quantized weights (budget 1e-4
    /// relative: the quantized kernel sums in another order), and the master moves while the copy follows it.
    #[test]
    fn qat_gradient_is_the_gradient_at_the_quantized_weights() {
        let cfg = tiny_config(true);
        let m = Llama::new(cfg.clone());
        let p = ParamStore::random(&cfg, 3, 0.3, DType::F32).unwrap();
        let spec = QuantSpec::symmetric(Bits::B4, Granularity::PerRow);
        let opt = Optimizer::adamw(AdamWConfig::default());
        let fo = FirstOrderArgs { clip: 0.0, recompute: false };
        let mut qat = FullFinetune::qat(p.clone(), opt, spec, &fo, OnNonFinite::Stop).unwrap();
        let deq = quantize(&p, spec).unwrap().dense_model().unwrap();
        let grads = |w: &dyn Weights| {
            let (_, t) = m.forward(w, &batch(true), Keep::All).unwrap();
            let mut g = DenseGrads::default();
            m.backward(w, t.unwrap(), &mut g).unwrap();
            g
        };
        let (gq, gf) = (grads(qat.compute_weights()), grads(&deq));
        for id in p.ids() {
            let (a, b) = (gq.get(id).unwrap(), gf.get(id).unwrap());
            let err = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
            assert!(err / scale < 1e-4, "{id:?}: {err} / {scale}");
        }
        qat.step(&m, &[batch(true)], 1e-2).unwrap();
        let requantized = quantize(&qat.params, spec).unwrap();
        let (_, q) = qat.fake_quant.as_ref().unwrap();
        for id in p.ids().into_iter().filter(|id| id.is_matrix()) {
            let (a, b) = (q.dense(id).unwrap(), requantized.dense(id).unwrap());
            assert_eq!(
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }
}

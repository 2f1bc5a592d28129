//! Full-parameter fine-tuning in FP32 with AdamW or Lion: the baselines every quantized method is measured
//! against. Gradients are summed over micro-batches in dense f32 buffers, averaged, clipped by global norm, and
//! each parameter is updated and its gradient freed in turn.
//!
//! With `fake_quant`, the same loop is quantization-aware training (`qat`, QuZO's "quantized first-order"
//! baseline): forward and backward run on an INT8/INT4 copy of the matrices, re-quantized from the f32 master
//! weights after every update, and the weight gradient passes to the master unchanged (straight-through
//! estimator).
use super::{Method, OnNonFinite, StepStats};
use crate::checkpoint::{StateReader, StateWriter};
use crate::model::quantized::{quant_err, QuantStore};
use crate::model::{Batch, Keep, Llama, ParamId, ParamStore, Weights};
use crate::train::memory::{block_scratch_bytes, Breakdown};
use crate::train::optim::Optimizer;
use crate::train::DenseGrads;
use crate::{Error, Result};
use candle_core::Tensor;
use qtune_quant::{IntTensor, QuantSpec, Rounding};

pub struct FullFinetune {
    pub params: ParamStore,
    pub opt: Optimizer,
    /// Global-norm clip (None: no clipping).
    pub clip: Option<f64>,
    pub keep: Keep,
    pub on_nan: OnNonFinite,
    /// QAT: the quantized copy the model runs on, and how it is quantized.
    fake_quant: Option<(QuantSpec, QuantStore<IntTensor>)>,
    name: &'static str,
}

impl FullFinetune {
    pub fn new(params: ParamStore, opt: Optimizer, clip: Option<f64>, keep: Keep, on_nan: OnNonFinite) -> Self {
        let name = match opt {
            Optimizer::AdamW { .. } => "full-adamw",
            Optimizer::Lion { .. } => "full-lion",
        };
        FullFinetune { params, opt, clip, keep, on_nan, fake_quant: None, name }
    }

    /// Quantization-aware training: the model runs on `spec`-quantized matrices (straight-through estimator).
    pub fn qat(
        params: ParamStore,
        opt: Optimizer,
        spec: QuantSpec,
        clip: Option<f64>,
        keep: Keep,
        on_nan: OnNonFinite,
    ) -> Result<Self> {
        let q = quantize(&params, spec)?;
        Ok(FullFinetune { params, opt, clip, keep, on_nan, fake_quant: Some((spec, q)), name: "qat" })
    }

    fn compute_weights(&self) -> &dyn Weights {
        match &self.fake_quant {
            Some((_, q)) => q,
            None => &self.params,
        }
    }
}

fn quantize(params: &ParamStore, spec: QuantSpec) -> Result<QuantStore<IntTensor>> {
    QuantStore::from_params(params, &mut |_, d, r, c| {
        IntTensor::quantize(d, r, c, spec, Rounding::Nearest).map_err(quant_err)
    })
}

impl Method for FullFinetune {
    fn name(&self) -> &'static str {
        self.name
    }

    fn step(&mut self, model: &Llama, micro: &[Batch], lr: f64) -> Result<StepStats> {
        let mut grads = DenseGrads::default();
        let mut loss = 0f32;
        let mut mem = self.state_bytes();
        for batch in micro {
            let (out, trace) = model.forward(self.compute_weights(), batch, self.keep)?;
            let trace = trace.expect("training forward keeps a trace");
            mem.activations = mem.activations.max(trace.bytes());
            mem.scratch = mem.scratch.max(block_scratch_bytes(&model.cfg, &batch.lengths, self.keep, 4));
            model.backward(self.compute_weights(), trace, &mut grads)?;
            loss += out.loss / micro.len() as f32;
        }
        mem.gradients = grads.bytes();
        // Gradients were summed over micro-batches of mean losses: scale by 1/n, then clip.
        let norm = grads.global_norm()? / micro.len() as f64;
        if !loss.is_finite() || !norm.is_finite() {
            return self.on_nan.fault(loss, Some(norm), mem);
        }
        let clip = self.clip.map_or(1.0, |c| (c / norm).min(1.0));
        let scale = clip / micro.len() as f64;
        self.opt.begin_step();
        for id in self.params.ids() {
            let g = grads.take(id).ok_or_else(|| Error::Msg(format!("no gradient for {id:?}")))?;
            let g = if scale != 1.0 { (g * scale)? } else { g };
            let w = self.opt.update(id.index(&self.params.cfg), self.params.get(id), &g, lr, id.is_matrix())?;
            self.params.set(id, w);
        }
        mem.optimizer = mem.optimizer.max(self.opt.state_bytes());
        if let Some((spec, q)) = &mut self.fake_quant {
            *q = quantize(&self.params, *spec)?;
        }
        Ok(StepStats { loss, grad_norm: Some(norm), applied: true, memory: mem, ..Default::default() })
    }

    fn weights(&self) -> &dyn Weights {
        self.compute_weights()
    }

    fn trainable_params(&self) -> usize {
        self.params.cfg.num_params()
    }

    fn state_bytes(&self) -> Breakdown {
        let quantized = self.fake_quant.as_ref().map_or(0, |(_, q)| q.quant_bytes().total() + q.f32_bytes());
        Breakdown {
            weights: self.params.bytes() + quantized,
            optimizer: self.params.cfg.num_params() * self.opt.state_bytes_per_param(),
            ..Default::default()
        }
    }

    fn export_tensor(&self, id: ParamId) -> Result<Tensor> {
        Ok(self.params.get(id).clone())
    }

    fn saves_state(&self) -> bool {
        true
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
        let mut qat = FullFinetune::qat(p.clone(), opt, spec, None, Keep::All, OnNonFinite::Stop).unwrap();
        let deq = quantize(&p, spec).unwrap().dequantize().unwrap();
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
            assert_eq!(q.mat(id), requantized.mat(id));
        }
    }
}

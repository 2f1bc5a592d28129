//! Zeroth-order LoRA: MeZO (`mezo --lora`) and QuZO (`quzo --lora`) training only LoRA factors over a frozen base,
//! as the QuZO code's LoRA mode (`MODE=lora`) and MeZO's LoRA variant do. The base is f32 for MeZO and INT8/INT4
//! (per-output-channel symmetric, the QuZO weight grid) for QuZO, run with quantized forward passes; the factors
//! (PEFT's r = 8, alpha 16 by default) are stored in f32, as in the QuZO code. Per direction k with seed s_k, for
//! each factor tensor:
//!   μ_k = [L(θ + ε·u₁,k) − L(θ − ε·u₁,k)] / 2ε,    θ ← θ·(1 − ηλ) − η·Σ_k μ_k·u₂,k / n
//! with u₁ = u₂ = z ~ N(0, I) (MeZO), or u₁, u₂ two stochastic roundings of z at `--perturb-bits` (QuZO; the
//! `--estimator` options as in full-parameter QuZO). The factors are float, so the update is not rounded.
//! Memory: the frozen base, the factors, and one perturbed copy of the factors (a few MB); no gradient, no
//! optimizer state.
use super::lora::{FrozenBase, LoraConfig, LoraKey, LoraWeights};
use super::quzo::{Estimator, QDirection};
use super::Storage;
use crate::checkpoint::{StateReader, StateWriter};
use crate::model::quantized::Compute;
use crate::model::{Batch, Llama, LlamaConfig, ParamId, Weights};
use crate::train::memory::Breakdown;
use crate::train::trained::Trained;
use crate::train::zeroth_order::{self, micro_losses, Perturbation, ZoLoop};
use crate::train::{Method, StepStats};
use crate::Result;
use candle_core::Tensor;
use qtune_quant::rng::{fill_gaussian, RngKey, STREAM_GAUSS, STREAM_SR_PERTURB};

/// How the directions of the factors are drawn.
#[derive(Clone, Copy, Debug)]
pub enum Directions {
    /// MeZO: u₁ = u₂ = z.
    Gaussian,
    /// QuZO: z quantized per tensor at `bits` with stochastic rounding, u₂ drawn as `estimator` says.
    Quantized { bits: u32, estimator: Estimator },
}

impl Directions {
    /// u₁ (`update` false) or u₂ (`update` true) of factor tensor `slot` under direction seed `seed`, into `out`.
    fn fill(self, seed: u64, slot: usize, out: &mut [f32], update: bool) {
        match self {
            Directions::Gaussian => fill_gaussian(&RngKey::new(seed, slot as u32, STREAM_GAUSS), 0, out),
            Directions::Quantized { bits, estimator } => {
                let d = QDirection::new(seed, slot as u32, out.len(), bits);
                d.fill(0, out, if update { estimator.u2_stream() } else { Some(STREAM_SR_PERTURB) });
            }
        }
    }
}

/// The model state of a zeroth-order LoRA step: the frozen base as `base` stores it and the f32 factors (no
/// gradient, no optimizer state).
pub fn planned_state(cfg: &LlamaConfig, base: Storage, lc: &LoraConfig) -> Result<Breakdown> {
    lc.validate()?;
    Ok(Breakdown { weights: base.model_bytes(cfg)? + 4 * lc.trainable_params(cfg), ..Default::default() })
}

/// LoRA factors trained by zeroth-order SGD over a frozen base `B`.
pub struct ZoLora<B> {
    weights: LoraWeights<B>,
    zo: ZoLoop,
    directions: Directions,
    name: &'static str,
}

impl<B: FrozenBase> ZoLora<B> {
    pub fn new(name: &'static str, base: B, lc: LoraConfig, zo: ZoLoop, directions: Directions) -> Result<Self> {
        let cfg = base.cfg().clone();
        let dtype = base.vector(ParamId::FinalNorm)?.dtype();
        Ok(ZoLora { weights: LoraWeights::new(base, &cfg, lc, dtype)?, zo, directions, name })
    }

    /// The frozen base (to change its arithmetic, as `examples/zo_noise` does).
    pub fn base_mut(&mut self) -> &mut B {
        &mut self.weights.base
    }

    /// Moves the factors by `scale·z(seed)` (z Gaussian): an adapter away from the B = 0 start, for measurements.
    pub fn perturb_factors(&mut self, seed: u64, scale: f64) -> Result<()> {
        let dirs = std::mem::replace(&mut self.directions, Directions::Gaussian);
        let moved = self.combine(1.0, &[(seed, scale)], false);
        self.directions = dirs;
        self.weights.factors = moved?;
        Ok(())
    }

    /// `factors·scale + Σ (seed, coef): coef·u(seed)` per tensor (u₁ or u₂ as `update` says).
    fn combine(&self, scale: f64, terms: &[(u64, f64)], update: bool) -> Result<Trained<LoraKey>> {
        let mut out = self.weights.factors.clone();
        for (slot, &k) in self.weights.factors.keys().iter().enumerate() {
            let t = self.weights.factors.get(k);
            let mut acc = (t * scale)?;
            let mut u = vec![0f32; t.elem_count()];
            for &(seed, coef) in terms {
                self.directions.fill(seed, slot, &mut u, update);
                let ut = Tensor::from_slice(&u, t.shape(), t.device())?.to_dtype(t.dtype())?;
                acc = (acc + (ut * coef)?)?;
            }
            out.set(k, acc);
        }
        Ok(out)
    }

    /// The micro-batches' losses with the factors perturbed by `eps·u₁(seed)` (the factors are restored after).
    fn loss_at(&mut self, model: &Llama, micro: &[Batch], seed: u64, eps: f64) -> Result<Vec<f32>> {
        let perturbed = self.combine(1.0, &[(seed, eps)], false)?;
        let saved = std::mem::replace(&mut self.weights.factors, perturbed);
        let loss = micro_losses(model, &self.weights, micro);
        self.weights.factors = saved;
        loss
    }
}

impl<B: FrozenBase> Perturbation for ZoLora<B> {
    /// The factors' directions are regenerated from the seed, factor tensor by factor tensor.
    type Direction = ();

    fn zo_mut(&mut self) -> &mut ZoLoop {
        &mut self.zo
    }

    fn loss_at(&mut self, model: &Llama, micro: &[Batch], seed: u64, _d: &(), eps: f64) -> Result<Vec<f32>> {
        ZoLora::loss_at(self, model, micro, seed, eps)
    }

    fn update(&mut self, zo: &ZoLoop, est: &[(u64, (), f64)], lr: f64) -> Result<()> {
        let n = est.len() as f64;
        let terms: Vec<(u64, f64)> = est.iter().map(|&(seed, (), mu)| (seed, -lr * mu / n)).collect();
        self.weights.factors = self.combine(1.0 - lr * zo.weight_decay, &terms, true)?;
        Ok(())
    }

    /// One perturbed (or updated) copy of the factors.
    fn scratch_bytes(&self) -> usize {
        self.weights.factors.bytes()
    }
}

impl<B: FrozenBase> Method for ZoLora<B> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn step(&mut self, model: &Llama, micro: &[Batch], lr: f64) -> Result<StepStats> {
        zeroth_order::step(self, model, micro, lr)
    }

    /// Two forwards through the frozen base per step (the factors' own matmuls are negligible).
    fn flops_per_param(&self) -> f64 {
        4.0
    }

    fn compute(&self) -> Compute {
        self.weights.base.compute()
    }

    fn weights(&self) -> &dyn Weights {
        &self.weights
    }

    fn trainable_params(&self) -> usize {
        self.weights.factors.numel()
    }

    fn state_bytes(&self) -> Breakdown {
        let base = &self.weights.base;
        planned_state(base.cfg(), base.storage(), &self.weights.lc)
            .expect("the model was built with this configuration")
    }

    fn held_bytes(&self) -> Breakdown {
        Breakdown { weights: self.weights.base.weight_bytes() + self.weights.factors.bytes(), ..Default::default() }
    }

    fn export_tensor(&self, id: ParamId) -> Result<Tensor> {
        self.weights.merged(id)
    }

    fn adapter(&self) -> Option<&dyn crate::model::export::Adapter> {
        Some(&self.weights)
    }

    /// The factors and the step (directions are regenerated from seed and step).
    fn save_state(&self, w: &mut StateWriter) -> Result<()> {
        self.zo.save(w);
        self.weights.factors.save(w, "trained")
    }

    fn load_state(&mut self, r: &StateReader) -> Result<()> {
        self.weights.factors.load(r, "trained")?;
        self.zo.load(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::tests::{batch, tiny_config};
    use crate::model::quantized::Source;
    use crate::model::Keep;
    use crate::model::ParamStore;
    use candle_core::DType;

    fn zo(seed: u64) -> ZoLoop {
        ZoLoop { eps: 1e-3, directions: 2, weight_decay: 0.0, seed, on_nan: crate::train::OnNonFinite::Stop, step: 0 }
    }

    fn quzo_lora(p: &ParamStore, seed: u64) -> ZoLora<crate::model::quantized::QuantStore<qtune_quant::IntTensor>> {
        let base = super::super::quzo::quantize_int(Source::Params(p.clone()), 4).unwrap();
        let lc = LoraConfig { r: 2, alpha: 4.0, seed: 1 };
        let dirs = Directions::Quantized { bits: 4, estimator: Estimator::Qrge2 };
        ZoLora::new("quzo-lora", base, lc, zo(seed), dirs).unwrap()
    }

    /// The forward's output and ⟨∇, u₁(seed)⟩ over the factors, the gradient from LoRA's backward (in f64).
    fn directional_derivative<B: FrozenBase>(
        m: &Llama,
        z: &ZoLora<B>,
        b: &Batch,
        seed: u64,
    ) -> (crate::model::Output, f64) {
        let (out, trace) = m.forward(&z.weights, b, Keep::All).unwrap();
        m.backward(&z.weights, trace.unwrap(), &mut super::super::lora::FrozenSink).unwrap();
        let grads = z.weights.grads.take();
        let mut dd = 0f64;
        for (slot, &k) in z.weights.factors.keys().iter().enumerate() {
            let g = grads.get(k).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            let g: Vec<f64> = g.to_vec1().unwrap();
            let mut u = vec![0f32; g.len()];
            z.directions.fill(seed, slot, &mut u, false);
            dd += g.iter().zip(&u).map(|(g, &u)| g * u as f64).sum::<f64>();
        }
        (out, dd)
    }

    /// Only the factors move; the same seed gives the same factors; the first forward is the base's (B = 0); and
    /// the perturbed loss is restored exactly after each evaluation.
    #[test]
    fn trains_factors_only_and_is_seeded() {
        let cfg = tiny_config(true);
        let m = Llama::new(cfg.clone());
        let p = ParamStore::random(&cfg, 3, 0.3, DType::F32).unwrap();
        let b = batch(true);
        let run = || {
            let mut z = quzo_lora(&p, 5);
            let before = m.forward(&z.weights.base, &b, Keep::Nothing).unwrap().0.loss;
            assert_eq!(before, m.forward(&z.weights, &b, Keep::Nothing).unwrap().0.loss, "B = 0 start");
            for _ in 0..3 {
                z.step(&m, std::slice::from_ref(&b), 1e-2).unwrap();
            }
            z
        };
        let (x, y) = (run(), run());
        let mut moved = 0f32;
        for &k in x.weights.factors.keys() {
            let d = (x.weights.factors.get(k) - y.weights.factors.get(k)).unwrap().abs().unwrap();
            assert_eq!(d.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "{k:?} differs between seeded runs");
            if k.1 == super::super::lora::Factor::B {
                moved += x.weights.factors.get(k).abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            }
        }
        assert!(moved > 0.0, "no B factor moved");
        let fresh = quzo_lora(&p, 5);
        for id in p.ids().into_iter().filter(|id| id.is_matrix()) {
            assert_eq!(x.weights.base.mat(id), fresh.weights.base.mat(id), "the base moved");
        }
    }

    /// QuZO-LoRA's two-point estimate (f32 forwards over the dequantized INT4 base) is the directional derivative
    /// along its quantized perturbation u₁: the SPSA difference at ε = 1e-3 against ⟨∇, u₁⟩ from LoRA's backward
    /// (budget 1e-2 relative: f32 forwards, O(ε²) truncation). Then one step with u₂ = u₁ (`same-rounding`) at a
    /// small rate lowers the loss by about η·μ² (budget 10%): the update's sign and scale are the estimate's.
    #[test]
    fn quzo_lora_estimate_is_the_directional_derivative_and_descends() {
        let cfg = tiny_config(true);
        let m = Llama::new(cfg.clone());
        let p = ParamStore::random(&cfg, 3, 0.3, DType::F32).unwrap();
        let mut z = quzo_lora(&p, 4);
        z.directions = Directions::Quantized { bits: 4, estimator: Estimator::SameRounding };
        z.zo.directions = 1;
        z.weights.factors = z.combine(1.0, &[(77, 0.1)], false).unwrap();
        let b = batch(true);
        let seed = zeroth_order::direction_seed(z.zo.seed, z.zo.step, 0);
        let eps = 1e-3;
        let plus = z.loss_at(&m, std::slice::from_ref(&b), seed, eps).unwrap()[0] as f64;
        let minus = z.loss_at(&m, std::slice::from_ref(&b), seed, -eps).unwrap()[0] as f64;
        let mu = (plus - minus) / (2.0 * eps);
        let (out, dd) = directional_derivative(&m, &z, &b, seed);
        assert!((mu - dd).abs() <= 1e-2 * dd.abs(), "SPSA {mu} vs directional derivative {dd}");
        let lr = 1e-3 / dd.abs().max(1e-3);
        let before = out.loss as f64;
        z.step(&m, std::slice::from_ref(&b), lr).unwrap();
        let after = m.forward(&z.weights, &b, Keep::Nothing).unwrap().0.loss as f64;
        let want = lr * mu * mu;
        assert!(after < before, "the step raised the loss: {before} -> {after}");
        assert!(((before - after) - want).abs() <= 0.1 * want, "decrease {} vs η·μ² {want}", before - after);
    }

    /// MeZO-LoRA's two-point estimate is the directional derivative of the loss along z in the factors' space:
    /// the SPSA difference (f64, ε = 1e-6) against ⟨∇, z⟩ from LoRA's backward (budget 1e-6 relative).
    #[test]
    fn mezo_lora_estimate_is_the_directional_derivative() {
        let cfg = tiny_config(true);
        let m = Llama::new(cfg.clone());
        let p = ParamStore::random(&cfg, 3, 0.3, DType::F64).unwrap();
        let lc = LoraConfig { r: 2, alpha: 4.0, seed: 1 };
        let mut z = ZoLora::new("mezo-lora", p, lc, zo(1), Directions::Gaussian).unwrap();
        // Give B a non-zero value so both factors have a gradient.
        z.weights.factors = z.combine(1.0, &[(77, 0.1)], false).unwrap();
        let b = batch(true);
        let eps = 1e-6;
        let labels = Tensor::new(b.targets.labels.as_slice(), &candle_core::Device::Cpu).unwrap();
        let mut loss = |e: f64| {
            let f = z.combine(1.0, &[(9, e)], false).unwrap();
            let saved = std::mem::replace(&mut z.weights.factors, f);
            let logits = m.forward(&z.weights, &b, Keep::Nothing).unwrap().0.logits;
            z.weights.factors = saved;
            crate::model::layers::cross_entropy(&logits, &labels).unwrap().0.to_scalar::<f64>().unwrap()
        };
        let mu = (loss(eps) - loss(-eps)) / (2.0 * eps);
        let (_, dd) = directional_derivative(&m, &z, &b, 9);
        assert!((mu - dd).abs() <= 1e-6 * dd.abs(), "SPSA {mu} vs directional derivative {dd}");
    }
}

//! MeZO (Malladi et al. 2023): full-parameter FP32 zeroth-order fine-tuning on the two-point loop of
//! `crate::train::zeroth_order`: SPSA two-point estimates with Gaussian directions regenerated from a seed,
//! tensor by tensor, never stored. Per direction i with seed s_i:
//!   μ_i = [L(θ + εz_i) − L(θ − εz_i)] / 2ε,   then   θ ← θ − η·(μ_i·z_i / n + λθ)
//! Deviation from MeZO's code, same memory: MeZO perturbs θ in place (+ε, −2ε, +ε) and restores it only up to
//! rounding; here the perturbation is applied as each weight is read by the forward ([`Perturbed`]), which needs the
//! same one tensor-sized buffer at a time, regenerates z from the same seed, and leaves θ bit-exact between the two
//! evaluations.
use crate::checkpoint::{StateReader, StateWriter};
use crate::model::{Batch, Llama, LlamaConfig, ParamId, ParamStore, Weights};
use crate::train::memory::Breakdown;
use crate::train::zeroth_order::{self, micro_losses, Perturbation, ZoLoop};
use crate::train::{Method, StepStats};
use crate::{Error, Result};
use candle_core::{DType, Storage, Tensor, WithDType};
use qtune_quant::rng::{fill_gaussian_seq, RngKey, STREAM_GAUSS};
use rayon::prelude::*;

/// Elements per stack buffer of the chunked direction generation (16 KiB of f32).
const CHUNK: usize = 4096;

/// `s·θ + Σ_k c_k·z_k` for parameter `id`, with z_k its Gaussian direction under seed s_k (`terms` = (s_k, c_k)).
/// The directions are generated chunk by chunk on the stack, so the result is the one tensor-sized buffer: the
/// perturbed weight a forward reads, or the updated weight that replaces θ.
pub fn add_directions(base: &ParamStore, id: ParamId, scale: f64, terms: &[(u64, f64)]) -> Result<Tensor> {
    if !base.get(id).device().is_cpu() {
        return add_directions_on_device(base, id, scale, terms);
    }
    match base.get(id).dtype() {
        DType::F32 => add_directions_as::<f32>(base, id, scale, terms),
        DType::F64 => add_directions_as::<f64>(base, id, scale, terms),
        dt => Err(Error::Msg(format!("zeroth-order: parameters of dtype {dt:?} are not supported"))),
    }
}

/// [`add_directions`] on a GPU: the Philox kernel adds each direction into the one output buffer as it draws it,
/// from the same counters as the CPU's chunks (`device::add_gaussians`), in f32.
fn add_directions_on_device(base: &ParamStore, id: ParamId, scale: f64, terms: &[(u64, f64)]) -> Result<Tensor> {
    let t = id.index(&base.cfg) as u32;
    let terms: Vec<(RngKey, f64)> = terms.iter().map(|&(s, c)| (RngKey::new(s, t, STREAM_GAUSS), c)).collect();
    crate::device::add_gaussians(base.get(id), scale, &terms)
}

fn add_directions_as<T: WithDType>(base: &ParamStore, id: ParamId, scale: f64, terms: &[(u64, f64)]) -> Result<Tensor> {
    let w = base.get(id);
    let mut out: Vec<T> = {
        let (storage, layout) = w.storage_and_layout();
        let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
            return Err(Error::Msg(format!("zeroth-order: {id:?} is not a contiguous CPU tensor")));
        };
        cpu.as_slice::<T>()?[a..b].to_vec()
    };
    let t = id.index(&base.cfg) as u32;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let mut z = [0f32; CHUNK];
        let z = &mut z[..o.len()];
        let mut acc: Vec<f64> = o.iter().map(|v| v.to_f64() * scale).collect();
        for &(seed, coef) in terms {
            fill_gaussian_seq(&RngKey::new(seed, t, STREAM_GAUSS), (c * CHUNK) as u64, z);
            acc.iter_mut().zip(z.iter()).for_each(|(a, &z)| *a += coef * z as f64);
        }
        o.iter_mut().zip(acc).for_each(|(o, a)| *o = T::from_f64(a));
    });
    Ok(Tensor::from_vec(out, w.shape(), w.device())?)
}

/// θ + ε·z(seed), applied as each weight is read.
pub struct Perturbed<'a> {
    pub base: &'a ParamStore,
    pub seed: u64,
    pub eps: f64,
}

impl Perturbed<'_> {
    fn weight(&self, id: ParamId) -> Result<Tensor> {
        add_directions(self.base, id, 1.0, &[(self.seed, self.eps)])
    }
}

impl Weights for Perturbed<'_> {
    fn linear(&self, id: ParamId, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight(id)?.t()?)?)
    }
    fn linear_t(&self, id: ParamId, dy: &Tensor) -> Result<Tensor> {
        Ok(dy.matmul(&self.weight(id)?)?)
    }
    fn vector(&self, id: ParamId) -> Result<Tensor> {
        self.weight(id)
    }
    /// Only the requested rows of z are generated (an embedding lookup touches a few of 49152 rows).
    fn rows(&self, id: ParamId, ids: &Tensor) -> Result<Tensor> {
        let base = self.base.rows(id, ids)?;
        let cols = base.dim(1)?;
        let key = RngKey::new(self.seed, id.index(&self.base.cfg) as u32, STREAM_GAUSS);
        let rows = ids.to_vec1::<u32>()?;
        let mut z = vec![0f32; rows.len() * cols];
        for (&r, out) in rows.iter().zip(z.chunks_exact_mut(cols.max(1))) {
            fill_gaussian_seq(&key, (r as usize * cols) as u64, out);
        }
        let z = Tensor::from_vec(z, base.shape(), base.device())?.to_dtype(base.dtype())?;
        Ok((base + (z * self.eps)?)?)
    }
}

/// The model state of a full-parameter zeroth-order step (MeZO in f32, QuZO in `storage`): the weights alone, no
/// gradient and no optimizer state.
pub fn planned_state(cfg: &LlamaConfig, storage: super::Storage) -> Result<Breakdown> {
    Ok(Breakdown { weights: storage.model_bytes(cfg)?, ..Default::default() })
}

/// MeZO: full-parameter FP32 zeroth-order SGD.
pub struct Mezo {
    pub params: ParamStore,
    pub zo: ZoLoop,
}

impl Mezo {
    pub fn new(params: ParamStore, zo: ZoLoop) -> Self {
        Mezo { params, zo }
    }
}

impl Perturbation for Mezo {
    /// A Gaussian direction is its seed: z is regenerated tensor by tensor as each weight is read.
    type Direction = ();

    fn zo_mut(&mut self) -> &mut ZoLoop {
        &mut self.zo
    }

    fn loss_at(&mut self, model: &Llama, micro: &[Batch], seed: u64, _d: &(), eps: f64) -> Result<Vec<f32>> {
        micro_losses(model, &Perturbed { base: &self.params, seed, eps }, micro)
    }

    fn update(&mut self, zo: &ZoLoop, est: &[(u64, (), f64)], lr: f64) -> Result<()> {
        let n = est.len() as f64;
        for id in self.params.ids() {
            let decay = if id.is_matrix() { zo.weight_decay } else { 0.0 };
            let terms: Vec<(u64, f64)> = est.iter().map(|&(seed, (), g)| (seed, -lr * g / n)).collect();
            let w = add_directions(&self.params, id, 1.0 - lr * decay, &terms)?;
            self.params.set(id, w);
        }
        Ok(())
    }

    /// The perturbed (or updated) copy of the largest tensor.
    fn scratch_bytes(&self) -> usize {
        let largest = self.params.ids().iter().map(|&id| id.numel(&self.params.cfg)).max().unwrap_or(0);
        largest * self.params.dtype().size_in_bytes()
    }
}

impl Method for Mezo {
    fn name(&self) -> &'static str {
        "mezo"
    }

    fn step(&mut self, model: &Llama, micro: &[Batch], lr: f64) -> Result<StepStats> {
        zeroth_order::step(self, model, micro, lr)
    }

    fn weights(&self) -> &dyn Weights {
        &self.params
    }

    fn trainable_params(&self) -> usize {
        self.params.cfg.num_params()
    }

    fn state_bytes(&self) -> Breakdown {
        planned_state(&self.params.cfg, super::Storage::F32).expect("f32 storage has no spec to fail")
    }

    fn held_bytes(&self) -> Breakdown {
        Breakdown { weights: self.params.bytes(), ..Default::default() }
    }

    /// Two forwards per step.
    fn flops_per_param(&self) -> f64 {
        4.0
    }

    fn export_tensor(&self, id: ParamId) -> Result<Tensor> {
        Ok(self.params.get(id).clone())
    }

    /// The weights and the step (directions are regenerated from seed and step, so nothing else is needed).
    fn save_state(&self, w: &mut StateWriter) -> Result<()> {
        self.zo.save(w);
        w.params(&self.params)
    }

    fn load_state(&mut self, r: &StateReader) -> Result<()> {
        r.params(&mut self.params)?;
        self.zo.load(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::tests::{batch, tiny_config};
    use crate::model::Keep;
    use crate::train::OnNonFinite;

    use candle_core::Device;

    /// The GPU's formula (whole directions from `device::random`, added in f32), run here on the CPU, against the
    /// CPU's chunked loop (f64 accumulation): within 1e-6 of the weights' scale on every tensor.
    #[test]
    fn the_device_formula_matches_the_chunked_loop() {
        let cfg = tiny_config(true);
        let p = ParamStore::random(&cfg, 2, 0.2, DType::F32).unwrap();
        let terms = [(11u64, 1e-3), (12, -2.5e-4)];
        for id in p.ids() {
            let a = add_directions_as::<f32>(&p, id, 0.999, &terms).unwrap();
            let b = add_directions_on_device(&p, id, 0.999, &terms).unwrap();
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d <= 1e-6, "{id:?}: {d:e}");
        }
    }

    /// The direction z of `id` as a whole tensor, from the bulk generator (the references' own path).
    fn direction(base: &ParamStore, id: ParamId, seed: u64) -> Result<Tensor> {
        let w = base.get(id);
        let mut z = vec![0f32; w.elem_count()];
        qtune_quant::rng::fill_gaussian(&RngKey::new(seed, id.index(&base.cfg) as u32, STREAM_GAUSS), 0, &mut z);
        Ok(Tensor::from_vec(z, w.shape(), w.device())?.to_dtype(w.dtype())?)
    }

    /// The perturbed forward equals a forward on an explicitly perturbed copy, including the embedding rows.
    #[test]
    fn perturbation_on_the_fly_equals_an_explicit_copy() {
        let cfg = tiny_config(true);
        let p = ParamStore::random(&cfg, 5, 0.3, DType::F64).unwrap();
        let m = Llama::new(cfg);
        let mut q = p.clone();
        for id in p.ids() {
            q.set(id, (p.get(id) + (direction(&p, id, 42).unwrap() * 1e-2).unwrap()).unwrap());
        }
        let a = micro_losses(&m, &Perturbed { base: &p, seed: 42, eps: 1e-2 }, &[batch(true)]).unwrap()[0];
        let b = micro_losses(&m, &q, &[batch(true)]).unwrap()[0];
        assert_eq!(a, b);
    }

    /// E[μ·z] is the gradient: the SPSA estimate's projection on the true gradient matches (ε → 0) the
    /// directional derivative from the backward, for one direction (budget 1e-6 relative, f64, ε = 1e-6).
    #[test]
    fn two_point_estimate_is_the_directional_derivative() {
        let cfg = tiny_config(true);
        let p = ParamStore::random(&cfg, 5, 0.3, DType::F64).unwrap();
        let m = Llama::new(cfg.clone());
        let b = batch(true);
        // Output::loss is rounded to f32: take the two-point difference from the f64 logits.
        let big = 1e-6;
        let lp = m.forward(&Perturbed { base: &p, seed: 9, eps: big }, &b, Keep::Nothing).unwrap().0.logits;
        let lm = m.forward(&Perturbed { base: &p, seed: 9, eps: -big }, &b, Keep::Nothing).unwrap().0.logits;
        let labels = Tensor::new(b.targets.labels.as_slice(), &Device::Cpu).unwrap();
        let ce = |l: &Tensor| crate::model::layers::cross_entropy(l, &labels).unwrap().0.to_scalar::<f64>().unwrap();
        let mu = (ce(&lp) - ce(&lm)) / (2.0 * big);
        let (_, trace) = m.forward(&p, &b, Keep::All).unwrap();
        let mut g = crate::train::DenseGrads::default();
        m.backward(&p, trace.unwrap(), &mut g).unwrap();
        let mut dd = 0f64;
        for id in p.ids() {
            dd += (g.get(id).unwrap() * direction(&p, id, 9).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
        }
        assert!((mu - dd).abs() / dd.abs() < 1e-6, "SPSA {mu} vs directional derivative {dd}");
    }

    #[test]
    fn same_seed_same_weights() {
        let cfg = tiny_config(true);
        let m = Llama::new(cfg.clone());
        let run = || {
            let p = ParamStore::random(&cfg, 5, 0.3, DType::F32).unwrap();
            let mut z = Mezo::new(
                p,
                ZoLoop { eps: 1e-3, directions: 2, weight_decay: 0.1, seed: 3, on_nan: OnNonFinite::Stop, step: 0 },
            );
            for _ in 0..3 {
                z.step(&m, &[batch(true)], 1e-2).unwrap();
            }
            z.params
        };
        let (a, b) = (run(), run());
        for id in a.ids() {
            let d = (a.get(id) - b.get(id)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(d, 0.0);
        }
    }
}

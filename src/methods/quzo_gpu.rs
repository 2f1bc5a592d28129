//! Full-parameter QuZO on a GPU ([`super::quzo`] is the method; this is where its state lives on the device). The
//! model's INT8/INT4 matrices stay quantized there (`model::quantized_gpu`); a forward dequantizes each matrix for
//! its product and adds ε·u₁ to that transient tile (the CPU's `--compute f32`); the update rewrites the codes in
//! place with the fused kernel (dequantize, step, re-encode with stochastic rounding on the frozen grid), so the
//! device never holds an f32 model. Directions, their scales and every rounding decision are the CPU's bits
//! (`kernels/quant.cu`); only the products' sums run in another order. The integer forward (`--compute int8`) is the
//! CPU's alone.
use super::quzo::{load_int, save_int, update_key, Estimator, QDirection, QuzoArgs};
use super::Storage;
use crate::checkpoint::{StateReader, StateWriter};
use crate::device::cuda_quant::{add_direction, gauss_absmax, zo_update_f32, GpuInt, RowIds, Rows, ZoDir};
use crate::model::quantized::{gpu_dequantized_bytes, Compute, Source};
use crate::model::quantized_gpu::{GpuMat, GpuStore};
use crate::model::{Batch, Llama, ParamId, Weights};
use crate::train::memory::Breakdown;
use crate::train::zeroth_order::{self, micro_losses, Perturbation, ZoLoop};
use crate::train::{Method, StepStats};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use qtune_quant::rng::{RngKey, STREAM_GAUSS, STREAM_SR_PERTURB};
use qtune_quant::QuantSpec;

pub struct QuzoGpu {
    store: GpuStore,
    spec: QuantSpec,
    perturb_bits: u32,
    estimator: Estimator,
    zo: ZoLoop,
    dev: Device,
}

impl QuzoGpu {
    /// QuZO on the model read from `source` at `bits`, held on the GPU `dev`.
    pub fn new(source: Source, bits: u32, args: &QuzoArgs, zo: ZoLoop, dev: &Device) -> Result<Self> {
        args.check()?;
        let store = GpuStore::load(source, &mut super::quzo::int_quantizer(bits)?, dev)?;
        let spec = super::quzo::weight_spec(bits)?;
        Ok(QuzoGpu { store, spec, perturb_bits: args.perturb_bits, estimator: args.estimator, zo, dev: dev.clone() })
    }

    /// Each tensor's quantized direction, its scale from the GPU's reduction over the tensor's Gaussians.
    fn directions(&self, seed: u64) -> Result<Vec<QDirection>> {
        let Device::Cuda(d) = &self.dev else { return Err(Error::Msg("QuZO's GPU state without a GPU".into())) };
        let cfg = &self.store.cfg;
        ParamId::all(cfg)
            .iter()
            .map(|&id| {
                let gauss = RngKey::new(seed, id.index(cfg) as u32, STREAM_GAUSS);
                Ok(QDirection::with_absmax(gauss, gauss_absmax(d, &gauss, id.numel(cfg))?, self.perturb_bits))
            })
            .collect()
    }

    fn int(&self, id: ParamId) -> Result<&crate::device::cuda_quant::GpuInt> {
        match self.store.mat(id) {
            GpuMat::Int(w) => Ok(w),
            _ => Err(Error::Msg(format!("{id:?}: QuZO's matrices are INT8/INT4"))),
        }
    }
}

fn zo_dir(d: &QDirection, mu: f64) -> ZoDir {
    ZoDir { gauss: d.gauss, scale: d.scale, qmax: d.qmax, mu }
}

/// The model read as θ̄ + ε·u₁: each matrix dequantized and moved as its product needs it.
struct Perturbed<'a> {
    store: &'a GpuStore,
    dirs: &'a [QDirection],
    eps: f32,
}

impl Perturbed<'_> {
    fn moved(&self, id: ParamId, t: &Tensor) -> Result<Tensor> {
        let d = zo_dir(&self.dirs[id.index(&self.store.cfg)], 0.0);
        add_direction(t, 0, self.eps, &d, Some(STREAM_SR_PERTURB))
    }

    fn int(&self, id: ParamId) -> Result<&GpuInt> {
        match self.store.mat(id) {
            GpuMat::Int(w) => Ok(w),
            _ => Err(Error::Msg(format!("{id:?}: QuZO's matrices are INT8/INT4"))),
        }
    }

    /// The matrix moved as it is dequantized (one transient f32 copy).
    fn mat(&self, id: ParamId) -> Result<Tensor> {
        self.moved_rows(id, Rows::Span(0..self.int(id)?.rows()))
    }

    /// Rows of a matrix moved as they are dequantized; only they are read.
    fn moved_rows(&self, id: ParamId, rows: Rows<'_>) -> Result<Tensor> {
        let d = zo_dir(&self.dirs[id.index(&self.store.cfg)], 0.0);
        self.int(id)?.dequantize_rows_moved(rows, self.eps, &d, Some(STREAM_SR_PERTURB))
    }
}

impl Weights for Perturbed<'_> {
    fn linear(&self, id: ParamId, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.mat(id)?.t()?)?)
    }
    fn linear_t(&self, id: ParamId, dy: &Tensor) -> Result<Tensor> {
        Ok(dy.matmul(&self.mat(id)?)?)
    }
    fn vector(&self, id: ParamId) -> Result<Tensor> {
        self.moved(id, &self.store.vector(id)?)
    }
    fn rows(&self, id: ParamId, ids: &Tensor) -> Result<Tensor> {
        let ids = RowIds::new(ids, self.int(id)?.device())?;
        self.moved_rows(id, Rows::Ids(&ids))
    }
}

impl Perturbation for QuzoGpu {
    type Direction = Vec<QDirection>;

    fn zo_mut(&mut self) -> &mut ZoLoop {
        &mut self.zo
    }

    /// The perturbation is applied in f32.
    fn applied_eps(&self, eps: f64) -> f64 {
        eps as f32 as f64
    }

    fn direction(&self, seed: u64) -> Result<Vec<QDirection>> {
        self.directions(seed)
    }

    fn loss_at(&mut self, model: &Llama, micro: &[Batch], _: u64, d: &Vec<QDirection>, eps: f64) -> Result<Vec<f32>> {
        micro_losses(model, &Perturbed { store: &self.store, dirs: d, eps: eps as f32 }, micro)
    }

    /// Each matrix's codes rewritten in place by the fused kernel; norm weights stepped in f32.
    fn update(&mut self, zo: &ZoLoop, est: &[(u64, Vec<QDirection>, f64)], lr: f64) -> Result<()> {
        let cfg = self.store.cfg.clone();
        let u2 = self.estimator.u2_stream();
        for id in ParamId::all(&cfg) {
            let t = id.index(&cfg);
            let dirs: Vec<ZoDir> = est.iter().map(|(_, d, mu)| zo_dir(&d[t], *mu)).collect();
            if id.is_matrix() {
                let GpuMat::Int(w) = self.store.mat_mut(id) else {
                    return Err(Error::Msg(format!("{id:?}: QuZO's matrices are INT8/INT4")));
                };
                w.zo_update(0..w.rows(), &dirs, u2, lr, zo.weight_decay, update_key(zo, t))?;
            } else {
                let v = zo_update_f32(&self.store.vector(id)?, &dirs, u2, lr, 0.0)?;
                self.store.set_vector(id, v);
            }
        }
        Ok(())
    }

    /// The largest matrix dequantized (and moved in place); the update is fused and needs no f32 rows.
    fn scratch_bytes(&self) -> usize {
        gpu_dequantized_bytes(&self.store.cfg)
    }
}

impl Method for QuzoGpu {
    fn name(&self) -> &'static str {
        "quzo"
    }

    fn step(&mut self, model: &Llama, micro: &[Batch], lr: f64) -> Result<StepStats> {
        zeroth_order::step(self, model, micro, lr)
    }

    /// Two forwards per step.
    fn flops_per_param(&self) -> f64 {
        4.0
    }

    fn compute(&self) -> Compute {
        Compute::F32
    }

    fn weights(&self) -> &dyn Weights {
        &self.store
    }

    fn trainable_params(&self) -> usize {
        self.store.cfg.num_params()
    }

    fn state_bytes(&self) -> Breakdown {
        super::mezo::planned_state(&self.store.cfg, Storage::Int(self.spec))
            .expect("the model was quantized with this spec")
    }

    fn held_bytes(&self) -> Breakdown {
        Breakdown { weights: self.store.quant_bytes() + self.store.f32_bytes(), ..Default::default() }
    }

    fn export_tensor(&self, id: ParamId) -> Result<Tensor> {
        if id.is_matrix() {
            self.store.mat(id).dequantize()
        } else {
            self.store.vector(id)
        }
    }

    /// The CPU's checkpoint: INT8/INT4 codes and row scales, f32 norms, and the step.
    fn save_state(&self, w: &mut StateWriter) -> Result<()> {
        self.zo.save(w);
        for id in ParamId::all(&self.store.cfg) {
            if id.is_matrix() {
                save_int(w, id, &self.int(id)?.download()?);
            } else {
                w.tensor(&id.hf_name(), &self.store.vector(id)?)?;
            }
        }
        Ok(())
    }

    fn load_state(&mut self, r: &StateReader) -> Result<()> {
        let cfg = self.store.cfg.clone();
        let Device::Cuda(d) = &self.dev else { return Err(Error::Msg("QuZO's GPU state without a GPU".into())) };
        for id in ParamId::all(&cfg) {
            if id.is_matrix() {
                let t = load_int(r, id, &cfg, self.spec)?;
                *self.store.mat_mut(id) = GpuMat::Int(crate::device::cuda_quant::GpuInt::upload(d, &t)?);
            } else {
                let n = id.shape(&cfg)[0];
                let v = r.f32_len(&id.hf_name(), n)?;
                self.store.set_vector(id, Tensor::from_vec(v, n, &self.dev)?);
            }
        }
        self.zo.load(r)
    }
}

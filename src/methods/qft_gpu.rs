//! QFT on a GPU ([`super::qft`] is the method; this is where its state lives on the device): the hybrid weights
//! (INT8 per row + f32 outliers), the INT8 gradient stack and Lion's INT8 momentum all in device memory, the update
//! done by `kernels/quant.cu` (stochastic rounding keyed as on the CPU: the same codes from the same gradients and
//! clip factor; the clipping norm's Σg² is summed in another, fixed, order than the CPU's, so its last bits differ).
//! Products run in f32 over one dequantized matrix at a time (cuBLAS); the weight gradient is f32 and is quantized
//! onto the stack as it arrives. What stays the CPU's: the fused variant, several ranks, the integer products, and
//! the once-per-epoch recalibration, which moves one matrix at a time through the host. The `changed_fraction`
//! figures are not counted here (they would need a copy of every matrix before its update).
use super::qft::stack::{StackEntries, StackSink};
use super::qft::{key, load_hybrid, recalibration_key, save_hybrid, Int8Blocks, QftConfig, PIECE};
use crate::checkpoint::{StateReader, StateWriter};
use crate::device::cuda_quant::{lion_f32, GpuBlocks8, GpuHybrid, LionArgs, Requant};
use crate::model::quantized::{quant_err, Compute, Source};
use crate::model::quantized_gpu::{GpuMat, GpuStore};
use crate::model::{Batch, Llama, ParamId, Weights};
use crate::train::first_order::{self, FirstOrder, Micro};
use crate::train::memory::{block_scratch_bytes, Breakdown};
use crate::train::{Figures, Method, OnNonFinite, StepStats};
use crate::{Error, Result};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{Device, Tensor};
use qtune_quant::rng::{RngKey, STREAM_SR_MOMENTUM, STREAM_SR_WEIGHT};
use qtune_quant::{HybridTensor, Rounding};

// The GPU's INT8 blocks are the CPU's (kernels/quant.cu's BLOCK8 likewise).
const _: () = assert!(super::qft::BLOCK == crate::device::cuda_quant::BLOCK8);

pub struct QftGpu {
    store: GpuStore,
    /// Lion momentum per parameter, indexed by `ParamId::index`.
    momentum: Vec<GpuBlocks8>,
    /// The gradient stack (top = last pushed = first parameter in forward order).
    stack: Vec<(ParamId, GpuBlocks8)>,
    cfg: QftConfig,
    on_nan: OnNonFinite,
    step: u64,
    /// This step's Σg² of the last micro-batch's gradients (after accumulation), for clipping.
    sumsq: f64,
    dev: CudaDevice,
}

impl QftGpu {
    pub fn new(source: Source, cfg: QftConfig, on_nan: OnNonFinite, dev: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = dev else { return Err(Error::Msg("QFT's GPU state needs a GPU".into())) };
        if cfg.fused {
            return Err(Error::Option(
                "--fused: QFT's fused update runs on the CPU only so far; use --device cpu".into(),
            ));
        }
        if crate::dist::world().size() > 1 {
            return Err(Error::Option(
                "QFT on GPUs runs as one process so far (its INT8 all-reduce is the CPU's)".into(),
            ));
        }
        let frac = cfg.outlier_fraction;
        let store = GpuStore::load(
            source,
            &mut |_, d, r, c| HybridTensor::quantize(d, r, c, frac, Rounding::Nearest).map_err(quant_err),
            dev,
        )?;
        let momentum = ParamId::all(&store.cfg)
            .iter()
            .map(|id| GpuBlocks8::zeros(cuda, id.numel(&store.cfg), PIECE))
            .collect::<Result<_>>()?;
        Ok(QftGpu { store, momentum, stack: Vec::new(), cfg, on_nan, step: 0, sumsq: 0.0, dev: cuda.clone() })
    }

    fn hybrid(&self, id: ParamId) -> Result<&GpuHybrid> {
        match self.store.mat(id) {
            GpuMat::Hybrid(h) => Ok(h),
            _ => Err(Error::Msg(format!("{id:?}: QFT's matrices are hybrid"))),
        }
    }

    /// New scales and outlier splits, matrix by matrix through the host (the CPU's `HybridTensor::recalibrate`).
    fn recalibrate(&mut self) -> Result<()> {
        let cfg = self.store.cfg.clone();
        for id in ParamId::all(&cfg).into_iter().filter(|id| id.is_matrix()) {
            let mut h = self.hybrid(id)?.download()?;
            let k = recalibration_key(self.cfg.seed, self.step, id.index(&cfg));
            h.recalibrate(Rounding::Stochastic(k)).map_err(quant_err)?;
            *self.store.mat_mut(id) = GpuMat::Hybrid(GpuHybrid::upload(&self.dev, &h)?);
        }
        Ok(())
    }

    /// Lion on parameter `id` with gradient `g`·`scale`: the weights (old momentum), then the momentum.
    fn lion(&mut self, id: ParamId, g: &GpuBlocks8, scale: f32, lr: f64) -> Result<()> {
        let cfg = self.store.cfg.clone();
        let idx = id.index(&cfg);
        let l = self.cfg.lion;
        let wd = if id.is_matrix() { l.weight_decay as f32 } else { 0.0 };
        let args = LionArgs { gs: scale, b1: l.beta1 as f32, lr: lr as f32, wd };
        if id.is_matrix() {
            let GpuMat::Hybrid(h) = self.store.mat_mut(id) else {
                return Err(Error::Msg(format!("{id:?}: QFT's matrices are hybrid")));
            };
            h.lion_step(&self.momentum[idx], g, args, key(self.cfg.seed, self.step, idx, STREAM_SR_WEIGHT))?;
        } else {
            let v = lion_f32(&self.store.vector(id)?, &self.momentum[idx], g, args)?;
            self.store.set_vector(id, v);
        }
        let mkey = key(self.cfg.seed, self.step, idx, STREAM_SR_MOMENTUM);
        self.momentum[idx].requant(Requant::Momentum { g, gs: scale, b2: l.beta2 as f32 }, mkey, false)?;
        Ok(())
    }
}

/// The GPU's stack entries: INT8 blocks in device memory, with the CPU's per-piece rounding keys.
struct GpuEntries(CudaDevice);

impl StackEntries for GpuEntries {
    type Entry = GpuBlocks8;
    fn quantize(&self, grad: &Tensor, key: RngKey, sumsq: bool) -> Result<(GpuBlocks8, f64)> {
        let g = grad.flatten_all()?;
        let mut entry = GpuBlocks8::zeros(&self.0, g.elem_count(), PIECE)?;
        let s = entry.requant(Requant::Set(&g), key, sumsq)?;
        Ok((entry, s.unwrap_or(0.0)))
    }
    fn add(&self, entry: &mut GpuBlocks8, grad: &Tensor, key: RngKey, sumsq: bool) -> Result<f64> {
        Ok(entry.requant(Requant::Add(&grad.flatten_all()?), key, sumsq)?.unwrap_or(0.0))
    }
}

impl FirstOrder for QftGpu {
    fn loop_options(&self) -> (Option<f64>, OnNonFinite) {
        (self.cfg.clip, self.on_nan)
    }

    fn accumulate(&mut self, model: &Llama, batch: &Batch, (k, n): (usize, usize), _lr: f64) -> Result<Micro> {
        if k == 0 {
            let every = self.cfg.recalibrate_every as u64;
            if every > 0 && self.step > 0 && self.step.is_multiple_of(every) {
                self.recalibrate()?;
            }
            self.sumsq = 0.0;
        }
        let (out, trace) = model.forward(&self.store, batch, self.cfg.keep)?;
        let trace = trace.ok_or_else(|| Error::Msg("a training forward keeps a trace".into()))?;
        let activations = trace.bytes();
        // A block's scratch, and the f32 copy of the matrix a product dequantizes (as `plan --device cuda` counts).
        let scratch = block_scratch_bytes(&model.cfg, &batch.lengths, self.cfg.keep, 4)
            + crate::model::quantized::gpu_dequantized_bytes(&model.cfg);
        let entries = GpuEntries(self.dev.clone());
        let mut sink = StackSink {
            entries: &entries,
            stack: &mut self.stack,
            depth: 0,
            accumulate: k > 0,
            last: k + 1 == n,
            sumsq: 0.0,
            seed: self.cfg.seed ^ self.step,
            micro: k as u64,
        };
        model.backward(&self.store, trace, &mut sink)?;
        self.sumsq += sink.sumsq;
        Ok(Micro { loss: out.loss, activations, scratch })
    }

    fn summed(&mut self) -> Result<(usize, Option<f64>)> {
        let bytes = self.stack.iter().map(|(_, g)| g.device_bytes()).sum();
        Ok((bytes, Some(self.sumsq.sqrt())))
    }

    /// Pops the stack in forward order, applying Lion to each parameter.
    fn update(&mut self, scale: Option<f64>, lr: f64) -> Result<Figures> {
        let Some(scale) = scale.map(|s| s as f32) else {
            self.stack.clear();
            self.step += 1;
            return Ok(Vec::new());
        };
        while let Some((id, g)) = self.stack.pop() {
            self.lion(id, &g, scale, lr)?;
        }
        self.step += 1;
        Ok(Vec::new())
    }

    fn optimizer_bytes(&self) -> usize {
        self.momentum.iter().map(GpuBlocks8::device_bytes).sum()
    }

    fn reduce(&mut self) -> Result<()> {
        Err(Error::Option("QFT on GPUs runs as one process so far".into()))
    }
}

impl Method for QftGpu {
    fn name(&self) -> &'static str {
        "qft"
    }

    fn step(&mut self, model: &Llama, micro: &[Batch], lr: f64) -> Result<StepStats> {
        first_order::step(self, model, micro, lr)
    }

    fn flops_per_param(&self) -> f64 {
        6.0
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
        super::qft::planned_state(&self.store.cfg, self.cfg.outlier_fraction, false)
            .expect("the model was built with this configuration")
    }

    fn held_bytes(&self) -> Breakdown {
        Breakdown {
            weights: self.store.quant_bytes() + self.store.f32_bytes(),
            gradients: self.stack.iter().map(|(_, g)| g.device_bytes()).sum(),
            optimizer: self.momentum.iter().map(GpuBlocks8::device_bytes).sum(),
            ..Default::default()
        }
    }

    fn export_tensor(&self, id: ParamId) -> Result<Tensor> {
        if id.is_matrix() {
            self.store.mat(id).dequantize()
        } else {
            self.store.vector(id)
        }
    }

    /// The CPU's checkpoint: hybrid weights, f32 norms, INT8 momentum, the step.
    fn save_state(&self, w: &mut StateWriter) -> Result<()> {
        w.meta("step", self.step);
        w.meta("outlier_fraction", self.cfg.outlier_fraction);
        let cfg = &self.store.cfg;
        for id in ParamId::all(cfg) {
            let name = id.hf_name();
            if id.is_matrix() {
                save_hybrid(w, id, &self.hybrid(id)?.download()?);
            } else {
                w.tensor(&name, &self.store.vector(id)?)?;
            }
            let (codes, scales) = self.momentum[id.index(cfg)].download_parts()?;
            Int8Blocks::from_parts(&codes, &scales)?.save(w, &format!("momentum.{name}"));
        }
        Ok(())
    }

    fn load_state(&mut self, r: &StateReader) -> Result<()> {
        let step = r.meta()["step"].as_u64().ok_or_else(|| Error::file(r.path(), "no `step` in the metadata"))?;
        let cfg = self.store.cfg.clone();
        for id in ParamId::all(&cfg) {
            let name = id.hf_name();
            if id.is_matrix() {
                let h = load_hybrid(r, id, &cfg, self.cfg.outlier_fraction)?;
                *self.store.mat_mut(id) = GpuMat::Hybrid(GpuHybrid::upload(&self.dev, &h)?);
            } else {
                let n = id.shape(&cfg)[0];
                let v = r.f32_len(&name, n)?;
                self.store.set_vector(id, Tensor::from_vec(v, n, &Device::Cuda(self.dev.clone()))?);
            }
            let m = Int8Blocks::load(r, &format!("momentum.{name}"), id.numel(&cfg))?;
            let (codes, scales) = m.parts();
            self.momentum[id.index(&cfg)] = GpuBlocks8::upload(&self.dev, &codes, &scales, PIECE)?;
        }
        self.step = step;
        Ok(())
    }
}

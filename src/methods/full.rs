//! Full-parameter fine-tuning in FP32 with AdamW or Lion: the baselines every quantized method is measured
//! against. Gradients are summed over micro-batches in dense f32 buffers, averaged, clipped by global norm, and
//! each parameter is updated and its gradient freed in turn.
use super::{Method, OnNonFinite, StepStats};
use crate::model::{Batch, Keep, Llama, ParamStore, Weights};
use crate::train::memory::{block_scratch_bytes, Breakdown};
use crate::train::optim::Optimizer;
use crate::train::DenseGrads;
use crate::{Error, Result};

pub struct FullFinetune {
    pub params: ParamStore,
    pub opt: Optimizer,
    /// Global-norm clip (None: no clipping).
    pub clip: Option<f64>,
    pub keep: Keep,
    pub on_nan: OnNonFinite,
    name: &'static str,
}

impl FullFinetune {
    pub fn new(params: ParamStore, opt: Optimizer, clip: Option<f64>, keep: Keep, on_nan: OnNonFinite) -> Self {
        let name = match opt {
            Optimizer::AdamW { .. } => "full-adamw",
            Optimizer::Lion { .. } => "full-lion",
        };
        FullFinetune { params, opt, clip, keep, on_nan, name }
    }
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
            let (out, trace) = model.forward(&self.params, batch, self.keep)?;
            let trace = trace.expect("training forward keeps a trace");
            mem.activations = mem.activations.max(trace.bytes());
            let (b, t) = batch.ids.dims2()?;
            mem.scratch = mem.scratch.max(block_scratch_bytes(&model.cfg, b, t, self.keep, 4));
            model.backward(&self.params, trace, &mut grads)?;
            loss += out.loss / micro.len() as f32;
        }
        mem.gradients = grads.bytes();
        // Gradients were summed over micro-batches of mean losses: scale by 1/n, then clip.
        let norm = grads.global_norm()? / micro.len() as f64;
        if !loss.is_finite() || !norm.is_finite() {
            return match self.on_nan {
                OnNonFinite::Skip => Ok(StepStats { loss, grad_norm: Some(norm), applied: false, memory: mem, ..Default::default() }),
                OnNonFinite::Stop => Err(Error::Numerical(format!("loss {loss}, gradient norm {norm}: stopping (--on-nan stop)"))),
            };
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
        Ok(StepStats { loss, grad_norm: Some(norm), applied: true, memory: mem, ..Default::default() })
    }

    fn weights(&self) -> &dyn Weights {
        &self.params
    }

    fn trainable_params(&self) -> usize {
        self.params.cfg.num_params()
    }

    fn state_bytes(&self) -> Breakdown {
        Breakdown {
            weights: self.params.bytes(),
            optimizer: self.params.cfg.num_params() * self.opt.state_bytes_per_param(),
            ..Default::default()
        }
    }

    fn export_params(&self) -> Result<ParamStore> {
        Ok(self.params.clone())
    }
}

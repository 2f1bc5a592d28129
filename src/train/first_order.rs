//! The first-order step, written once for every method that backpropagates (full fine-tuning, QAT, LoRA/QLoRA,
//! QST, QFT): forward and backward each micro-batch into the method's gradient store, average the losses, check
//! for non-finite values, clip by the global norm, update. A method supplies what is its own through
//! [`FirstOrder`]: how it runs a micro-batch, where its gradients go, how they are summed over ranks, and how it
//! applies them.
use super::method::{Figures, Method, OnNonFinite, StepStats};
use crate::model::{Batch, Keep, Llama};
use crate::Result;

/// Options of the first-order loop (read by every first-order method).
#[derive(clap::Args, Clone, Debug, PartialEq)]
#[command(next_help_heading = "First-order methods (full-adamw, full-lion, qft, qat, qst, lora, qlora)")]
pub struct FirstOrderArgs {
    /// Clip gradients to this global L2 norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Keep only block inputs and recompute each block in the backward.
    #[arg(long)]
    pub recompute: bool,
}
crate::options::defaults_from_clap!(FirstOrderArgs);

impl FirstOrderArgs {
    /// The clip norm (None: no clipping).
    pub fn clip(&self) -> Option<f64> {
        (self.clip > 0.0).then_some(self.clip)
    }

    /// What the training forward keeps for the backward.
    pub fn keep(&self) -> Keep {
        if self.recompute {
            Keep::Inputs
        } else {
            Keep::All
        }
    }
}

/// What one micro-batch's forward and backward report.
pub struct Micro {
    /// The micro-batch's mean loss.
    pub loss: f32,
    /// Bytes of the forward's saved activations (the trace the backward consumed).
    pub activations: usize,
    /// Bytes of the backward's transient buffers beyond the trace.
    pub scratch: usize,
}

/// A method's part of the first-order step (the step's memory report starts from [`Method::state_bytes`]).
pub trait FirstOrder: Method {
    /// The clip norm and what to do on a non-finite step.
    fn loop_options(&self) -> (Option<f64>, OnNonFinite);
    /// Forward and backward of micro-batch `k` of `n`, adding its gradient to the method's gradient store (`lr`
    /// is the step's learning rate, for a method that updates inside the backward).
    fn accumulate(&mut self, model: &Llama, batch: &Batch, micro: (usize, usize), lr: f64) -> Result<Micro>;
    /// Once every micro-batch has been added: the bytes the gradient store holds, and the global L2 norm of the
    /// summed gradients, or None when the method applied its update inside the backward (QFT's fused variant:
    /// there is nothing left to check, clip or apply).
    fn summed(&mut self) -> Result<(usize, Option<f64>)>;
    /// With `Some(scale)`, applies the update with the summed gradients multiplied by `scale` (clip factor /
    /// micro-batches) and returns the method's own figures of the step; with None, drops them (a skipped step).
    fn update(&mut self, scale: Option<f64>, lr: f64) -> Result<Figures>;
    /// Bytes of optimizer state after the update.
    fn optimizer_bytes(&self) -> usize;
    /// With several ranks (`crate::dist`): sums the gradient store over them, in a fixed order, once this rank's
    /// micro-batches have all been added (before [`FirstOrder::summed`]).
    fn reduce(&mut self) -> Result<()>;
}

/// One optimizer step of a first-order method over `micro` at learning rate `lr`.
pub fn step(m: &mut dyn FirstOrder, model: &Llama, micro: &[Batch], lr: f64) -> Result<StepStats> {
    let (clip, on_nan) = m.loop_options();
    let n = micro.len();
    let mut mem = m.state_bytes();
    let mut losses = Vec::with_capacity(n);
    for (k, batch) in micro.iter().enumerate() {
        let r = m.accumulate(model, batch, (k, n), lr)?;
        mem.activations = mem.activations.max(r.activations);
        mem.scratch = mem.scratch.max(r.scratch);
        losses.push(r.loss);
    }
    // Several ranks: every rank's micro-batches count, and the gradients are summed over the ranks.
    let loss = crate::dist::mean_in_order(&losses)?;
    let n = n * crate::dist::world().size();
    if crate::dist::world().size() > 1 {
        m.reduce()?;
    }
    let (gradients, norm) = m.summed()?;
    mem.gradients = mem.gradients.max(gradients);
    // Gradients were summed over micro-batches of mean losses: scale by 1/n, then clip.
    let Some(norm) = norm.map(|s| s / n as f64) else {
        // Updated inside the backward: applied whatever the loss.
        let figures = m.update(Some(1.0), lr)?;
        mem.optimizer = mem.optimizer.max(m.optimizer_bytes());
        return Ok(StepStats { loss, grad_norm: None, applied: true, memory: mem, figures });
    };
    if !loss.is_finite() || !norm.is_finite() {
        m.update(None, lr)?;
        return on_nan.fault(loss, Some(norm), mem);
    }
    let clip = clip.map_or(1.0, |c| (c / norm).min(1.0));
    let figures = m.update(Some(clip / n as f64), lr)?;
    mem.optimizer = mem.optimizer.max(m.optimizer_bytes());
    Ok(StepStats { loss, grad_norm: Some(norm), applied: true, memory: mem, figures })
}

//! What the training loop asks of a fine-tuning method: the [`Method`] trait, the [`StepStats`] a step reports and
//! what to do on a non-finite step ([`OnNonFinite`]). The methods themselves live in `crate::methods`, above this
//! layer; the two loops every method runs on live beside this file ([`super::first_order`],
//! [`super::zeroth_order`]).
use super::eval::EvalProbe;
use super::memory::Breakdown;
use crate::checkpoint::{StateReader, StateWriter};
use crate::model::export::{write_hf, Adapter, ExportArgs};
use crate::model::quantized::Compute;
use crate::model::{Batch, Keep, Llama, LlamaConfig, Output, ParamId, Tok, Weights};
use crate::{Error, Result};
use candle_core::Tensor;

/// A method's own figures (name, value), beside the shared ones: QFT's fraction of stored entries a step changed,
/// say. The run log writes them as extra keys of a step's line.
pub type Figures = Vec<(&'static str, f64)>;

/// What one step reports.
#[derive(Clone, Debug, Default)]
pub struct StepStats {
    /// Mean loss over the step's micro-batches.
    pub loss: f32,
    /// Global gradient norm before clipping (first-order methods), or the norm of the projected gradients
    /// (zeroth-order methods).
    pub grad_norm: Option<f64>,
    /// Whether the update was applied (a non-finite loss or gradient skips it).
    pub applied: bool,
    /// Peak bytes by category during this step.
    pub memory: Breakdown,
    /// The method's own figures for this step.
    pub figures: Figures,
}

/// What to do when a loss or gradient is NaN or infinite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
pub enum OnNonFinite {
    /// Skip the update and go on.
    Skip,
    /// Stop the run with an error.
    Stop,
}

impl OnNonFinite {
    /// The outcome of a step whose loss or gradient is not finite: skipped (no update applied), or an error.
    pub fn fault(self, loss: f32, grad_norm: Option<f64>, memory: Breakdown) -> Result<StepStats> {
        match self {
            OnNonFinite::Skip => Ok(StepStats { loss, grad_norm, applied: false, memory, ..Default::default() }),
            OnNonFinite::Stop => Err(Error::Numerical(format!(
                "loss {loss}, gradient norm {}: stopping (--on-nan stop)",
                grad_norm.map_or("–".into(), |n| n.to_string())
            ))),
        }
    }
}

/// A fine-tuning method: it owns the model's weights in its training format and its optimizer state, and runs one
/// optimizer step at a time; the training loop, evaluation, reports and export are shared.
pub trait Method {
    /// The run's name as reports spell it (`full-adamw`, `mezo-lora`, `qft-fused`).
    fn name(&self) -> &'static str;
    /// One optimizer step over `micro` (gradient accumulation over the micro-batches) at learning rate `lr`.
    fn step(&mut self, model: &Llama, micro: &[Batch], lr: f64) -> Result<StepStats>;
    /// The current weights, for evaluation and generation.
    fn weights(&self) -> &dyn Weights;
    /// Parameters the method trains.
    fn trainable_params(&self) -> usize;
    /// Model state (weights, gradients, optimizer states) of a step, counted from the shapes by the same function
    /// the memory planner calls (`MethodKind::planned_state`), so the two cannot drift apart.
    fn state_bytes(&self) -> Breakdown;
    /// The bytes of the tensors the method holds now, counted from the tensors themselves (gradients: those not
    /// yet applied; optimizer: the states created so far): what tests hold [`Method::state_bytes`] to.
    fn held_bytes(&self) -> Breakdown;
    /// Matmul FLOPs per token per matmul parameter of one step, for MFU: 6 for backprop through the model (forward,
    /// input and weight gradients), 4 for adapters over a frozen base (forward and input gradients), 2 for side
    /// tuning (the base runs forward only), 4 for zeroth-order methods (two forwards).
    fn flops_per_param(&self) -> f64;
    /// The arithmetic of the method's weight products, whose GEMM ceiling its MFU is judged against.
    fn compute(&self) -> Compute {
        Compute::F32
    }
    /// Writes the training state in the method's own format (quantized codes, scales, outliers, optimizer states).
    fn save_state(&self, w: &mut StateWriter) -> Result<()>;
    /// Restores what [`Method::save_state`] wrote.
    fn load_state(&mut self, r: &StateReader) -> Result<()>;
    /// One parameter of the trained model as a dense f32 tensor, for export (dequantized or merged as the method
    /// requires); the export asks for one at a time, so no whole f32 model is built.
    fn export_tensor(&self, id: ParamId) -> Result<Tensor>;
    /// The inference forward evaluation runs. A method whose model is not the decoder over [`Method::weights`]
    /// (QST: base plus side network) overrides it.
    fn forward(&self, model: &Llama, batch: &Batch) -> Result<Output> {
        Ok(model.forward(self.weights(), batch, Keep::Nothing)?.0)
    }
    /// The method's own measurement of an evaluation (QST: the side branch's share of the logits), if any.
    fn eval_probe(&self) -> Option<Box<dyn EvalProbe>> {
        None
    }
    /// Writes the trained model to `dir`: an HF checkpoint of [`Method::export_tensor`], streamed, unless the
    /// method's model is not a LLaMA (QST writes its side network and a reference to `base_model`, the file the run
    /// started from).
    fn export(
        &self,
        cfg: &LlamaConfig,
        dir: &std::path::Path,
        tok: Option<&Tok>,
        _base_model: &str,
        opts: &ExportArgs,
    ) -> Result<()> {
        write_hf(cfg, &|id| self.export_tensor(id), tok, dir, opts)
    }
    /// The LoRA factors a PEFT export writes, for the methods that train them.
    fn adapter(&self) -> Option<&dyn Adapter> {
        None
    }
}

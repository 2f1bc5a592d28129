//! Fine-tuning methods. Each owns the model's weights in its training format and its optimizer state, and runs
//! one optimizer step at a time; the training loop, evaluation, reports and export are shared.
pub mod full;
pub mod lora;
pub mod qft;
pub mod qst;
pub mod quzo;
pub mod zo;
pub mod zo_lora;

use crate::model::load::write_hf;
use crate::model::quantized::Source;
use crate::model::{Batch, Keep, Llama, LlamaConfig, Output, ParamId, Tok, Weights};
use crate::train::memory::Breakdown;
use crate::{Error, Result};
use candle_core::Tensor;

pub use full::FullFinetune;

/// What one step reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepStats {
    /// Mean loss over the step's micro-batches.
    pub loss: f32,
    /// Global gradient norm before clipping (first-order methods).
    pub grad_norm: Option<f64>,
    /// Whether the update was applied (a non-finite loss or gradient skips it).
    pub applied: bool,
    /// Peak bytes by category during this step.
    pub memory: Breakdown,
    /// Quantized weights: the fraction of stored entries this step changed.
    pub changed_fraction: Option<f64>,
    /// QFT: the fraction of INT8 weight codes this step changed (stochastic rounding at work).
    pub changed_int8_fraction: Option<f64>,
}

/// What to do when a loss or gradient is NaN or infinite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

impl std::str::FromStr for OnNonFinite {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "skip" => Ok(OnNonFinite::Skip),
            "stop" => Ok(OnNonFinite::Stop),
            _ => Err(Error::Option(format!("--on-nan `{s}`: expected skip or stop"))),
        }
    }
}

pub trait Method {
    /// The method's name as the CLI and reports spell it.
    fn name(&self) -> &'static str;
    /// One optimizer step over `micro` (gradient accumulation over the micro-batches) at learning rate `lr`.
    fn step(&mut self, model: &Llama, micro: &[Batch], lr: f64) -> Result<StepStats>;
    /// The current weights, for evaluation and generation.
    fn weights(&self) -> &dyn Weights;
    /// Parameters the method trains.
    fn trainable_params(&self) -> usize;
    /// Bytes of weights, gradients and optimizer state held between steps.
    fn state_bytes(&self) -> Breakdown;
    /// Whether [`Method::save_state`] is implemented.
    fn saves_state(&self) -> bool {
        false
    }
    /// Writes the training state in the method's own format (quantized codes, scales, outliers, optimizer states).
    fn save_state(&self, _w: &mut crate::checkpoint::StateWriter) -> Result<()> {
        Err(Error::Option(format!("{} cannot save its training state yet", self.name())))
    }
    /// Restores what [`Method::save_state`] wrote.
    fn load_state(&mut self, _r: &crate::checkpoint::StateReader) -> Result<()> {
        Err(Error::Option(format!("{} cannot load a training state yet", self.name())))
    }
    /// One parameter of the trained model as a dense f32 tensor, for export (dequantized or merged as the method
    /// requires); the export asks for one at a time, so no whole f32 model is built.
    fn export_tensor(&self, id: ParamId) -> Result<Tensor>;
    /// The inference forward evaluation runs. A method whose model is not the decoder over [`Method::weights`]
    /// (QST: base plus side network) overrides it.
    fn forward(&self, model: &Llama, batch: &Batch) -> Result<Output> {
        Ok(model.forward(self.weights(), batch, Keep::Nothing)?.0)
    }
    /// Writes the trained model to `dir`: an HF checkpoint of [`Method::export_tensor`], streamed, unless the
    /// method's model is not a LLaMA (QST writes its side network and a reference to `base_model`, the file the run
    /// started from).
    fn export(&self, cfg: &LlamaConfig, dir: &std::path::Path, tok: Option<&Tok>, _base_model: &str) -> Result<()> {
        write_hf(cfg, &|id| self.export_tensor(id), tok, dir)
    }
}

pub const METHODS: &[&str] = &["full-adamw", "full-lion", "qft", "mezo", "quzo", "qat", "qst", "lora", "qlora"];

/// The first-order methods: they clip gradients and can recompute blocks in the backward.
const FIRST_ORDER: &[&str] = &["full-adamw", "full-lion", "qft", "qat", "qst", "lora", "qlora"];
/// The zeroth-order methods, full and over LoRA factors (`--lora`).
const ZEROTH_ORDER: &[&str] = &["mezo", "quzo", "mezo --lora", "quzo --lora"];

/// The method options (CLI names) only some methods read, with the methods that read them; `mezo --lora` and
/// `quzo --lora` are the zeroth-order methods over LoRA factors. `--weight-decay` is read by every method.
/// [`check_options_read`] refuses an option given to a method that would ignore it.
pub const METHOD_OPTIONS: &[(&str, &[&str])] = &[
    ("clip", FIRST_ORDER),
    ("recompute", FIRST_ORDER),
    ("eps", ZEROTH_ORDER),
    ("directions", ZEROTH_ORDER),
    ("lora", &["mezo --lora", "quzo --lora"]),
    ("bits", &["quzo", "quzo --lora", "qat"]),
    ("perturb-bits", &["quzo", "quzo --lora"]),
    ("estimator", &["quzo", "quzo --lora"]),
    ("outlier-fraction", &["qft"]),
    ("recalibrate-every", &["qft"]),
    ("fused", &["qft"]),
    ("side-r", &["qst"]),
    ("side-heads", &["qst"]),
    ("downsample", &["qst"]),
    ("adapter-rank", &["qst"]),
    ("qst-start", &["qst"]),
    ("alpha-lr-scale", &["qst"]),
    ("alpha-clamp", &["qst"]),
    ("zero-upsample", &["qst"]),
    ("lora-r", &["lora", "qlora", "mezo --lora", "quzo --lora"]),
    ("lora-alpha", &["lora", "qlora", "mezo --lora", "quzo --lora"]),
    ("optimizer", &["qst", "lora", "qlora"]),
];

/// Refuses the first option of `given` (CLI names without dashes) that [`METHOD_OPTIONS`] says `method` (with
/// `lora`: its LoRA variant) does not read, naming the methods that do: an option that would be silently ignored
/// is a mistake in the command.
pub fn check_options_read(method: &str, lora: bool, given: &[String]) -> Result<()> {
    let variant = if lora && ZEROTH_ORDER.contains(&method) { format!("{method} --lora") } else { method.to_string() };
    for g in given {
        if let Some((_, readers)) = METHOD_OPTIONS.iter().find(|(name, _)| name == g) {
            if !readers.contains(&variant.as_str()) {
                return Err(Error::Option(format!(
                    "--{g} is not read by --method {variant} (only by {})",
                    readers.join(", ")
                )));
            }
        }
    }
    Ok(())
}

/// The optimizer of the methods that train their own tensors (QST, LoRA, QLoRA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    AdamW,
    Lion,
}

impl std::str::FromStr for OptimizerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "adamw" => Ok(OptimizerKind::AdamW),
            "lion" => Ok(OptimizerKind::Lion),
            _ => Err(Error::Option(format!("--optimizer `{s}`: expected adamw or lion"))),
        }
    }
}

/// Every option a method may read; each method takes what applies to it.
#[derive(Clone, Copy, Debug)]
pub struct MethodOptions {
    pub weight_decay: f64,
    /// Global-norm gradient clip (first-order methods).
    pub clip: Option<f64>,
    pub keep: Keep,
    pub on_nan: OnNonFinite,
    /// Zeroth-order perturbation scale and directions per step.
    pub eps: f64,
    pub directions: usize,
    pub seed: u64,
    /// Weight bits of quantized methods (QuZO: 8 or 4).
    pub bits: u32,
    /// QuZO's perturbation bits.
    pub perturb_bits: u32,
    pub estimator: quzo::Estimator,
    /// QFT: fraction of each matrix kept as f32 outliers.
    pub outlier_fraction: f64,
    /// QFT: steps between recalibrations of scales and outlier thresholds (0: never).
    pub recalibrate_every: usize,
    /// QFT: apply the update inside the backward (no gradient stack).
    pub fused: bool,
    /// QST: reduction factor r (side width d/r, FFN width ffn/r).
    pub side_r: usize,
    /// QST: the side blocks' query heads (`None`: the base's, as the official code).
    pub side_heads: Option<usize>,
    /// QST: how base hidden states are brought down to the side width.
    pub downsample: qst::Downsample,
    /// QST: inner width of the adapter and LoRA-style downsamples.
    pub adapter_rank: usize,
    /// QST: the paper's exact start or the official code's.
    pub qst_start: qst::Start,
    /// QST: α's learning rate as a multiple of the run's.
    pub alpha_lr_scale: f64,
    pub alpha_clamp: bool,
    pub zero_upsample: bool,
    /// LoRA / QLoRA rank and alpha (scale alpha / r).
    pub lora_r: usize,
    pub lora_alpha: f64,
    /// QST, LoRA, QLoRA: AdamW (the papers' setting) or Lion.
    pub optimizer: OptimizerKind,
    /// MeZO, QuZO: train LoRA factors (`--lora-r`, `--lora-alpha`) over the frozen (f32 / quantized) base.
    pub lora: bool,
}

impl MethodOptions {
    /// QST's configuration from these options (training and `qtune plan` read the same).
    pub fn qst_config(&self) -> qst::QstConfig {
        qst::QstConfig {
            r: self.side_r,
            side_heads: self.side_heads,
            downsample: self.downsample,
            adapter_rank: self.adapter_rank,
            keep: self.keep,
            seed: self.seed,
            start: self.qst_start,
            alpha_lr_scale: self.alpha_lr_scale,
            alpha_clamp: self.alpha_clamp,
            zero_upsample: self.zero_upsample,
        }
    }
}

impl Default for MethodOptions {
    /// The CLI's defaults (`qtune train --help`).
    fn default() -> Self {
        MethodOptions {
            weight_decay: 0.0,
            clip: Some(1.0),
            keep: Keep::All,
            on_nan: OnNonFinite::Skip,
            eps: 1e-3,
            directions: 1,
            seed: 0,
            bits: 8,
            perturb_bits: 4,
            estimator: quzo::Estimator::Qrge2,
            outlier_fraction: 0.01,
            recalibrate_every: 0,
            fused: false,
            side_r: 16,
            side_heads: None,
            downsample: qst::Downsample::Adapter,
            adapter_rank: 16,
            qst_start: qst::Start::Paper,
            alpha_lr_scale: 1.0,
            alpha_clamp: false,
            zero_upsample: false,
            lora_r: 8,
            lora_alpha: 16.0,
            optimizer: OptimizerKind::AdamW,
            lora: false,
        }
    }
}

/// Builds the method `name` starting from `source`; returns it with its default peak learning rate. Quantized
/// methods quantize the model as it is read; f32 methods load it whole.
pub fn build(name: &str, source: Source, o: &MethodOptions) -> Result<(Box<dyn Method>, f64)> {
    use crate::train::optim::{AdamWConfig, LionConfig, Optimizer};
    Ok(match name {
        "full-adamw" => {
            let opt = Optimizer::adamw(AdamWConfig { weight_decay: o.weight_decay, ..Default::default() });
            (Box::new(FullFinetune::new(source.params()?, opt, o.clip, o.keep, o.on_nan)), 1e-5)
        }
        "full-lion" => {
            let opt = Optimizer::lion(LionConfig { weight_decay: o.weight_decay, ..Default::default() });
            (Box::new(FullFinetune::new(source.params()?, opt, o.clip, o.keep, o.on_nan)), 1e-6)
        }
        "qft" => {
            let cfg = qft::QftConfig {
                lion: LionConfig { weight_decay: o.weight_decay, ..Default::default() },
                outlier_fraction: o.outlier_fraction,
                clip: o.clip,
                recalibrate_every: o.recalibrate_every,
                fused: o.fused,
                keep: o.keep,
                seed: o.seed,
            };
            (Box::new(qft::Qft::new(source, cfg, o.on_nan)?), 1e-6)
        }
        "qat" => {
            let opt = Optimizer::adamw(AdamWConfig { weight_decay: o.weight_decay, ..Default::default() });
            (
                Box::new(FullFinetune::qat(
                    source.params()?,
                    opt,
                    quzo::weight_spec(o.bits)?,
                    o.clip,
                    o.keep,
                    o.on_nan,
                )?),
                1e-5,
            )
        }
        "mezo" | "quzo" if o.lora => {
            // MeZO's LoRA setting: lr 1e-4 (QuZO's LoRA scripts: 1e-5 to 1e-4).
            let zo = zo::ZoConfig { eps: o.eps, directions: o.directions, weight_decay: o.weight_decay, seed: o.seed };
            let lc = lora::LoraConfig { r: o.lora_r, alpha: o.lora_alpha, seed: o.seed };
            let m: Box<dyn Method> = if name == "mezo" {
                let dirs = zo_lora::Directions::Gaussian;
                Box::new(zo_lora::ZoLora::new("mezo-lora", source.params()?, lc, zo, dirs, o.on_nan)?)
            } else {
                let base = quzo::quantize_int(source, o.bits)?;
                let dirs = zo_lora::Directions::Quantized { bits: o.perturb_bits, estimator: o.estimator };
                Box::new(zo_lora::ZoLora::new("quzo-lora", base, lc, zo, dirs, o.on_nan)?)
            };
            (m, 1e-4)
        }
        "mezo" => {
            let cfg = zo::ZoConfig { eps: o.eps, directions: o.directions, weight_decay: o.weight_decay, seed: o.seed };
            (Box::new(zo::Mezo::new(source.params()?, cfg, o.on_nan)?), 1e-6)
        }
        "quzo" => {
            let zo = zo::ZoConfig { eps: o.eps, directions: o.directions, weight_decay: o.weight_decay, seed: o.seed };
            let cfg = quzo::QuzoConfig { zo, bits: o.bits, perturb_bits: o.perturb_bits, estimator: o.estimator };
            (Box::new(quzo::Quzo::new(source, cfg, o.on_nan)?), 1e-6)
        }
        "qst" | "lora" | "qlora" => {
            // Peak LRs: QST's paper 2e-4, LoRA 1e-4 with AdamW; Lion wants about a tenth.
            let (opt, lr_scale) = match o.optimizer {
                OptimizerKind::AdamW => {
                    (Optimizer::adamw(AdamWConfig { weight_decay: o.weight_decay, ..Default::default() }), 1.0)
                }
                OptimizerKind::Lion => {
                    (Optimizer::lion(LionConfig { weight_decay: o.weight_decay, ..Default::default() }), 0.1)
                }
            };
            let update = lora::FirstOrder { opt, clip: o.clip, on_nan: o.on_nan };
            let lc = lora::LoraConfig { r: o.lora_r, alpha: o.lora_alpha, seed: o.seed };
            let (m, lr): (Box<dyn Method>, f64) = match name {
                "qst" => (Box::new(qst::Qst::new(source, o.qst_config(), update)?), 2e-4),
                "lora" => (Box::new(lora::Lora::new("lora", source.params()?, lc, update, o.keep)?), 1e-4),
                _ => {
                    lc.validate()?;
                    (Box::new(lora::Lora::new("qlora", lora::nf4_base(source)?, lc, update, o.keep)?), 1e-4)
                }
            };
            (m, lr * lr_scale)
        }
        other => return Err(Error::Option(format!("unknown --method `{other}` (known: {})", METHODS.join(", ")))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::tests::{batch, tiny_config};
    use crate::model::{ParamId, ParamStore};
    use candle_core::DType;

    /// A NaN loss in any method: `skip` applies no update (the exported weights are untouched), `stop` ends with a
    /// numerical error. The NaN enters through the final norm, which every method keeps in f32. (QST exports no
    /// base matrix; its skipped step is checked by `applied` alone.)
    #[test]
    fn every_method_skips_or_stops_on_a_non_finite_loss() {
        let cfg = tiny_config(true);
        let model = Llama::new(cfg.clone());
        let mut p = ParamStore::random(&cfg, 3, 0.3, DType::F32).unwrap();
        p.set(ParamId::FinalNorm, (p.get(ParamId::FinalNorm) * f64::NAN).unwrap());
        let tiny =
            MethodOptions { side_r: 2, adapter_rank: 4, lora_r: 2, outlier_fraction: 0.05, ..Default::default() };
        for (name, lora) in METHODS.iter().map(|m| (*m, false)).chain([("mezo", true), ("quzo", true)]) {
            let o = MethodOptions { on_nan: OnNonFinite::Skip, lora, ..tiny };
            let (mut m, _) = build(name, Source::Params(p.clone()), &o).unwrap();
            let q = ParamId::Block(0, crate::model::BlockParam::Q);
            let before = m.export_tensor(q).ok();
            let s = m.step(&model, &[batch(true)], 1e-2).unwrap();
            assert!(!s.applied && !s.loss.is_finite(), "{name}: a NaN step was applied");
            if let Some(before) = before {
                let d = (m.export_tensor(q).unwrap() - before).unwrap().abs().unwrap().max_all().unwrap();
                assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{name}: weights changed on a skipped step");
            }
            let o = MethodOptions { on_nan: OnNonFinite::Stop, lora, ..tiny };
            let (mut m, _) = build(name, Source::Params(p.clone()), &o).unwrap();
            assert!(matches!(m.step(&model, &[batch(true)], 1e-2), Err(Error::Numerical(_))), "{name}: did not stop");
        }
    }
}

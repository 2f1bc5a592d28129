//! Fine-tuning methods. Each owns the model's weights in its training format and its optimizer state, and
//! implements the training loop's traits (`crate::train`): [`crate::train::first_order::FirstOrder`] for the methods
//! that backpropagate, [`crate::train::zeroth_order::Perturbation`] for the zeroth-order ones. A method's identity is
//! [`MethodKind`]; its options are one `clap::Args` group in its own module, gathered in [`MethodOptions`]; which
//! method reads which group is [`MethodKind::reads`].
pub mod full;
pub mod lora;
pub mod mezo;
pub mod qft;
#[cfg(feature = "cuda")]
pub mod qft_gpu;
pub mod qst;
pub mod quzo;
#[cfg(feature = "cuda")]
pub mod quzo_gpu;
pub mod zo_lora;

use crate::device::DeviceSpec;
use crate::model::quantized::{quant_err, Compute, Source};
use crate::model::{LlamaConfig, ParamId};
use crate::train::first_order::FirstOrderArgs;
use crate::train::memory::Breakdown;
use crate::train::optim::{AdamWConfig, LionConfig, Optimizer, OptimizerArgs, OptimizerKind};
use crate::train::zeroth_order::{ZoArgs, ZoLoop};
use crate::train::{Method, OnNonFinite};
use crate::{Error, Result};
use candle_core::Device;
use clap::ArgMatches;
use qtune_quant::{HybridTensor, Nf4Tensor, QuantSpec};

/// The methods `--method` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodKind {
    /// FP32 AdamW, every parameter: the baseline.
    FullAdamw,
    /// FP32 Lion, every parameter.
    FullLion,
    /// QFT: INT8 weights + 1% f32 outliers, INT8 gradients on a stack, INT8 Lion momentum.
    Qft,
    /// MeZO: FP32 zeroth-order SGD (`--lora`: over LoRA factors).
    Mezo,
    /// QuZO: zeroth-order on INT8/INT4 weights with low-bit directions (`--lora`: over LoRA factors).
    Quzo,
    /// Quantization-aware training: the quantized first-order baseline.
    Qat,
    /// QST: NF4 frozen base, side network.
    Qst,
    /// LoRA over the f32 model.
    Lora,
    /// QLoRA: LoRA over an NF4 base.
    Qlora,
}

impl MethodKind {
    pub const ALL: [MethodKind; 9] = [
        MethodKind::FullAdamw,
        MethodKind::FullLion,
        MethodKind::Qft,
        MethodKind::Mezo,
        MethodKind::Quzo,
        MethodKind::Qat,
        MethodKind::Qst,
        MethodKind::Lora,
        MethodKind::Qlora,
    ];

    /// The name `--method` takes.
    pub fn cli_name(self) -> &'static str {
        match self {
            MethodKind::FullAdamw => "full-adamw",
            MethodKind::FullLion => "full-lion",
            MethodKind::Qft => "qft",
            MethodKind::Mezo => "mezo",
            MethodKind::Quzo => "quzo",
            MethodKind::Qat => "qat",
            MethodKind::Qst => "qst",
            MethodKind::Lora => "lora",
            MethodKind::Qlora => "qlora",
        }
    }

    pub fn is_zeroth_order(self) -> bool {
        matches!(self, MethodKind::Mezo | MethodKind::Quzo)
    }

    /// Whether this method (with `lora`: its zeroth-order LoRA mode) reads the options of `group`.
    pub fn reads(self, lora: bool, group: Group) -> bool {
        use MethodKind as M;
        match group {
            Group::FirstOrder => !self.is_zeroth_order(),
            Group::ZerothOrder => self.is_zeroth_order(),
            Group::Bits => matches!(self, M::Quzo | M::Qat),
            Group::Quzo => self == M::Quzo,
            Group::Compute => matches!(self, M::Quzo | M::Qft),
            Group::Qft => self == M::Qft,
            Group::Qst => self == M::Qst,
            Group::Lora => matches!(self, M::Lora | M::Qlora) || (lora && self.is_zeroth_order()),
            Group::Optimizer => matches!(self, M::Qst | M::Lora | M::Qlora),
        }
    }

    /// The run's name as reports spell it: `mezo --lora` is `mezo-lora`.
    pub fn run_name(self, o: &MethodOptions) -> String {
        match self {
            MethodKind::Mezo | MethodKind::Quzo if o.zo.lora => format!("{}-lora", self.cli_name()),
            _ => self.cli_name().to_string(),
        }
    }
}

impl std::fmt::Display for MethodKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.cli_name())
    }
}

/// Every method's options, one group each (flattened into `qtune train` and `qtune plan`).
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct MethodOptions {
    /// Decoupled weight decay (every method; matrices only).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[command(flatten)]
    pub first_order: FirstOrderArgs,
    #[command(flatten)]
    pub zo: ZoArgs,
    #[command(flatten)]
    pub bits: quzo::BitsArgs,
    #[command(flatten)]
    pub quzo: quzo::QuzoArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub qft: qft::QftArgs,
    #[command(flatten)]
    pub qst: qst::QstArgs,
    #[command(flatten)]
    pub lora: lora::LoraArgs,
    #[command(flatten)]
    pub optimizer: OptimizerArgs,
}
crate::options::defaults_from_clap!(MethodOptions);

impl MethodOptions {
    /// Refuses a value no method could run with, naming the option, before anything is read (`train` and `plan`
    /// both: a plan is never printed for options a run would refuse). The methods' own constructors check the
    /// same for library callers.
    pub fn check(&self) -> Result<()> {
        let finite_at_least_0 = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(Error::Option(format!("--{name} {v} must be a finite number ≥ 0")))
            }
        };
        finite_at_least_0("weight-decay", self.weight_decay)?;
        finite_at_least_0("clip", self.first_order.clip)?;
        let f = self.qft.outlier_fraction;
        if !(0.0..1.0).contains(&f) {
            return Err(Error::Option(format!("--outlier-fraction {f} must be in [0, 1)")));
        }
        if ![4, 8].contains(&self.bits.bits) {
            return Err(Error::Option(format!("--bits {}: the quantized methods take 8 or 4", self.bits.bits)));
        }
        self.quzo.check()?;
        ZoLoop::new(&self.zo, self.weight_decay, 0, OnNonFinite::Stop)?;
        lora::LoraConfig { r: self.lora.lora_r, alpha: self.lora.lora_alpha, seed: 0 }.validate()?;
        Ok(())
    }
}

/// The arithmetic of the quantized weight products (read by quzo and qft).
#[derive(clap::Args, Clone, Debug, PartialEq)]
#[command(next_help_heading = "Quantized compute (quzo, qft)")]
pub struct ComputeArgs {
    /// Arithmetic of the quantized weight products: int8 (INT8 activations per token × the weight's integer codes,
    /// i32 sums) or f32 (the weight dequantized tile by tile). Default: int8 for full-parameter quzo (its forwards;
    /// the perturbation is then rounded onto the weight's grid); f32 for `quzo --lora` (as the official code's LoRA
    /// mode, whose W4 base computes in bf16: INT8-activation forwards leave its two-point estimates noise only,
    /// `examples/zo_noise`) and for qft (int8 runs its forward and input-gradient products; the weight gradient
    /// stays f32). On a GPU (`--device cuda`) every quantized product runs in f32: int8 is refused there.
    #[arg(long, value_enum)]
    pub compute: Option<Compute>,
}
crate::options::defaults_from_clap!(ComputeArgs);

impl ComputeArgs {
    /// On a GPU the quantized products run in f32 (dequantized matrices through cuBLAS): any other `--compute` is
    /// refused by name.
    pub fn check_gpu(&self) -> Result<()> {
        match self.compute {
            Some(c) if c != Compute::F32 => Err(Error::Option(format!(
                "--compute {}: the integer path is the CPU's; on a GPU the quantized products run in f32 \
                 (--compute f32)",
                c.cli_name()
            ))),
            _ => Ok(()),
        }
    }

    /// The arithmetic `kind` (in LoRA mode if `lora`) runs in: the one given, else the method's default.
    pub fn of(&self, kind: MethodKind, lora: bool) -> Compute {
        self.compute.unwrap_or(match kind {
            MethodKind::Quzo if !lora => Compute::Int8,
            _ => Compute::F32,
        })
    }
}

/// The option groups of [`MethodOptions`] (beside `--weight-decay`, read by all).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    FirstOrder,
    ZerothOrder,
    Bits,
    Quzo,
    Compute,
    Qft,
    Qst,
    Lora,
    Optimizer,
}

impl Group {
    pub const ALL: [Group; 9] = [
        Group::FirstOrder,
        Group::ZerothOrder,
        Group::Bits,
        Group::Quzo,
        Group::Compute,
        Group::Qft,
        Group::Qst,
        Group::Lora,
        Group::Optimizer,
    ];

    /// The group's options that a parsed command line gave.
    pub fn given(self, m: &ArgMatches) -> Vec<String> {
        use crate::options::given;
        match self {
            Group::FirstOrder => given::<FirstOrderArgs>(m),
            Group::ZerothOrder => given::<ZoArgs>(m),
            Group::Bits => given::<quzo::BitsArgs>(m),
            Group::Quzo => given::<quzo::QuzoArgs>(m),
            Group::Compute => given::<ComputeArgs>(m),
            Group::Qft => given::<qft::QftArgs>(m),
            Group::Qst => given::<qst::QstArgs>(m),
            Group::Lora => given::<lora::LoraArgs>(m),
            Group::Optimizer => given::<OptimizerArgs>(m),
        }
    }
}

/// Refuses an option of `matches` that `kind` (with `lora`: its LoRA mode) would not read, naming the methods that
/// do: an option that would be silently ignored is a mistake in the command.
pub fn check_given(kind: MethodKind, lora: bool, matches: &ArgMatches) -> Result<()> {
    let variant = |k: MethodKind, lora: bool| {
        if lora && k.is_zeroth_order() {
            format!("{} --lora", k.cli_name())
        } else {
            k.cli_name().to_string()
        }
    };
    for group in Group::ALL {
        let Some(opt) = group.given(matches).into_iter().next() else { continue };
        if !kind.reads(lora, group) {
            let readers: Vec<String> = MethodKind::ALL
                .iter()
                .flat_map(|&k| [(k, false), (k, true)])
                .filter(|&(k, l)| (!l || k.is_zeroth_order()) && k.reads(l, group))
                .map(|(k, l)| variant(k, l))
                .collect();
            return Err(Error::Option(format!(
                "{opt} is not read by --method {} (only by {})",
                variant(kind, lora),
                readers.join(", ")
            )));
        }
    }
    Ok(())
}

/// How a method stores the model's matrices (norm weights stay f32): what its weights, and the planner's load
/// phase, are counted from.
#[derive(Clone, Copy, Debug)]
pub enum Storage {
    F32,
    /// INT8/INT4 codes with their scales (QuZO, QAT's copy, `eval --bits`).
    Int(QuantSpec),
    /// NF4 with double quantization, blocks of [`lora::NF4_BLOCK`] (QLoRA's and QST's base).
    Nf4,
    /// QFT's INT8 + f32 outliers, at this outlier fraction.
    Hybrid(f64),
}

impl Storage {
    /// Bytes of a [rows, cols] matrix in this storage (equal to the real tensors' `storage_bytes`, tested).
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> Result<usize> {
        Ok(match self {
            Storage::F32 => 4 * rows * cols,
            Storage::Int(spec) => spec.planned_bytes(rows, cols).map_err(quant_err)?.total(),
            Storage::Nf4 => Nf4Tensor::planned_bytes(rows * cols, lora::NF4_BLOCK, true).total(),
            Storage::Hybrid(fraction) => HybridTensor::planned_bytes(rows, cols, fraction).total(),
        })
    }

    /// Bytes of the whole model of `cfg` in this storage: matrices as stored, vectors f32.
    pub fn model_bytes(self, cfg: &LlamaConfig) -> Result<usize> {
        let mut total = 0;
        for id in ParamId::all(cfg) {
            let shape = id.shape(cfg);
            total += if id.is_matrix() { self.matrix_bytes(shape[0], shape[1])? } else { 4 * id.numel(cfg) };
        }
        Ok(total)
    }
}

impl MethodKind {
    /// How this method stores the model it starts from.
    pub fn storage(self, o: &MethodOptions) -> Result<Storage> {
        Ok(match self {
            MethodKind::FullAdamw | MethodKind::FullLion | MethodKind::Qat | MethodKind::Lora => Storage::F32,
            MethodKind::Mezo => Storage::F32,
            MethodKind::Quzo => Storage::Int(quzo::weight_spec(o.bits.bits)?),
            MethodKind::Qft => Storage::Hybrid(o.qft.outlier_fraction),
            MethodKind::Qst | MethodKind::Qlora => Storage::Nf4,
        })
    }

    /// The model state (weights, gradients, optimizer states) of a step of this method on `cfg`, from the shapes
    /// alone: the one count both the method's step report ([`Method::state_bytes`]) and the memory planner use.
    pub fn planned_state(self, cfg: &LlamaConfig, o: &MethodOptions) -> Result<Breakdown> {
        let lc = lora::LoraConfig { r: o.lora.lora_r, alpha: o.lora.lora_alpha, seed: 0 };
        let own_opt = match o.optimizer.optimizer {
            OptimizerKind::AdamW => 8,
            OptimizerKind::Lion => 4,
        };
        let storage = self.storage(o)?;
        match self {
            MethodKind::FullAdamw => full::planned_state(cfg, 8, None),
            MethodKind::FullLion => full::planned_state(cfg, 4, None),
            MethodKind::Qat => full::planned_state(cfg, 8, Some(quzo::weight_spec(o.bits.bits)?)),
            MethodKind::Qft => qft::planned_state(cfg, o.qft.outlier_fraction, o.qft.fused),
            MethodKind::Lora | MethodKind::Qlora => lora::planned_state(cfg, storage, &lc, own_opt),
            MethodKind::Qst => qst::planned_state(cfg, &o.qst.config(o.first_order.keep(), 0), own_opt),
            MethodKind::Mezo | MethodKind::Quzo if o.zo.lora => zo_lora::planned_state(cfg, storage, &lc),
            MethodKind::Mezo | MethodKind::Quzo => mezo::planned_state(cfg, storage),
        }
    }
}

/// What a method is built for beyond its options.
#[derive(Clone, Debug)]
pub struct RunContext {
    pub seed: u64,
    pub on_nan: OnNonFinite,
    /// Optimizer steps per epoch (QFT recalibrates once per epoch by default).
    pub epoch_steps: usize,
    /// Where the method's weights and state live (`--device`).
    pub device: Device,
}

impl RunContext {
    /// A context on the CPU (tests, the planner).
    pub fn cpu(seed: u64, on_nan: OnNonFinite, epoch_steps: usize) -> Self {
        RunContext { seed, on_nan, epoch_steps, device: Device::Cpu }
    }
}

impl MethodKind {
    /// The peak learning rate a run of this method takes unless `--lr` names one: AdamW 1e-5; Lion, QFT, MeZO and
    /// QuZO 1e-6; QST 2e-4 and LoRA/QLoRA 1e-4 with AdamW (a tenth with Lion); zeroth-order LoRA 1e-4 (MeZO's LoRA
    /// setting; QuZO's LoRA scripts: 1e-5 to 1e-4).
    pub fn default_lr(self, o: &MethodOptions) -> f64 {
        let lion_scale = if o.optimizer.optimizer == OptimizerKind::Lion { 0.1 } else { 1.0 };
        match self {
            MethodKind::FullAdamw | MethodKind::Qat => 1e-5,
            MethodKind::FullLion | MethodKind::Qft => 1e-6,
            MethodKind::Mezo | MethodKind::Quzo if o.zo.lora => 1e-4,
            MethodKind::Mezo | MethodKind::Quzo => 1e-6,
            MethodKind::Qst => 2e-4 * lion_scale,
            MethodKind::Lora | MethodKind::Qlora => 1e-4 * lion_scale,
        }
    }

    /// Whether this method runs on a GPU so far: the f32 ones whose arithmetic is candle's (FP32 AdamW and Lion,
    /// LoRA), MeZO (full: directions from the Philox kernel; over LoRA factors: drawn on the host and moved), and
    /// the methods over a quantized model held on the GPU (`model::quantized_gpu`, f32 products): QLoRA and QST
    /// (NF4 base), QuZO (INT8/INT4; full, updated by the fused kernel, or over LoRA factors), QAT (its INT8/INT4
    /// copy re-quantized on the device after each step) and QFT (hybrid weights, INT8 gradient stack and Lion; not
    /// its fused variant, whose in-backward update is the CPU's only).
    pub fn runs_on_gpu(self, o: &MethodOptions) -> bool {
        use MethodKind as M;
        match self {
            M::Qft => !o.qft.fused,
            M::FullAdamw | M::FullLion | M::Lora | M::Mezo | M::Qlora | M::Quzo | M::Qst | M::Qat => true,
        }
    }

    /// Refuses a GPU for a method that does not run there yet, naming it.
    pub fn check_device(self, o: &MethodOptions, spec: DeviceSpec) -> Result<()> {
        if self.runs_on_gpu(o) {
            return Ok(());
        }
        crate::device::require_cpu(spec, &self.run_name(o))
    }

    /// Builds the method starting from `source`. Quantized methods quantize the model as it is read; f32 methods
    /// load it whole.
    pub fn build(self, o: &MethodOptions, source: Source, ctx: &RunContext) -> Result<Box<dyn Method>> {
        self.check_device(o, DeviceSpec::of(&ctx.device))?;
        let dev = &ctx.device;
        let fo = &o.first_order;
        let adamw = || Optimizer::adamw(AdamWConfig { weight_decay: o.weight_decay, ..Default::default() });
        let lion = || Optimizer::lion(LionConfig { weight_decay: o.weight_decay, ..Default::default() });
        let own_optimizer = || match o.optimizer.optimizer {
            OptimizerKind::AdamW => adamw(),
            OptimizerKind::Lion => lion(),
        };
        let update = || lora::Update { opt: own_optimizer(), clip: fo.clip(), on_nan: ctx.on_nan };
        let zo = || ZoLoop::new(&o.zo, o.weight_decay, ctx.seed, ctx.on_nan);
        let lc = lora::LoraConfig { r: o.lora.lora_r, alpha: o.lora.lora_alpha, seed: ctx.seed };
        Ok(match self {
            MethodKind::FullAdamw => Box::new(full::FullFinetune::new(source.params_on(dev)?, adamw(), fo, ctx.on_nan)),
            MethodKind::FullLion => Box::new(full::FullFinetune::new(source.params_on(dev)?, lion(), fo, ctx.on_nan)),
            MethodKind::Qat => {
                let spec = quzo::weight_spec(o.bits.bits)?;
                Box::new(full::FullFinetune::qat(source.params_on(dev)?, adamw(), spec, fo, ctx.on_nan)?)
            }
            MethodKind::Qft => {
                let lion = LionConfig { weight_decay: o.weight_decay, ..Default::default() };
                let cfg = o.qft.config(lion, fo, o.compute.of(self, o.zo.lora), ctx)?;
                if !dev.is_cpu() {
                    o.compute.check_gpu()?;
                    return gpu_qft(source, cfg, ctx.on_nan, dev);
                }
                Box::new(qft::Qft::new(source, cfg, ctx.on_nan)?)
            }
            MethodKind::Mezo if o.zo.lora => {
                let dirs = zo_lora::Directions::Gaussian;
                Box::new(zo_lora::ZoLora::new("mezo-lora", source.params_on(dev)?, lc, zo()?, dirs)?)
            }
            MethodKind::Quzo if o.zo.lora => {
                let compute = o.compute.of(self, o.zo.lora);
                let dirs = zo_lora::Directions::Quantized { bits: o.quzo.perturb_bits, estimator: o.quzo.estimator };
                if !dev.is_cpu() {
                    o.compute.check_gpu()?;
                    let base = gpu_base(source, &mut quzo::int_quantizer(o.bits.bits)?, dev)?;
                    return Ok(Box::new(zo_lora::ZoLora::new("quzo-lora", base, lc, zo()?, dirs)?));
                }
                let mut base = quzo::quantize_int(source, o.bits.bits)?;
                base.compute = compute;
                Box::new(zo_lora::ZoLora::new("quzo-lora", base, lc, zo()?, dirs)?)
            }
            MethodKind::Mezo => Box::new(mezo::Mezo::new(source.params_on(dev)?, zo()?)),
            MethodKind::Quzo if !dev.is_cpu() => {
                o.compute.check_gpu()?;
                gpu_quzo(source, o, zo()?, dev)?
            }
            MethodKind::Quzo => {
                Box::new(quzo::Quzo::new(source, o.bits.bits, &o.quzo, o.compute.of(self, o.zo.lora), zo()?)?)
            }
            MethodKind::Qst => Box::new(qst::Qst::new(source, o.qst.config(fo.keep(), ctx.seed), update(), dev)?),
            MethodKind::Lora => Box::new(lora::Lora::new("lora", source.params_on(dev)?, lc, update(), fo.keep())?),
            MethodKind::Qlora => {
                lc.validate()?;
                if !dev.is_cpu() {
                    let base = gpu_base(source, &mut lora::nf4_quantizer, dev)?;
                    return Ok(Box::new(lora::Lora::new("qlora", base, lc, update(), fo.keep())?));
                }
                Box::new(lora::Lora::new("qlora", lora::nf4_base(source)?, lc, update(), fo.keep())?)
            }
        })
    }
}

/// QFT with its state on the GPU `dev`.
#[cfg(feature = "cuda")]
fn gpu_qft(
    source: Source,
    cfg: qft::QftConfig,
    on_nan: crate::train::OnNonFinite,
    dev: &candle_core::Device,
) -> Result<Box<dyn Method>> {
    Ok(Box::new(qft_gpu::QftGpu::new(source, cfg, on_nan, dev)?))
}

#[cfg(not(feature = "cuda"))]
fn gpu_qft(
    _: Source,
    _: qft::QftConfig,
    _: crate::train::OnNonFinite,
    dev: &candle_core::Device,
) -> Result<Box<dyn Method>> {
    Err(crate::device::no_cuda(dev))
}

/// Full-parameter QuZO with its state on the GPU `dev`.
#[cfg(feature = "cuda")]
fn gpu_quzo(source: Source, o: &MethodOptions, zo: ZoLoop, dev: &candle_core::Device) -> Result<Box<dyn Method>> {
    Ok(Box::new(quzo_gpu::QuzoGpu::new(source, o.bits.bits, &o.quzo, zo, dev)?))
}

#[cfg(not(feature = "cuda"))]
fn gpu_quzo(_: Source, _: &MethodOptions, _: ZoLoop, dev: &candle_core::Device) -> Result<Box<dyn Method>> {
    Err(crate::device::no_cuda(dev))
}

/// A quantized base on the GPU `dev`: each matrix quantized on the host by `quantize` as it is read, and moved.
#[cfg(feature = "cuda")]
pub fn gpu_base<W: crate::model::quantized_gpu::ToGpu>(
    source: Source,
    quantize: &mut crate::model::quantized::Quantize<W>,
    dev: &candle_core::Device,
) -> Result<crate::model::quantized_gpu::GpuStore> {
    crate::model::quantized_gpu::GpuStore::load(source, quantize, dev)
}

/// Without CUDA no GPU device can be opened, so this is never reached; it says so if it is.
#[cfg(not(feature = "cuda"))]
pub fn gpu_base<W>(
    _: Source,
    _: &mut crate::model::quantized::Quantize<W>,
    dev: &candle_core::Device,
) -> Result<crate::model::quantized::QuantStore<qtune_quant::IntTensor>> {
    Err(crate::device::no_cuda(dev))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::tests::{batch, tiny_config};
    use crate::model::{Llama, ParamId, ParamStore};
    use candle_core::DType;

    /// Options small enough for the tiny model.
    pub(crate) fn tiny_options() -> MethodOptions {
        let mut o = MethodOptions::default();
        o.qst.side_r = 2;
        o.qst.adapter_rank = 4;
        o.lora.lora_r = 2;
        o.qft.outlier_fraction = 0.05;
        o
    }

    /// A NaN loss in any method: `skip` applies no update (the exported weights are untouched), `stop` ends with a
    /// numerical error. The NaN enters through the final norm, which every method keeps in f32. (QST exports no
    /// base matrix; its skipped step is checked by `applied` alone.)
    #[test]
    fn every_method_skips_or_stops_on_a_non_finite_loss() {
        let cfg = tiny_config(true);
        let model = Llama::new(cfg.clone());
        let mut p = ParamStore::random(&cfg, 3, 0.3, DType::F32).unwrap();
        p.set(ParamId::FinalNorm, (p.get(ParamId::FinalNorm) * f64::NAN).unwrap());
        let variants =
            MethodKind::ALL.iter().map(|&k| (k, false)).chain([(MethodKind::Mezo, true), (MethodKind::Quzo, true)]);
        for (kind, lora) in variants {
            let mut o = tiny_options();
            o.zo.lora = lora;
            let name = kind.run_name(&o);
            let ctx = |on_nan| RunContext::cpu(0, on_nan, 1);
            let mut m = kind.build(&o, Source::Params(p.clone()), &ctx(OnNonFinite::Skip)).unwrap();
            let q = ParamId::Block(0, crate::model::BlockParam::Q);
            let before = m.export_tensor(q).ok();
            let s = m.step(&model, &[batch(true)], 1e-2).unwrap();
            assert!(!s.applied && !s.loss.is_finite(), "{name}: a NaN step was applied");
            if let Some(before) = before {
                let d = (m.export_tensor(q).unwrap() - before).unwrap().abs().unwrap().max_all().unwrap();
                assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{name}: weights changed on a skipped step");
            }
            let mut m = kind.build(&o, Source::Params(p.clone()), &ctx(OnNonFinite::Stop)).unwrap();
            assert!(matches!(m.step(&model, &[batch(true)], 1e-2), Err(Error::Numerical(_))), "{name}: did not stop");
        }
    }

    /// Every method trains every family: Qwen2's q/k/v biases (trained by the full-parameter methods, exported by
    /// all), Mistral's sliding window and LLaMA-3's RoPE scaling. Each step is finite and applied.
    #[test]
    fn every_method_steps_on_every_family() {
        use crate::model::{rope::RopeScaling, Arch, BlockParam};
        let mut qwen2 = tiny_config(true);
        (qwen2.arch, qwen2.attention_bias) = (Arch::Qwen2, true);
        let mut mistral = tiny_config(false);
        (mistral.arch, mistral.sliding_window) = (Arch::Mistral, Some(3));
        let mut llama3 = tiny_config(false);
        llama3.rope_scaling = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16,
        });
        for cfg in [qwen2, mistral, llama3] {
            let model = Llama::new(cfg.clone());
            let p = ParamStore::random(&cfg, 3, 0.3, DType::F32).unwrap();
            let variants = MethodKind::ALL.iter().map(|&k| (k, false)).chain([(MethodKind::Quzo, true)]);
            for (kind, lora) in variants {
                let mut o = tiny_options();
                o.zo.lora = lora;
                let name = kind.run_name(&o);
                let ctx = RunContext::cpu(0, OnNonFinite::Stop, 1);
                let mut m = kind.build(&o, Source::Params(p.clone()), &ctx).unwrap();
                let bias = ParamId::Block(0, BlockParam::QBias);
                let before = if cfg.attention_bias { m.export_tensor(bias).ok() } else { None };
                let s = m.step(&model, &[batch(true)], 1e-2).unwrap();
                assert!(s.applied && s.loss.is_finite(), "{name} on {:?}: step not applied", cfg.arch);
                if cfg.attention_bias && matches!(kind, MethodKind::FullAdamw | MethodKind::Qft | MethodKind::Mezo) {
                    let d = (m.export_tensor(bias).unwrap() - before.unwrap()).unwrap().abs().unwrap();
                    let d = d.max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(d > 0.0, "{name}: the q bias did not train");
                }
            }
        }
    }

    /// The run names reports use, and the refusal of an option the method would not read.
    #[test]
    fn options_a_method_does_not_read_are_refused() {
        use clap::{CommandFactory, Parser};
        #[derive(Parser)]
        struct Cli {
            #[arg(long, value_enum)]
            method: MethodKind,
            #[command(flatten)]
            o: MethodOptions,
        }
        let check = |args: &[&str]| {
            let m = Cli::command().get_matches_from(std::iter::once("x").chain(args.iter().copied()));
            let cli = Cli::from_arg_matches_mut(&mut m.clone()).unwrap();
            check_given(cli.method, cli.o.zo.lora, &m).map(|_| cli.method.run_name(&cli.o))
        };
        use clap::FromArgMatches;
        assert_eq!(check(&["--method", "lora", "--lora-r", "4", "--clip", "1"]).unwrap(), "lora");
        assert_eq!(check(&["--method", "mezo", "--lora", "--lora-r", "4"]).unwrap(), "mezo-lora");
        let e = check(&["--method", "lora", "--side-r", "4"]).unwrap_err().to_string();
        assert!(e.contains("--side-r is not read by --method lora (only by qst)"), "{e}");
        let e = check(&["--method", "mezo", "--lora-r", "4"]).unwrap_err().to_string();
        assert!(
            e.contains("--lora-r is not read by --method mezo (only by mezo --lora, quzo --lora, lora, qlora)"),
            "{e}"
        );
        let e = check(&["--method", "mezo", "--recompute"]).unwrap_err().to_string();
        assert!(e.contains("--recompute is not read by --method mezo"), "{e}");
        let e = check(&["--method", "full-lion", "--eps", "1e-3"]).unwrap_err().to_string();
        assert!(
            e.contains("--eps is not read by --method full-lion (only by mezo, mezo --lora, quzo, quzo --lora)"),
            "{e}"
        );
    }
}

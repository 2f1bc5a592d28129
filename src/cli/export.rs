//! `qtune export`: converts a model, or a finished run's model, to an HF checkpoint (f32/bf16/f16, sharded) or a
//! GGUF file, reading and writing one tensor at a time. (A run's PEFT adapter is written by `train --export peft`,
//! while the method's factors are at hand.)
use clap::Args;
use qtune::model::export::{write_hf, ExportArgs, Format};
use qtune::model::gguf_export::write_gguf;
use qtune::model::reader::ModelReader;
use qtune::{Error, Result};
use std::path::PathBuf;

#[derive(Args)]
pub struct ExportCmd {
    /// An HF model directory, a GGUF file, or a run directory (its `model/` is converted).
    pub source: PathBuf,
    /// hf or gguf.
    #[arg(long, value_enum, default_value_t = Format::Hf)]
    pub format: Format,
    /// Where to write: a directory (hf) or a file (gguf).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub opts: ExportArgs,
}

pub fn run(a: ExportCmd) -> Result<()> {
    let run_model = a.source.join("model");
    let src = if a.source.join("summary.json").exists() && run_model.join("config.json").exists() {
        run_model
    } else {
        a.source.clone()
    };
    let r = ModelReader::open(&src)?;
    let (cfg, tok) = (&r.header.cfg, r.header.tokenizer.as_ref());
    match a.format {
        Format::Hf => write_hf(cfg, &|id| r.tensor(id), tok, &a.out, &a.opts)?,
        Format::Gguf => write_gguf(cfg, &|id| r.tensor(id), tok, &a.out, a.opts.gguf_type)?,
        Format::Peft => {
            return Err(Error::Option(
                "export --format peft: write an adapter while training (`train --method lora --export peft`); a \
                 model file holds no LoRA factors"
                    .into(),
            ))
        }
    }
    eprintln!("wrote {} ({:?} of {})", a.out.display(), a.format, src.display());
    Ok(())
}

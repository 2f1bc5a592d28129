//! `qtune export`: converts a model, or a finished run's model, to an HF checkpoint (f32/bf16/f16, sharded) or a
//! GGUF file, reading and writing one tensor at a time; or copies a LoRA run's PEFT adapter (written by `train`
//! while the method's factors are at hand).
use clap::Args;
use qtune::model::export::{write_hf, ExportArgs, Format};
use qtune::model::gguf_export::write_gguf;
use qtune::model::reader::ModelReader;
use qtune::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct ExportCmd {
    /// An HF model directory, a GGUF file, or a run directory (its `model/` is converted).
    pub source: PathBuf,
    /// hf, gguf, or peft (a LoRA run's adapter).
    #[arg(long, value_enum, default_value_t = Format::Hf)]
    pub format: Format,
    /// Where to write: a directory (hf) or a file (gguf).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub opts: ExportArgs,
}

/// A run's PEFT adapter (`<run>/adapter`, which LoRA-trained runs write) copied to `out`.
fn copy_adapter(run: &Path, out: &Path) -> Result<()> {
    let dir = run.join("adapter");
    if !dir.join("adapter_config.json").exists() {
        return Err(Error::file(
            run,
            "export --format peft: no adapter/ here (a LoRA run writes one: lora, qlora, mezo/quzo --lora); a model \
             file holds no LoRA factors",
        ));
    }
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let bytes = std::fs::read(dir.join(f)).map_err(|e| Error::file(dir.join(f), format!("cannot read: {e}")))?;
        qtune::io::write_bytes_atomic(&out.join(f), &bytes)?;
    }
    Ok(())
}

/// Refuses an output that would overwrite what the export reads: the source itself, or a file of the source folder
/// that a model is read from.
fn check_not_source(src: &Path, out: &Path) -> Result<()> {
    let read_from_src = |name: &str| {
        matches!(name, "config.json" | "tokenizer.json" | "tokenizer_config.json")
            || name.ends_with(".safetensors")
            || name.ends_with(".safetensors.index.json")
    };
    let in_src = src.is_dir()
        && out.parent().is_some_and(|d| qtune::io::same_path(d, src))
        && out.is_file()
        && out.file_name().is_some_and(|n| read_from_src(&n.to_string_lossy()));
    if qtune::io::same_path(src, out) || in_src {
        return Err(Error::file(out, format!("is what the export reads ({}); write it elsewhere", src.display())));
    }
    Ok(())
}

pub fn run(a: ExportCmd) -> Result<()> {
    if a.format == Format::Peft {
        copy_adapter(&a.source, &a.out)?;
        eprintln!("wrote {} (the adapter of {})", a.out.display(), a.source.display());
        return Ok(());
    }
    let run_model = a.source.join("model");
    let src = if a.source.join("summary.json").exists() && run_model.join("config.json").exists() {
        run_model
    } else {
        a.source.clone()
    };
    check_not_source(&src, &a.out)?;
    let r = ModelReader::open(&src)?;
    let (cfg, tok) = (&r.header.cfg, r.header.tokenizer.as_ref());
    match a.format {
        Format::Hf => write_hf(cfg, &|id| r.tensor(id), tok, &a.out, &a.opts)?,
        Format::Gguf => write_gguf(cfg, &|id| r.tensor(id), tok, &a.out, a.opts.gguf_type)?,
        Format::Peft => unreachable!("the adapter was copied above"),
    }
    eprintln!("wrote {} ({:?} of {})", a.out.display(), a.format, src.display());
    Ok(())
}

//! Exports, each streamed tensor by tensor (the caller's `dense` makes one dense f32 tensor at a time, dequantized or
//! merged as its method needs, and it is converted and written before the next, so no whole f32 model is built):
//! - an HF checkpoint `transformers` loads: f32, bf16 or f16, split into shards with an index above a size, with
//!   `config.json`, `generation_config.json` and the tokenizer files;
//! - a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) that `peft` loads onto the base;
//! - a GGUF file llama.cpp reads ([`super::gguf_export`]).
//!
//! Every file is written atomically: a failure (a NaN, a full disk, an interrupt) leaves no partial file.
use super::config::LlamaConfig;
use super::params::{BlockParam, ParamId, ParamStore};
use super::tokenizer::Tok;
use crate::io::{write_atomic, write_bytes_atomic};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What `train --export` and `qtune export` write.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// An HF checkpoint directory (`model/`).
    Hf,
    /// A PEFT LoRA adapter directory (`adapter/`): LoRA methods only.
    Peft,
    /// One GGUF file (`model.gguf`).
    Gguf,
}

/// The tensor type of an HF export.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfDtype {
    F32,
    Bf16,
    F16,
}

impl HfDtype {
    fn dtype(self) -> DType {
        match self {
            HfDtype::F32 => DType::F32,
            HfDtype::Bf16 => DType::BF16,
            HfDtype::F16 => DType::F16,
        }
    }
    /// The safetensors name and transformers' `torch_dtype`.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            HfDtype::F32 => ("F32", "float32"),
            HfDtype::Bf16 => ("BF16", "bfloat16"),
            HfDtype::F16 => ("F16", "float16"),
        }
    }
}

/// The tensor type of a GGUF export's matrices (norm weights and biases stay f32, as llama.cpp keeps them).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufType {
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4K,
}

/// How exports are written (read by `train` and `export`).
#[derive(clap::Args, Clone, Debug, PartialEq)]
#[command(next_help_heading = "Export")]
pub struct ExportArgs {
    /// Tensor type of an HF export.
    #[arg(long, value_enum, default_value_t = HfDtype::F32)]
    pub export_dtype: HfDtype,
    /// Largest HF shard, in bytes with an optional KB/MB/GB suffix (transformers' `max_shard_size`); a model over it
    /// is split into `model-0000i-of-0000n.safetensors` with an index.
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub shard_size: u64,
    /// Tensor type of a GGUF export's matrices (a matrix whose rows do not fill the type's blocks falls back to f16,
    /// as llama.cpp's quantizer does).
    #[arg(long, value_enum, default_value_t = GgufType::Q8_0)]
    pub gguf_type: GgufType,
}
crate::options::defaults_from_clap!(ExportArgs);

/// "5GB", "200MB", "1024": decimal units as transformers reads them.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = [("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1.0)]
        .iter()
        .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.trim().to_string(), *m)))
        .unwrap_or((t.clone(), 1.0));
    let v: f64 = num.parse().map_err(|_| format!("`{s}` is not a size (e.g. 5GB, 200MB)"))?;
    if !(v.is_finite() && v * mult >= 1.0) {
        return Err(format!("`{s}`: a shard size must be at least 1 byte"));
    }
    Ok((v * mult) as u64)
}

/// An f32 model written as `transformers` expects, with the default options.
pub fn export_hf(params: &ParamStore, tokenizer: Option<&Tok>, dir: &Path) -> Result<()> {
    write_hf(&params.cfg, &|id| Ok(params.get(id).clone()), tokenizer, dir, &ExportArgs::default())
}

/// The shards of an HF export: consecutive runs of parameters (forward order), each at most `max` bytes unless one
/// tensor alone is bigger (as transformers splits).
fn plan_shards(cfg: &LlamaConfig, bytes_per: usize, max: u64) -> Vec<Vec<ParamId>> {
    let mut shards: Vec<Vec<ParamId>> = vec![vec![]];
    let mut size = 0u64;
    for id in ParamId::all(cfg) {
        let b = (id.numel(cfg) * bytes_per) as u64;
        if size + b > max && !shards.last().expect("one shard").is_empty() {
            shards.push(vec![]);
            size = 0;
        }
        size += b;
        shards.last_mut().expect("one shard").push(id);
    }
    shards
}

/// One safetensors file of `ids`, each made by `dense`, checked (shape, finiteness), converted to `dtype` and
/// written before the next. `name` gives each tensor's name.
pub fn write_safetensors(
    path: &Path,
    items: &[(String, Vec<usize>)],
    dtype: HfDtype,
    make: &mut dyn FnMut(usize) -> Result<Tensor>,
) -> Result<()> {
    let (st_name, _) = dtype.names();
    let elem = dtype.dtype().size_in_bytes();
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, shape) in items {
        let len = elem * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": st_name, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut head = serde_json::to_vec(&header).map_err(|e| Error::Msg(e.to_string()))?;
    // The data starts 8-byte aligned (the format pads the header with spaces).
    head.resize(head.len().next_multiple_of(8), b' ');
    write_atomic(path, |f| {
        let mut w = std::io::BufWriter::new(f);
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        for (i, (name, shape)) in items.iter().enumerate() {
            let t = make(i)?;
            if t.dims() != shape.as_slice() {
                return Err(Error::Msg(format!("export: `{name}` has shape {:?}, not {shape:?}", t.dims())));
            }
            // Checked in the written type: an f16 export of a weight beyond ±65504 would be infinite.
            let t = t.to_dtype(dtype.dtype())?;
            check_finite(&t)
                .map_err(|_| Error::Numerical(format!("export: `{name}` is not finite in {}", dtype.names().0)))?;
            write_tensor_bytes(&mut w, &t.flatten_all()?, dtype)?;
        }
        w.flush()?;
        Ok(())
    })
}

/// The little-endian bytes of a 1-D tensor in `dtype`, in chunks.
fn write_tensor_bytes(w: &mut impl Write, t: &Tensor, dtype: HfDtype) -> Result<()> {
    let t = t.to_dtype(dtype.dtype())?;
    let n = t.elem_count();
    for start in (0..n).step_by(1 << 16) {
        let c = t.narrow(0, start, (1 << 16).min(n - start))?;
        let bytes: Vec<u8> = match dtype {
            HfDtype::F32 => c.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
            HfDtype::Bf16 => c.to_vec1::<half::bf16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
            HfDtype::F16 => c.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        w.write_all(&bytes)?;
    }
    Ok(())
}

/// Writes an HF checkpoint whose tensors `dense` produces one at a time (module docs). The config goes first: a
/// setting with no config.json form stops the export before anything is written. Shard files of an earlier export
/// into the same directory that this one does not use are removed, so the directory holds one model.
pub fn write_hf(
    cfg: &LlamaConfig,
    dense: &dyn Fn(ParamId) -> Result<Tensor>,
    tokenizer: Option<&Tok>,
    dir: &Path,
    opts: &ExportArgs,
) -> Result<()> {
    let mut cfg_json = cfg.to_hf_json().map_err(|m| Error::file(dir, m))?;
    cfg_json["torch_dtype"] = opts.export_dtype.names().1.into();
    let elem = opts.export_dtype.dtype().size_in_bytes();
    let shards = plan_shards(cfg, elem, opts.shard_size);
    let n = shards.len();
    let file_of = |i: usize| if n == 1 { "model.safetensors".to_string() } else { shard_name(i, n) };
    // An index of an earlier export goes first: were this export to fail between shards, the directory would hold
    // no index rather than one naming a mix of old and new shards.
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        std::fs::remove_file(&index).map_err(|e| Error::file(&index, format!("cannot remove: {e}")))?;
    }
    let mut weight_map = serde_json::Map::new();
    for (i, ids) in shards.iter().enumerate() {
        let items: Vec<(String, Vec<usize>)> = ids.iter().map(|id| (id.hf_name(), id.shape(cfg))).collect();
        write_safetensors(&dir.join(file_of(i)), &items, opts.export_dtype, &mut |k| dense(ids[k]))?;
        for id in ids {
            weight_map.insert(id.hf_name(), file_of(i).into());
        }
    }
    if n > 1 {
        let total: usize = ParamId::all(cfg).iter().map(|id| id.numel(cfg) * elem).sum();
        let j = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&index, &j)?;
    }
    remove_stale_shards(dir, &(0..n).map(file_of).collect::<Vec<_>>(), n > 1)?;
    write_json(&dir.join("config.json"), &cfg_json)?;
    let mut gen = serde_json::json!({"_from_model_config": true});
    if let Some(b) = cfg.bos_token_id {
        gen["bos_token_id"] = b.into();
    }
    if let Some(e) = tokenizer.and_then(|t| t.specials.eos).or(cfg.eos_token_id) {
        gen["eos_token_id"] = e.into();
    }
    write_json(&dir.join("generation_config.json"), &gen)?;
    if let Some(tok) = tokenizer {
        let json = tok.to_json()?;
        write_atomic(&dir.join("tokenizer.json"), |f| Ok(f.write_all(json.as_bytes())?))?;
        write_json(&dir.join("tokenizer_config.json"), &tok.config_json())?;
    }
    Ok(())
}

fn shard_name(i: usize, n: usize) -> String {
    format!("model-{:05}-of-{n:05}.safetensors", i + 1)
}

/// Whether `name` is a file an HF export writes its weights to: `model.safetensors` or a
/// `model-NNNNN-of-NNNNN.safetensors` shard.
fn is_weight_file(name: &str) -> bool {
    let shard = name.strip_prefix("model-").and_then(|r| r.strip_suffix(".safetensors")).is_some_and(|r| {
        r.len() == 14
            && r.as_bytes()[5..9] == *b"-of-"
            && r[..5].bytes().chain(r[9..].bytes()).all(|b| b.is_ascii_digit())
    });
    shard || name == "model.safetensors"
}

/// Removes weight files ([`is_weight_file`]) the export just written does not name; nothing else in the directory.
fn remove_stale_shards(dir: &Path, keep: &[String], keep_index: bool) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| Error::file(dir, format!("cannot list: {e}")))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let shard = is_weight_file(&name) && !keep.contains(&name);
        let index = name == "model.safetensors.index.json" && !keep_index;
        if shard || index {
            std::fs::remove_file(e.path()).map_err(|err| Error::file(e.path(), format!("cannot remove: {err}")))?;
        }
    }
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    write_bytes_atomic(path, &serde_json::to_vec_pretty(v).map_err(|e| Error::Msg(e.to_string()))?)
}

/// Refuses to write NaN or infinite weights anywhere.
pub fn check_finite(t: &Tensor) -> Result<()> {
    let s = t.to_dtype(DType::F32)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    if !s.is_finite() {
        return Err(Error::Numerical("a tensor holds NaN or infinite values; refusing to write it".into()));
    }
    Ok(())
}

/// What a PEFT export reads from a LoRA method: its rank, alpha, adapted projections and factors.
pub trait Adapter {
    fn rank(&self) -> usize;
    fn alpha(&self) -> f64;
    /// The adapted projections of each block.
    fn targets(&self) -> &[BlockParam];
    /// A [r, in] and B [out, r] of projection `id` as f32 (the update is (alpha / r)·B·A).
    fn factors(&self, id: ParamId) -> Result<(Tensor, Tensor)>;
}

/// PEFT's module name of a projection.
fn peft_module(p: BlockParam) -> &'static str {
    match p {
        BlockParam::Q => "q_proj",
        BlockParam::K => "k_proj",
        BlockParam::V => "v_proj",
        BlockParam::O => "o_proj",
        BlockParam::Gate => "gate_proj",
        BlockParam::Up => "up_proj",
        BlockParam::Down => "down_proj",
        _ => unreachable!("LoRA adapts projections only"),
    }
}

/// Writes `dir/{adapter_config.json, adapter_model.safetensors}` as PEFT's `save_pretrained` does for a LoRA on
/// a causal LM: `peft.PeftModel.from_pretrained(base, dir)` then computes what this method computed on an f32 base.
/// `base_model` is recorded as `base_model_name_or_path`.
pub fn write_peft(cfg: &LlamaConfig, adapter: &dyn Adapter, base_model: &str, dir: &Path) -> Result<()> {
    let mut items = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        for &p in adapter.targets() {
            let id = ParamId::Block(l, p);
            let (out, inp) = (id.shape(cfg)[0], id.shape(cfg)[1]);
            let module = id.hf_name().trim_end_matches(".weight").to_string();
            items.push((format!("base_model.model.{module}.lora_A.weight"), vec![adapter.rank(), inp], id, true));
            items.push((format!("base_model.model.{module}.lora_B.weight"), vec![out, adapter.rank()], id, false));
        }
    }
    let names: Vec<(String, Vec<usize>)> = items.iter().map(|(n, s, _, _)| (n.clone(), s.clone())).collect();
    write_safetensors(&dir.join("adapter_model.safetensors"), &names, HfDtype::F32, &mut |k| {
        let (_, _, id, is_a) = &items[k];
        let (a, b) = adapter.factors(*id)?;
        Ok(if *is_a { a } else { b })
    })?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": adapter.rank(),
        "lora_alpha": adapter.alpha(),
        "lora_dropout": 0.0,
        "target_modules": adapter.targets().iter().map(|&p| peft_module(p)).collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
    });
    write_json(&dir.join("adapter_config.json"), &config)
}

/// The paths an export of `formats` writes under a run directory `out`.
pub fn export_paths(out: &Path, format: Format) -> PathBuf {
    match format {
        Format::Hf => out.join("model"),
        Format::Peft => out.join("adapter"),
        Format::Gguf => out.join("model.gguf"),
    }
}

#[cfg(test)]
mod tests {
    //! Shard planning and sizes, the bf16/f16 exports read back within their rounding (bf16: 2^-8 relative, f16:
    //! 2^-11), and a sharded export loading as the same model.
    use super::*;
    use crate::model::llama::tests::tiny_config;
    use crate::model::load::load_model;

    #[test]
    fn only_weight_files_count_as_stale_and_f16_overflow_is_refused() {
        assert!(is_weight_file("model.safetensors") && is_weight_file("model-00002-of-00003.safetensors"));
        assert!(!is_weight_file("model_old.safetensors") && !is_weight_file("model-2-of-3.safetensors"));
        let cfg = tiny_config(true);
        let mut p = ParamStore::random(&cfg, 4, 0.3, DType::F32).unwrap();
        p.set(ParamId::FinalNorm, (p.get(ParamId::FinalNorm) * 1e6).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let f16 = ExportArgs { export_dtype: HfDtype::F16, ..Default::default() };
        let e = write_hf(&cfg, &|id| Ok(p.get(id).clone()), None, dir.path(), &f16).unwrap_err();
        assert!(e.to_string().contains("model.norm.weight") && e.to_string().contains("F16"), "{e}");
        assert!(!dir.path().join("model.safetensors").exists());
    }

    #[test]
    fn sizes_parse_as_transformers_reads_them() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("200mb").unwrap(), 200_000_000);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("five").is_err() && parse_size("0").is_err());
    }

    #[test]
    fn sharded_half_precision_exports_load_as_the_same_model() {
        let cfg = tiny_config(false);
        let p = ParamStore::random(&cfg, 4, 0.3, DType::F32).unwrap();
        for (dtype, budget) in [(HfDtype::F32, 0.0), (HfDtype::Bf16, 1.0 / 256.0), (HfDtype::F16, 1.0 / 2048.0)] {
            let dir = tempfile::tempdir().unwrap();
            // Small shards: every block's tensors spread over several files.
            let opts = ExportArgs { export_dtype: dtype, shard_size: 2000, ..Default::default() };
            write_hf(&cfg, &|id| Ok(p.get(id).clone()), None, dir.path(), &opts).unwrap();
            let files = std::fs::read_dir(dir.path()).unwrap().count();
            assert!(dir.path().join("model.safetensors.index.json").exists() && files > 5, "{dtype:?}: {files} files");
            let back = load_model(dir.path()).unwrap().params;
            for id in ParamId::all(&cfg) {
                let (a, b) = (p.get(id), back.get(id));
                let err = ((a - b).unwrap().abs().unwrap() / (a.abs().unwrap() + 1e-30).unwrap()).unwrap();
                let err = err.max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
                assert!(err <= budget, "{dtype:?} {id:?}: relative error {err:e} over {budget:e}");
            }
            // Exporting again unsharded leaves one file and no index.
            write_hf(&cfg, &|id| Ok(p.get(id).clone()), None, dir.path(), &ExportArgs::default()).unwrap();
            assert!(!dir.path().join("model.safetensors.index.json").exists());
            let names: Vec<String> =
                std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            assert!(!names.iter().any(|n| n.starts_with("model-")), "stale shards left: {names:?}");
        }
    }
}

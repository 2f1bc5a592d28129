//! Model loading and export: a Hugging Face directory (config.json, *.safetensors in f32/f16/bf16, tokenizer.json)
//! or a GGUF file (tensors dequantized to f32, Q/K rows un-permuted back to HF's rotate-half layout, config and
//! tokenizer from the metadata). Export writes an HF directory `transformers` loads unchanged.
use super::config::{Arch, LlamaConfig};
use super::params::{BlockParam, ParamId, ParamStore};
use super::rope::RopeScaling;
use super::tokenizer::Tok;
use crate::{Error, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A model as loaded: f32 parameters on the CPU, plus its tokenizer when the source carries one.
pub struct LoadedModel {
    pub params: ParamStore,
    pub tokenizer: Option<Tok>,
    pub source: PathBuf,
}

/// A model's config and tokenizer, read before (or without) its tensors.
pub struct ModelHeader {
    pub cfg: LlamaConfig,
    pub tokenizer: Option<Tok>,
}

/// Loads a model from an HF directory or a `.gguf` file as dense f32 parameters.
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    let mut map = HashMap::new();
    let header = stream_model(path, &mut |id, t| {
        map.insert(id, t);
        Ok(())
    })?;
    let params = ParamStore::from_map(header.cfg, map, path)?;
    Ok(LoadedModel { params, tokenizer: header.tokenizer, source: path.to_path_buf() })
}

/// Reads a model tensor by tensor: each parameter is converted to f32, checked against the config's shape and
/// handed to `take` before the next one is read, so a caller that quantizes as it goes never holds more than one
/// f32 tensor. Every parameter of the config arrives exactly once, or this returns an error naming the file.
pub fn stream_model(path: &Path, take: &mut dyn FnMut(ParamId, Tensor) -> Result<()>) -> Result<ModelHeader> {
    if !path.exists() {
        return Err(Error::file(path, "model not found (expected an HF directory or a .gguf file)"));
    }
    let mut seen = std::collections::HashSet::new();
    let mut cfg_out = None;
    let mut check = |cfg: &LlamaConfig, id: ParamId, t: Tensor, file: &Path| -> Result<()> {
        let want = id.shape(cfg);
        if t.dims() != want.as_slice() {
            return Err(Error::file(
                file,
                format!("tensor `{}` has shape {:?}, the config implies {:?}", id.hf_name(), t.dims(), want),
            ));
        }
        if !seen.insert(id) {
            return Err(Error::file(file, format!("tensor `{}` appears more than once", id.hf_name())));
        }
        // A NaN or infinity in the weights would only show as a NaN loss or garbage text much later.
        if let Some(bad) = with_f32_slice(&t, first_non_finite)? {
            return Err(Error::file(
                file,
                format!("tensor `{}` holds a non-finite value at element {bad}: the file is corrupt", id.hf_name()),
            ));
        }
        cfg_out.get_or_insert_with(|| cfg.clone());
        take(id, t)
    };
    let header = if path.is_dir() { stream_hf_dir(path, &mut check)? } else { stream_gguf(path, &mut check)? };
    if let Some(id) = ParamId::all(&header.cfg).into_iter().find(|id| !seen.contains(id)) {
        return Err(Error::file(path, format!("missing tensor `{}`", id.hf_name())));
    }
    Ok(header)
}

/// A model's config and tokenizer, without reading its tensors.
pub fn read_header(path: &Path) -> Result<ModelHeader> {
    if !path.exists() {
        return Err(Error::file(path, "model not found (expected an HF directory or a .gguf file)"));
    }
    if path.is_dir() {
        let cfg = LlamaConfig::from_hf_file(&path.join("config.json"))?;
        let tok_path = path.join("tokenizer.json");
        let mut tokenizer = if tok_path.exists() { Some(Tok::from_file(&tok_path)?) } else { None };
        // Special tokens the tokenizer files do not name come from the model's config, as transformers takes them.
        if let Some(t) = tokenizer.as_mut() {
            t.specials.bos = t.specials.bos.or(cfg.bos_token_id);
            t.specials.eos = t.specials.eos.or(cfg.eos_token_id);
            check_tokenizer(&cfg, t, &tok_path)?;
        }
        Ok(ModelHeader { cfg, tokenizer })
    } else {
        Ok(gguf_open(path)?.2)
    }
}

/// Runs `f` on the elements of an f32 tensor in row-major order, in place where the tensor is a contiguous CPU
/// tensor: the quantizers read the matrix being loaded without a second f32 copy of it (at LLaMA-2-7B with a
/// 49152-token vocabulary that copy was 0.75 GiB of the load's peak).
pub fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    if let candle_core::Storage::Cpu(cpu) = &*storage {
        let all = cpu.as_slice::<f32>()?;
        let start = layout.start_offset();
        return Ok(f(&all[start..start + t.elem_count()]));
    }
    drop(storage);
    Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
}

/// A tokenizer whose ids reach past the model's embedding rows would fail at the first such token with a bare
/// index error, or its special tokens would: refused when the model is opened, naming the file.
fn check_tokenizer(cfg: &LlamaConfig, tok: &Tok, file: &Path) -> Result<()> {
    if let Some(id) = tok.max_id().filter(|&id| id as usize >= cfg.vocab_size) {
        return Err(Error::file(
            file,
            format!("the tokenizer's ids reach {id}, past the model's vocab_size of {}", cfg.vocab_size),
        ));
    }
    for (name, id) in [("BOS", tok.specials.bos), ("EOS", tok.specials.eos)] {
        if let Some(id) = id.filter(|&id| id as usize >= cfg.vocab_size) {
            return Err(Error::file(
                file,
                format!("the {name} token ({id}) is outside the model's vocab_size of {}", cfg.vocab_size),
            ));
        }
    }
    Ok(())
}

/// The index of the first NaN or infinity in `v`: whole blocks are tested with an OR that vectorizes (an early-exit
/// search does not), so a 7B model's load pays little for it.
fn first_non_finite(v: &[f32]) -> Option<usize> {
    const BLOCK: usize = 4096;
    v.chunks(BLOCK).enumerate().find_map(|(i, c)| {
        if c.iter().fold(false, |bad, x| bad | !x.is_finite()) {
            c.iter().position(|x| !x.is_finite()).map(|j| i * BLOCK + j)
        } else {
            None
        }
    })
}

type Check<'a> = dyn FnMut(&LlamaConfig, ParamId, Tensor, &Path) -> Result<()> + 'a;

/// The files holding a checkpoint's weights, as transformers finds them: the shards `model.safetensors.index.json`
/// names, or `model.safetensors` (other safetensors files in the directory, such as an adapter, are not the model).
pub(crate) fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::file(&index, format!("cannot read: {e}")))?;
        let j: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::file(&index, format!("not valid JSON: {e}")))?;
        let map = j["weight_map"].as_object().ok_or_else(|| Error::file(&index, "no `weight_map` object"))?;
        let mut files = Vec::new();
        for v in map.values() {
            let name = v.as_str().ok_or_else(|| Error::file(&index, "a `weight_map` value is not a file name"))?;
            if name.contains('/') || name.contains("..") {
                return Err(Error::file(&index, format!("shard `{name}` is outside the directory")));
            }
            files.push(dir.join(name));
        }
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if !single.exists() {
        return Err(Error::file(dir, "no model.safetensors (nor model.safetensors.index.json)"));
    }
    Ok(vec![single])
}

/// `config.json`, the weight files (memory-mapped, one tensor converted at a time) and, if present,
/// `tokenizer.json`.
fn stream_hf_dir(dir: &Path, check: &mut Check) -> Result<ModelHeader> {
    let header = read_header(dir)?;
    let cfg = &header.cfg;
    let files = weight_files(dir)?;
    let wanted: HashMap<String, ParamId> = ParamId::all(cfg).into_iter().map(|id| (id.hf_name(), id)).collect();
    for f in &files {
        let file = std::fs::File::open(f).map_err(|e| Error::file(f, format!("cannot open: {e}")))?;
        // SAFETY: the mapping is read-only and dropped before this function returns; qtune never writes to model
        // files it reads.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::file(f, format!("cannot map: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::file(f, format!("not a valid safetensors file: {e}")))?;
        for (name, view) in st.tensors() {
            let Some(&id) = wanted.get(&name) else {
                // Buffers old exports carry, and a tied model's copy of its head, are not parameters; anything else
                // would be a part of the model this config does not describe (a bias, a layer too many).
                let redundant =
                    name.ends_with("rotary_emb.inv_freq") || (cfg.tie_word_embeddings && name == "lm_head.weight");
                if redundant {
                    continue;
                }
                return Err(Error::file(
                    f,
                    format!("tensor `{name}` is not part of a {} model with this config.json", cfg.arch.model_type()),
                ));
            };
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                other => return Err(Error::file(f, format!("tensor `{name}` has unsupported dtype {other:?}"))),
            };
            let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| Error::file(f, format!("tensor `{name}`: {e}")))?;
            // The tensor is a copy now: hand the file pages read so far back to the OS, so a whole shard never
            // sits in the resident set while a model streams in (a quantizing method then holds one tensor).
            let end = view.data().as_ptr() as usize + view.data().len() - bytes.as_ptr() as usize;
            // SAFETY: the mapping is a read-only, private file mapping; dropped pages refault from the unchanged
            // file, so every slice into it still reads the same bytes.
            #[cfg(unix)]
            let _ = unsafe { bytes.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, 0, end) };
            check(cfg, id, t, f)?;
        }
    }
    Ok(header)
}

/// Loads `config.json`, every `*.safetensors` file and (if present) `tokenizer.json` from `dir`.
pub fn load_hf_dir(dir: &Path) -> Result<LoadedModel> {
    load_model(dir)
}

fn meta_usize(ct: &gguf_file::Content, key: &str, path: &Path) -> Result<usize> {
    ct.metadata
        .get(key)
        .ok_or_else(|| Error::file(path, format!("GGUF metadata lacks `{key}`")))?
        .to_u64()
        .or_else(|_| ct.metadata[key].to_u32().map(|x| x as u64))
        .map(|x| x as usize)
        .map_err(|e| Error::file(path, format!("GGUF metadata `{key}`: {e}")))
}

fn meta_f64(ct: &gguf_file::Content, key: &str) -> Option<f64> {
    ct.metadata.get(key).and_then(|v| v.to_f32().map(|x| x as f64).or_else(|_| v.to_f64()).ok())
}

/// candle 0.11.1's GGUF reader divides by `general.alignment` unchecked (found by fuzzing:
/// `fuzz/regressions/gguf/`): refuse a zero alignment before it reads the file. The key is searched in the first
/// 64 MiB (the metadata), with the u64 (GGUF v2/v3) and u32 (v1) string-length prefixes; the value is an integer of
/// the type that follows it.
fn check_gguf_alignment(reader: &mut (impl std::io::Read + std::io::Seek), path: &Path) -> Result<()> {
    const KEY: &[u8] = b"general.alignment";
    let mut head = Vec::new();
    reader.by_ref().take(64 << 20).read_to_end(&mut head)?;
    reader.seek(std::io::SeekFrom::Start(0))?;
    let prefixes = [(KEY.len() as u64).to_le_bytes().to_vec(), (KEY.len() as u32).to_le_bytes().to_vec()];
    for prefix in prefixes {
        let needle = [prefix.as_slice(), KEY].concat();
        for (i, _) in head.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle.as_slice()) {
            let rest = &head[i + needle.len()..];
            let (Some(ty), Some(v)) = (rest.get(..4), rest.get(4..8)) else { continue };
            let ty = u32::from_le_bytes(ty.try_into().expect("4 bytes"));
            // GGUF value types 0..=5: u8, i8, u16, i16, u32, i32 (little-endian, 1, 1, 2, 2, 4, 4 bytes).
            let width = match ty {
                0 | 1 => 1,
                2 | 3 => 2,
                4 | 5 => 4,
                _ => continue,
            };
            if v[..width].iter().all(|&b| b == 0) {
                return Err(Error::file(path, "GGUF metadata `general.alignment` is 0"));
            }
        }
    }
    Ok(())
}

/// Undoes llama.cpp's conversion-time permutation of Q/K rows (HF rotate-half → interleaved pairs):
/// GGUF row `h·hd + 2j + p` holds HF row `h·hd + p·hd/2 + j`.
pub fn unpermute_qk(w: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let hd = dims[0] / n_heads;
    let inp: usize = dims[1..].iter().product();
    w.reshape((n_heads, hd / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

/// Parameter `id` as read from a GGUF, in HF's layout: llama.cpp permutes Q/K (and their biases) for its `llama`
/// architecture only.
pub(crate) fn from_gguf_layout(cfg: &LlamaConfig, id: ParamId, t: Tensor) -> candle_core::Result<Tensor> {
    match id {
        ParamId::Block(_, BlockParam::Q | BlockParam::QBias) if cfg.arch != Arch::Qwen2 => {
            unpermute_qk(&t, cfg.num_attention_heads)
        }
        ParamId::Block(_, BlockParam::K | BlockParam::KBias) if cfg.arch != Arch::Qwen2 => {
            unpermute_qk(&t, cfg.num_key_value_heads)
        }
        _ => Ok(t),
    }
}

/// Loads a LLaMA-architecture GGUF file; tensors are dequantized to f32.
pub fn load_gguf(path: &Path) -> Result<LoadedModel> {
    load_model(path)
}

/// Opens a GGUF file and reads its header: config and tokenizer from the metadata.
pub(crate) fn gguf_open(path: &Path) -> Result<(gguf_file::Content, std::io::BufReader<std::fs::File>, ModelHeader)> {
    let file = std::fs::File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
    let mut reader = std::io::BufReader::new(file);
    check_gguf_alignment(&mut reader, path)?;
    let ct =
        gguf_file::Content::read(&mut reader).map_err(|e| Error::file(path, format!("not a valid GGUF file: {e}")))?;
    let name = ct.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let arch = match name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        _ => return Err(Error::file(path, format!("GGUF architecture `{name}` is not supported (llama, qwen2 are)"))),
    };
    // Metadata keys are prefixed by the architecture's name.
    let key = |k: &str| format!("{name}.{k}");
    let embd =
        ct.tensor_infos.get("token_embd.weight").ok_or_else(|| Error::file(path, "GGUF has no `token_embd.weight`"))?;
    let emb_dims = embd.shape.dims().to_vec();
    let hidden = meta_usize(&ct, &key("embedding_length"), path)?;
    let heads = meta_usize(&ct, &key("attention.head_count"), path)?;
    let kv_heads = meta_usize(&ct, &key("attention.head_count_kv"), path).unwrap_or(heads);
    let tok_ids = |key: &str| ct.metadata.get(key).and_then(|v| v.to_u32().ok());
    let cfg = LlamaConfig {
        vocab_size: emb_dims.first().copied().unwrap_or(0),
        hidden_size: hidden,
        intermediate_size: meta_usize(&ct, &key("feed_forward_length"), path)?,
        num_hidden_layers: meta_usize(&ct, &key("block_count"), path)?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: meta_usize(&ct, &key("rope.dimension_count"), path).unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
        rope_theta: meta_f64(&ct, &key("rope.freq_base")).unwrap_or(10000.0),
        rms_norm_eps: meta_f64(&ct, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        max_position_embeddings: meta_usize(&ct, &key("context_length"), path).unwrap_or(2048),
        tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        bos_token_id: tok_ids("tokenizer.ggml.bos_token_id"),
        eos_token_id: tok_ids("tokenizer.ggml.eos_token_id"),
        arch,
        attention_bias: arch == Arch::Qwen2,
        rope_scaling: gguf_rope_scaling(&ct, &name, &mut reader, path)?,
        sliding_window: None,
    };
    cfg.validate().map_err(|m| Error::file(path, m))?;
    // A GGUF without tokenizer metadata still loads (weights only); commands that need text say so.
    let vocab = ct.metadata.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).cloned();
    let tokenizer = match vocab.as_deref() {
        None | Some("no_vocab" | "none") => None,
        Some(_) => Some(Tok::from_gguf(&ct, path)?),
    };
    if let Some(tok) = &tokenizer {
        check_tokenizer(&cfg, tok, path)?;
    }
    Ok((ct, reader, ModelHeader { cfg, tokenizer }))
}

/// The RoPE scaling a LLaMA GGUF carries: `llama.rope.scaling.type` (linear), or per-frequency factors in the
/// `rope_freqs.weight` tensor (LLaMA-3.1/3.2, which llama.cpp divides each frequency by).
fn gguf_rope_scaling(
    ct: &gguf_file::Content,
    arch: &str,
    reader: &mut std::io::BufReader<std::fs::File>,
    path: &Path,
) -> Result<Option<RopeScaling>> {
    let kind = ct.metadata.get(&format!("{arch}.rope.scaling.type")).and_then(|v| v.to_string().ok()).cloned();
    let scaling = match kind.as_deref() {
        None | Some("none") => None,
        Some("linear") => {
            let factor = meta_f64(ct, &format!("{arch}.rope.scaling.factor")).ok_or_else(|| {
                Error::file(path, format!("GGUF linear RoPE scaling lacks `{arch}.rope.scaling.factor`"))
            })?;
            Some(RopeScaling::Linear { factor })
        }
        Some(other) => {
            return Err(Error::file(path, format!("GGUF RoPE scaling type `{other}` is not supported (only linear)")))
        }
    };
    if !ct.tensor_infos.contains_key(ROPE_FREQS) {
        return Ok(scaling);
    }
    if scaling.is_some() {
        return Err(Error::file(path, format!("GGUF has both `{arch}.rope.scaling.type` and `rope_freqs`")));
    }
    let t = ct
        .tensor(reader, ROPE_FREQS, &Device::Cpu)
        .and_then(|q| q.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>())
        .map_err(|e| Error::file(path, format!("tensor `{ROPE_FREQS}`: {e}")))?;
    Ok(Some(RopeScaling::Factors { factors: t }))
}

const ROPE_FREQS: &str = "rope_freqs.weight";

/// A LLaMA-architecture GGUF file, one tensor dequantized to f32 at a time.
fn stream_gguf(path: &Path, check: &mut Check) -> Result<ModelHeader> {
    let (ct, mut reader, header) = gguf_open(path)?;
    let cfg = &header.cfg;
    let names: std::collections::HashSet<String> = ParamId::all(cfg).iter().map(|id| id.gguf_name()).collect();
    if let Some(extra) = ct.tensor_infos.keys().find(|n| !names.contains(*n) && *n != ROPE_FREQS) {
        let arch = cfg.arch.model_type();
        return Err(Error::file(path, format!("GGUF tensor `{extra}` is not part of a {arch} model qtune reads")));
    }
    for id in ParamId::all(cfg) {
        let name = id.gguf_name();
        let Some(info) = ct.tensor_infos.get(&name) else {
            return Err(Error::file(path, format!("GGUF lacks tensor `{name}`")));
        };
        // The declared shape is checked before any data is read: a wrong (or huge) shape costs nothing.
        if info.shape.dims() != id.shape(cfg).as_slice() {
            return Err(Error::file(
                path,
                format!("tensor `{name}` has shape {:?}, the config implies {:?}", info.shape.dims(), id.shape(cfg)),
            ));
        }
        let q = ct
            .tensor(&mut reader, &name, &Device::Cpu)
            .map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?;
        let mut t = q.dequantize(&Device::Cpu).map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?;
        // Shapes are checked by `check`; un-permute only what has the expected shape.
        if t.dims() == id.shape(cfg).as_slice() {
            t = from_gguf_layout(cfg, id, t)?;
        }
        check(cfg, id, t, path)?;
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{export_hf, Llama};
    use candle_core::quantized::{GgmlDType, QTensor};

    /// llama.cpp's conversion-time permutation (HF → GGUF), the inverse of [`unpermute_qk`].
    fn permute_qk(w: &Tensor, n_heads: usize) -> Tensor {
        let (out, inp) = w.dims2().unwrap();
        w.reshape((n_heads, 2, out / n_heads / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((out, inp))
            .unwrap()
    }

    /// Writes the tiny fixture as a GGUF the way llama.cpp's converter would (f32 tensors, Q/K permuted).
    fn write_tiny_gguf(path: &Path) -> ParamStore {
        let hf = load_hf_dir(Path::new("tests/fixtures/tiny_llama")).unwrap().params;
        let cfg = hf.cfg.clone();
        let mut tensors = Vec::new();
        for id in ParamId::all(&cfg) {
            let mut t = hf.get(id).clone();
            t = match id {
                ParamId::Block(_, BlockParam::Q) => permute_qk(&t, cfg.num_attention_heads),
                ParamId::Block(_, BlockParam::K) => permute_qk(&t, cfg.num_key_value_heads),
                _ => t,
            };
            tensors.push((id.gguf_name(), QTensor::quantize(&t, GgmlDType::F32).unwrap()));
        }
        use gguf_file::Value;
        let meta = vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.embedding_length", Value::U32(cfg.hidden_size as u32)),
            ("llama.feed_forward_length", Value::U32(cfg.intermediate_size as u32)),
            ("llama.block_count", Value::U32(cfg.num_hidden_layers as u32)),
            ("llama.attention.head_count", Value::U32(cfg.num_attention_heads as u32)),
            ("llama.attention.head_count_kv", Value::U32(cfg.num_key_value_heads as u32)),
            ("llama.rope.dimension_count", Value::U32(cfg.head_dim as u32)),
            ("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(cfg.rms_norm_eps as f32)),
            ("llama.context_length", Value::U32(cfg.max_position_embeddings as u32)),
        ];
        let mut f = std::fs::File::create(path).unwrap();
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &meta_refs, &t_refs).unwrap();
        hf
    }

    #[test]
    fn gguf_load_unpermutes_qk_and_matches_the_hf_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let hf = write_tiny_gguf(&path);
        let g = load_gguf(&path).unwrap();
        assert!(g.params.cfg.tie_word_embeddings);
        assert_eq!(g.params.cfg.num_key_value_heads, hf.cfg.num_key_value_heads);
        for id in ParamId::all(&hf.cfg) {
            let d =
                (g.params.get(id) - hf.get(id)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(d, 0.0, "{id:?}");
        }
        let ids = Tensor::new(&[[1u32, 5, 9]], &Device::Cpu).unwrap();
        let m = Llama::new(hf.cfg.clone());
        let a = m.logits(&g.params, &ids).unwrap();
        let b = m.logits(&hf, &ids).unwrap();
        assert_eq!((a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn truncated_gguf_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_gguf(&path);
        let bytes = std::fs::read(&path).unwrap();
        for cut in [10, bytes.len() / 3, bytes.len() - 7] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let e = load_model(&path).err().expect("truncated file must not load").to_string();
            assert!(e.contains("tiny.gguf"), "{e}");
        }
    }

    #[test]
    fn export_round_trips_through_the_hf_loader() {
        let dir = tempfile::tempdir().unwrap();
        let m = load_hf_dir(Path::new("tests/fixtures/tiny_llama_untied")).unwrap();
        export_hf(&m.params, m.tokenizer.as_ref(), dir.path()).unwrap();
        let back = load_hf_dir(dir.path()).unwrap();
        assert_eq!(back.params.cfg, m.params.cfg);
        for id in ParamId::all(&m.params.cfg) {
            let d = (back.params.get(id) - m.params.get(id))
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "{id:?}");
        }
        assert_eq!(back.tokenizer.unwrap().encode("Hi").unwrap(), vec![72, 105]);
    }

    #[test]
    fn export_refuses_non_finite_weights() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = load_hf_dir(Path::new("tests/fixtures/tiny_llama")).unwrap().params;
        let w = m.get(ParamId::FinalNorm).clone();
        m.set(ParamId::FinalNorm, (w * f64::NAN).unwrap());
        assert!(matches!(export_hf(&m, None, dir.path()), Err(Error::Numerical(_))));
        assert!(!dir.path().join("model.safetensors").exists());
    }
}

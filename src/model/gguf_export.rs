//! GGUF export: one file llama.cpp (and the `gguf` Python package, and transformers' GGUF loader) reads, written
//! streamed: the header and tensor table are computed from the config's shapes and the chosen types, then each
//! tensor is made, quantized (candle's ggml quantizers: F16, Q8_0, Q4_K) and written before the next. Q and K rows
//! are permuted into llama.cpp's interleaved RoPE layout for the `llama` architecture, as its converter does;
//! Qwen2 (`qwen2`) keeps HF's layout. The tokenizer (byte-level BPE), its special tokens and the chat template go
//! into the metadata.
use super::config::{Arch, LlamaConfig};
use super::export::{check_finite, GgufType};
use super::params::{BlockParam, ParamId};
use super::rope::RopeScaling;
use super::tokenizer::Tok;
use crate::io::write_atomic;
use crate::{Error, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::io::Write;
use std::path::Path;

const ALIGNMENT: usize = 32;

/// A GGUF metadata value (the types this export writes).
enum Value {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

impl Value {
    fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        fn string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
            w.write_all(&(s.len() as u64).to_le_bytes())?;
            w.write_all(s.as_bytes())
        }
        // GGUF value type ids: 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array.
        match self {
            Value::U32(v) => {
                w.write_all(&4u32.to_le_bytes())?;
                w.write_all(&v.to_le_bytes())
            }
            Value::F32(v) => {
                w.write_all(&6u32.to_le_bytes())?;
                w.write_all(&v.to_le_bytes())
            }
            Value::Bool(v) => {
                w.write_all(&7u32.to_le_bytes())?;
                w.write_all(&[*v as u8])
            }
            Value::Str(s) => {
                w.write_all(&8u32.to_le_bytes())?;
                string(w, s)
            }
            Value::Strs(v) => {
                w.write_all(&9u32.to_le_bytes())?;
                w.write_all(&8u32.to_le_bytes())?;
                w.write_all(&(v.len() as u64).to_le_bytes())?;
                v.iter().try_for_each(|s| string(w, s))
            }
            Value::I32s(v) => {
                w.write_all(&9u32.to_le_bytes())?;
                w.write_all(&5u32.to_le_bytes())?;
                w.write_all(&(v.len() as u64).to_le_bytes())?;
                v.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
            }
        }
    }
}

/// ggml's type id of a quantization type.
fn type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q4K => 12,
        other => unreachable!("not an export type: {other:?}"),
    }
}

/// One tensor of the file: its name, shape [rows, cols] as qtune holds it, type, and what produces it.
struct Entry {
    name: String,
    shape: Vec<usize>,
    dtype: GgmlDType,
    source: Source,
}

enum Source {
    Param(ParamId),
    /// LLaMA-3's per-frequency RoPE divisors (`rope_freqs.weight`).
    RopeFreqs(Vec<f64>),
}

impl Entry {
    fn bytes(&self) -> usize {
        let n: usize = self.shape.iter().product();
        n / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// The GGUF architecture name of a config, or why llama.cpp cannot run it as qtune does.
fn gguf_arch(cfg: &LlamaConfig) -> Result<&'static str> {
    // A window at least the context long never hides a key.
    if let Some(w) = cfg.sliding_window.filter(|&w| w < cfg.max_position_embeddings) {
        return Err(Error::Option(format!(
            "--export gguf: llama.cpp's llama architecture has no sliding-window attention (this model's \
             sliding_window {w} is shorter than its context {})",
            cfg.max_position_embeddings
        )));
    }
    if matches!(cfg.rope_scaling, Some(RopeScaling::Dynamic { .. })) {
        return Err(Error::Option("--export gguf: llama.cpp has no dynamic-NTK RoPE scaling".into()));
    }
    Ok(match cfg.arch {
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
    })
}

/// The type of parameter `id` in a GGUF export of matrices as `want`.
fn param_type(cfg: &LlamaConfig, id: ParamId, want: GgufType) -> GgmlDType {
    if !id.is_matrix() {
        return GgmlDType::F32;
    }
    let t = match want {
        GgufType::F16 => GgmlDType::F16,
        GgufType::Q8_0 => GgmlDType::Q8_0,
        GgufType::Q4K => GgmlDType::Q4K,
    };
    // Rows must fill the type's blocks (llama.cpp falls back the same way).
    if id.shape(cfg)[1].is_multiple_of(t.block_size()) {
        t
    } else {
        GgmlDType::F16
    }
}

/// llama.cpp's conversion-time permutation of Q/K rows (HF rotate-half → interleaved pairs).
pub fn permute_qk(w: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    let rest: usize = dims[1..].iter().product();
    w.reshape((n_heads, 2, out / n_heads / 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

/// Tokenizer metadata from the tokenizer's `tokenizer.json` form (byte-level BPE only), its token list padded to the
/// model's `vocab` embedding rows as llama.cpp's converter pads it (`[PAD<id>]`, type unused).
fn tokenizer_meta(tok: &Tok, vocab: usize) -> Result<Vec<(String, Value)>> {
    let j: serde_json::Value = serde_json::from_str(&tok.to_json()?).map_err(|e| Error::Msg(e.to_string()))?;
    let model = &j["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true {
        return Err(Error::Option(
            "--export gguf: only byte-level BPE tokenizers are written (this one is not); export --format hf instead"
                .into(),
        ));
    }
    if tok.vocab_size() > vocab {
        return Err(Error::Option(format!(
            "--export gguf: the tokenizer has {} tokens, more than the model's {vocab} embedding rows",
            tok.vocab_size()
        )));
    }
    let n = vocab;
    let tokens: Vec<String> = (0..n).map(|id| tok.token(id as u32).unwrap_or_else(|| format!("[PAD{id}]"))).collect();
    // llama.cpp's token types: 1 normal, 3 control, 4 user-defined, 5 unused (padding rows).
    let mut types: Vec<i32> = (0..n).map(|id| if tok.token(id as u32).is_some() { 1 } else { 5 }).collect();
    for a in j["added_tokens"].as_array().into_iter().flatten() {
        if let Some(id) = a["id"].as_u64().filter(|&i| (i as usize) < n) {
            // llama.cpp's token types: 3 control (special), 4 user-defined.
            types[id as usize] = if a["special"] == true { 3 } else { 4 };
        }
    }
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            serde_json::Value::Array(p) => p.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" "),
            other => other.as_str().unwrap_or_default().to_string(),
        })
        .collect();
    let mut meta = vec![
        ("tokenizer.ggml.model".to_string(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::Str(tok.gguf_pre())),
        ("tokenizer.ggml.tokens".to_string(), Value::Strs(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::I32s(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Strs(merges)),
        ("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(tok.specials.add_bos)),
    ];
    if let Some(b) = tok.specials.bos {
        meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(e) = tok.specials.eos {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    if let Some(t) = &tok.specials.chat_template {
        meta.push(("tokenizer.chat_template".into(), Value::Str(t.clone())));
    }
    Ok(meta)
}

/// Whether a model with this config and tokenizer can be written as a GGUF llama.cpp runs as qtune does: what
/// `train --export gguf` checks before training.
pub fn check(cfg: &LlamaConfig, tok: Option<&Tok>) -> Result<()> {
    gguf_arch(cfg)?;
    tok.map(|t| tokenizer_meta(t, cfg.vocab_size)).transpose()?;
    Ok(())
}

/// Writes `path` as a GGUF of the model whose parameters `dense` makes one at a time; matrices as `want`.
pub fn write_gguf(
    cfg: &LlamaConfig,
    dense: &dyn Fn(ParamId) -> Result<Tensor>,
    tok: Option<&Tok>,
    path: &Path,
    want: GgufType,
) -> Result<()> {
    let arch = gguf_arch(cfg)?;
    let a = |k: &str| format!("{arch}.{k}");
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(arch.into())),
        ("general.name".into(), Value::Str("qtune export".into())),
        ("general.alignment".into(), Value::U32(ALIGNMENT as u32)),
        (a("context_length"), Value::U32(cfg.max_position_embeddings as u32)),
        (a("embedding_length"), Value::U32(cfg.hidden_size as u32)),
        (a("block_count"), Value::U32(cfg.num_hidden_layers as u32)),
        (a("feed_forward_length"), Value::U32(cfg.intermediate_size as u32)),
        (a("attention.head_count"), Value::U32(cfg.num_attention_heads as u32)),
        (a("attention.head_count_kv"), Value::U32(cfg.num_key_value_heads as u32)),
        (a("attention.key_length"), Value::U32(cfg.head_dim as u32)),
        (a("attention.value_length"), Value::U32(cfg.head_dim as u32)),
        (a("rope.dimension_count"), Value::U32(cfg.head_dim as u32)),
        (a("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (a("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
        (a("vocab_size"), Value::U32(cfg.vocab_size as u32)),
    ];
    let mut entries = Vec::new();
    match &cfg.rope_scaling {
        None | Some(RopeScaling::Dynamic { .. }) => {}
        Some(RopeScaling::Linear { factor }) => {
            meta.push((a("rope.scaling.type"), Value::Str("linear".into())));
            meta.push((a("rope.scaling.factor"), Value::F32(*factor as f32)));
        }
        // LLaMA-3 scaling as its converter writes it: the divisors of the plain frequencies.
        Some(s @ (RopeScaling::Llama3 { .. } | RopeScaling::Factors { .. })) => {
            let plain = super::rope::inv_freq(cfg.rope_theta, cfg.head_dim, None, 0, 0);
            let scaled = super::rope::inv_freq(cfg.rope_theta, cfg.head_dim, Some(s), 0, 0);
            let factors: Vec<f64> = plain.iter().zip(&scaled).map(|(p, q)| p / q).collect();
            entries.push(Entry {
                name: "rope_freqs.weight".into(),
                shape: vec![factors.len()],
                dtype: GgmlDType::F32,
                source: Source::RopeFreqs(factors),
            });
        }
    }
    match tok {
        Some(tok) => meta.extend(tokenizer_meta(tok, cfg.vocab_size)?),
        // llama.cpp loads a model without a vocabulary when told so.
        None => meta.push(("tokenizer.ggml.model".into(), Value::Str("no_vocab".into()))),
    }
    for id in ParamId::all(cfg) {
        let dtype = param_type(cfg, id, want);
        entries.push(Entry { name: id.gguf_name(), shape: id.shape(cfg), dtype, source: Source::Param(id) });
    }
    write_atomic(path, |f| {
        // The header and tensor table (a few MB at most: the vocabulary), then the data at the alignment.
        let mut h: Vec<u8> = Vec::new();
        h.extend_from_slice(b"GGUF");
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        h.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        for (k, v) in &meta {
            h.extend_from_slice(&(k.len() as u64).to_le_bytes());
            h.extend_from_slice(k.as_bytes());
            v.write(&mut h)?;
        }
        let mut offset = 0usize;
        for e in &entries {
            h.extend_from_slice(&(e.name.len() as u64).to_le_bytes());
            h.extend_from_slice(e.name.as_bytes());
            h.extend_from_slice(&(e.shape.len() as u32).to_le_bytes());
            // ggml lists dimensions innermost first.
            for &d in e.shape.iter().rev() {
                h.extend_from_slice(&(d as u64).to_le_bytes());
            }
            h.extend_from_slice(&type_id(e.dtype).to_le_bytes());
            h.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += e.bytes().next_multiple_of(ALIGNMENT);
        }
        h.resize(h.len().next_multiple_of(ALIGNMENT), 0);
        let mut w = std::io::BufWriter::new(f);
        w.write_all(&h)?;
        for e in &entries {
            let t = match &e.source {
                Source::RopeFreqs(f) => Tensor::new(f.as_slice(), &Device::Cpu)?.to_dtype(DType::F32)?,
                Source::Param(id) => {
                    let t = dense(*id)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
                    check_finite(&t)?;
                    match id {
                        ParamId::Block(_, BlockParam::Q | BlockParam::QBias) if arch == "llama" => {
                            permute_qk(&t, cfg.num_attention_heads)?
                        }
                        ParamId::Block(_, BlockParam::K | BlockParam::KBias) if arch == "llama" => {
                            permute_qk(&t, cfg.num_key_value_heads)?
                        }
                        _ => t,
                    }
                }
            };
            if t.dims() != e.shape.as_slice() {
                return Err(Error::Msg(format!("export: `{}` has shape {:?}, not {:?}", e.name, t.dims(), e.shape)));
            }
            let q = QTensor::quantize(&t, e.dtype)?;
            let data = q.data()?;
            debug_assert_eq!(data.len(), e.bytes());
            w.write_all(&data)?;
            w.write_all(&vec![0u8; data.len().next_multiple_of(ALIGNMENT) - data.len()])?;
        }
        w.flush()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    //! A GGUF export read back by qtune's own loader (candle's GGUF reader, Q/K un-permuted): the same config and
    //! RoPE frequencies, and tensors within each type's rounding.
    use super::*;
    use crate::model::llama::tests::tiny_config;
    use crate::model::load::load_model;
    use crate::model::ParamStore;

    #[test]
    fn gguf_exports_read_back_as_the_same_model() {
        let mut cfg = tiny_config(false);
        // Rows of 256 so Q4_K (blocks of 256) applies to the 256-wide inputs and falls back to f16 elsewhere.
        (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) = (256, 64, 256, 64);
        cfg.rope_scaling = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        });
        let p = ParamStore::random(&cfg, 9, 0.05, DType::F32).unwrap();
        // Per element, as a fraction of the tensor's largest |w|: f16 rounds to 2^-11 relative; Q8_0 to half a
        // step of 1/127 of its block's max (plus the f16 scale's rounding); Q4_K to half a step of about 1/15.
        for (t, budget) in [(GgufType::F16, 1.0 / 2048.0), (GgufType::Q8_0, 0.6 / 127.0), (GgufType::Q4K, 0.1)] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.gguf");
            write_gguf(&cfg, &|id| Ok(p.get(id).clone()), None, &path, t).unwrap();
            let back = load_model(&path).unwrap().params;
            // The RoPE divisors travel as f32: 1e-6 relative.
            for (a, b) in back.cfg.inv_freq(8).iter().zip(cfg.inv_freq(8)) {
                assert!((a / b - 1.0).abs() < 1e-6, "{t:?}: inverse frequency {a} for {b}");
            }
            for id in ParamId::all(&cfg) {
                let (a, b) = (p.get(id), back.get(id));
                let max = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let err = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() / max;
                assert!((err as f64) <= budget, "{t:?} {id:?}: error {err:e} of max |w|, budget {budget:e}");
            }
        }
    }

    /// The token list is padded to the embedding's rows (`[PAD<id>]`, type unused), as llama.cpp's converter pads
    /// Qwen2's; the tokenizer read back from the file encodes as the one written.
    #[test]
    fn token_list_is_padded_to_the_embedding() {
        let tok = Tok::from_file(Path::new("tests/fixtures/tiny_llama/tokenizer.json")).unwrap();
        let mut cfg = tiny_config(true);
        cfg.vocab_size = tok.vocab_size() + 5;
        let p = ParamStore::random(&cfg, 9, 0.05, DType::F32).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_gguf(&cfg, &|id| Ok(p.get(id).clone()), Some(&tok), &path, GgufType::F16).unwrap();
        let ct = candle_core::quantized::gguf_file::Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
        let types = ct.metadata["tokenizer.ggml.token_type"].to_vec().unwrap();
        assert_eq!(types.len(), cfg.vocab_size);
        assert_eq!(types.last().unwrap().to_i32().unwrap(), 5);
        let back = load_model(&path).unwrap().tokenizer.unwrap();
        let s = "Hello world, 123!";
        assert_eq!(back.encode(s).unwrap(), tok.encode(s).unwrap());
        // A tokenizer larger than the embedding is refused before anything is written.
        cfg.vocab_size = tok.vocab_size() - 1;
        assert!(check(&cfg, Some(&tok)).unwrap_err().to_string().contains("more than the model's"));
    }

    #[test]
    fn what_llama_cpp_cannot_run_is_refused() {
        let mut cfg = tiny_config(true);
        cfg.sliding_window = Some(4);
        let p = ParamStore::random(&cfg, 9, 0.05, DType::F32).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = write_gguf(&cfg, &|id| Ok(p.get(id).clone()), None, &dir.path().join("m.gguf"), GgufType::F16);
        assert!(e.unwrap_err().to_string().contains("sliding"));
        assert!(!dir.path().join("m.gguf").exists());
    }
}

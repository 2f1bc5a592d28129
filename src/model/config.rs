//! The LLaMA-family model configuration: read from a Hugging Face `config.json` or from GGUF metadata, checked for
//! consistency, and written back out so `transformers` can load what we export.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Per-head width; HF configs may omit it (then hidden_size / num_attention_heads).
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// The subset of HF's config.json we read; everything optional that HF treats as optional.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f64>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 nests `rope_theta` here.
    rope_parameters: Option<serde_json::Value>,
}

fn token_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32),
        Some(serde_json::Value::Array(a)) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

impl LlamaConfig {
    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        Self::from_hf_json(&text, path)
    }

    /// Parses and validates the text of a Hugging Face `config.json` (`path` names it in errors).
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let hf: HfConfig =
            serde_json::from_str(text).map_err(|e| Error::file(path, format!("not a valid LLaMA config.json: {e}")))?;
        if let Some(mt) = &hf.model_type {
            if !matches!(mt.as_str(), "llama" | "mistral" | "qwen2" | "smollm") {
                return Err(Error::file(path, format!("model_type `{mt}` is not a LLaMA-family decoder")));
            }
        }
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                return Err(Error::file(path, format!("hidden_act `{act}` is not supported (only silu)")));
            }
        }
        if hf.attention_bias == Some(true) || hf.mlp_bias == Some(true) {
            return Err(Error::file(path, "attention_bias/mlp_bias = true is not supported"));
        }
        if hf.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(Error::file(path, "rope_scaling is not supported"));
        }
        let cfg = LlamaConfig {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size.checked_div(hf.num_attention_heads).unwrap_or(0)),
            rope_theta: hf
                .rope_theta
                .or_else(|| hf.rope_parameters.as_ref().and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64()))
                .unwrap_or(10000.0),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            bos_token_id: token_id(&hf.bos_token_id),
            eos_token_id: token_id(&hf.eos_token_id),
        };
        cfg.validate().map_err(|msg| Error::file(path, msg))?;
        Ok(cfg)
    }

    /// Checks the invariants the model code relies on; the message says which one failed.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(format!("{name} must be > 0"));
            }
        }
        // Far beyond any LLaMA-family model: rejects configs that would make us allocate absurd amounts.
        if self.hidden_size > 1 << 16
            || self.intermediate_size > 1 << 18
            || self.vocab_size > 1 << 22
            || self.num_hidden_layers > 1024
        {
            return Err("dimensions are implausibly large".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim ({}) must be even for RoPE", self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope_theta ({}) must be positive", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(format!("rms_norm_eps ({}) must be positive", self.rms_norm_eps));
        }
        Ok(())
    }

    /// Query heads per key/value head (grouped-query attention).
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The config.json `transformers` expects for `LlamaForCausalLM`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "attention_dropout": 0.0,
            "rope_scaling": null,
            "torch_dtype": "float32",
            "use_cache": true,
        })
    }

    /// Parameters of the model (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        let d = self.hidden_size;
        let per_block = 2 * d + d * self.q_dim() * 2 + d * self.kv_dim() * 2 + 3 * d * self.intermediate_size;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * d };
        self.vocab_size * d + self.num_hidden_layers * per_block + d + head
    }
}

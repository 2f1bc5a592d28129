//! The LLaMA-family model configuration: read from a Hugging Face `config.json` or from GGUF metadata, checked for
//! consistency, and written back out so `transformers` can load what we export. One decoder serves the families
//! (LLaMA-1/2/3.x, Mistral, Qwen2/2.5); what sets them apart is named here, and a field that would change the model
//! in a way qtune does not implement is refused by name, never ignored.
use super::rope::RopeScaling;
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
    /// The transformers class (what an export names).
    #[serde(default)]
    pub arch: Arch,
    /// Biases on the q/k/v projections (Qwen2): trained and exported like any other parameter.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Mistral's sliding-window attention: a query sees itself and the `sliding_window − 1` keys before it.
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

/// The model families qtune runs: the same decoder with the differences [`LlamaConfig`] names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    #[default]
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    /// `model_type` in config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// The transformers class an export names in `architectures`.
    pub fn class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }
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
    /// transformers ≥ 5 nests `rope_theta` and the scaling here.
    rope_parameters: Option<serde_json::Value>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
    partial_rotary_factor: Option<f64>,
}

/// The scaling a `rope_scaling` / `rope_parameters` object asks for (`None`: plain RoPE).
fn rope_scaling_of(v: &serde_json::Value) -> std::result::Result<Option<RopeScaling>, String> {
    if v.is_null() {
        return Ok(None);
    }
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    let num = |k: &str| v.get(k).and_then(|x| x.as_f64()).ok_or_else(|| format!("rope_scaling `{kind}` lacks `{k}`"));
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: num("factor")? }),
        "dynamic" => Some(RopeScaling::Dynamic { factor: num("factor")? }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => return Err(format!("rope_scaling type `{other}` is not supported (linear, dynamic, llama3 are)")),
    })
}

/// A special token's id as config.json gives it (a number, or a list whose first entry is used); anything that is
/// not a non-negative integer below 2³² is refused rather than cut to fit.
fn token_id(name: &str, v: &Option<serde_json::Value>) -> std::result::Result<Option<u32>, String> {
    let id = match v {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Array(a)) if a.is_empty() => return Ok(None),
        Some(serde_json::Value::Array(a)) => &a[0],
        Some(x) => x,
    };
    id.as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .map(Some)
        .ok_or_else(|| format!("{name} ({id}) is not a token id (a non-negative integer below 2^32)"))
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
        let bad = |msg: String| Error::file(path, msg);
        let arch = match hf.model_type.as_deref() {
            None | Some("llama" | "smollm") => Arch::Llama,
            Some("mistral") => Arch::Mistral,
            Some("qwen2") => Arch::Qwen2,
            Some(mt) => return Err(bad(format!("model_type `{mt}` is not supported (llama, mistral, qwen2 are)"))),
        };
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                return Err(bad(format!("hidden_act `{act}` is not supported (only silu)")));
            }
        }
        if hf.mlp_bias == Some(true) {
            return Err(bad("mlp_bias = true is not supported".into()));
        }
        // Qwen2 always has q/k/v biases; LLaMA's `attention_bias` would also put one on o_proj.
        if hf.attention_bias == Some(true) {
            return Err(bad(format!("attention_bias = true is not supported for {}", arch.model_type())));
        }
        if hf.partial_rotary_factor.is_some_and(|f| f != 1.0) {
            return Err(bad("partial_rotary_factor other than 1 is not supported".into()));
        }
        let mut rope_scaling = None;
        for v in [&hf.rope_scaling, &hf.rope_parameters].into_iter().flatten() {
            if let Some(s) = rope_scaling_of(v).map_err(&bad)? {
                rope_scaling = Some(s);
            }
        }
        let sliding_window = match arch {
            Arch::Mistral => hf.sliding_window,
            // Qwen2 ships a `sliding_window` it does not use unless `use_sliding_window` is set (then only on some
            // layers, which qtune does not implement).
            Arch::Qwen2 => {
                let sliding = hf.layer_types.iter().flatten().any(|t| t != "full_attention");
                if hf.use_sliding_window == Some(true) || sliding {
                    return Err(bad("use_sliding_window = true (Qwen2) is not supported".into()));
                }
                None
            }
            Arch::Llama if hf.sliding_window.is_some() => {
                return Err(bad("sliding_window is not a LLaMA setting (is this a mistral config?)".into()))
            }
            Arch::Llama => None,
        };
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
            bos_token_id: token_id("bos_token_id", &hf.bos_token_id).map_err(|m| Error::file(path, m))?,
            eos_token_id: token_id("eos_token_id", &hf.eos_token_id).map_err(|m| Error::file(path, m))?,
            arch,
            attention_bias: arch == Arch::Qwen2,
            rope_scaling,
            sliding_window,
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
            ("max_position_embeddings", self.max_position_embeddings),
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
        for (name, id) in [("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id)] {
            if let Some(id) = id.filter(|&id| id as usize >= self.vocab_size) {
                return Err(format!("{name} ({id}) is outside the vocabulary (vocab_size {})", self.vocab_size));
            }
        }
        if self.sliding_window == Some(0) {
            return Err("sliding_window must be > 0".into());
        }
        if let Some(s) = &self.rope_scaling {
            s.validate(self.head_dim)?;
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

    /// The inverse RoPE frequencies for a batch whose longest row has `seq_len` tokens.
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f64> {
        super::rope::inv_freq(
            self.rope_theta,
            self.head_dim,
            self.rope_scaling.as_ref(),
            seq_len,
            self.max_position_embeddings,
        )
    }

    /// The config.json `transformers` expects for this family's `*ForCausalLM`; an error where transformers has
    /// no form for a setting (RoPE factors from a GGUF that match no published LLaMA-3 scaling).
    pub fn to_hf_json(&self) -> std::result::Result<serde_json::Value, String> {
        let rope_scaling = match &self.rope_scaling {
            None => serde_json::Value::Null,
            Some(s) => s.to_hf_json(self.head_dim, self.rope_theta).ok_or_else(|| {
                "the model's RoPE frequency factors (GGUF `rope_freqs`) match no rope_scaling transformers knows"
                    .to_string()
            })?,
        };
        let mut j = serde_json::json!({
            "architectures": [self.arch.class()],
            "model_type": self.arch.model_type(),
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
            "attention_dropout": 0.0,
            "rope_scaling": rope_scaling,
            "torch_dtype": "float32",
            "use_cache": true,
        });
        let m = j.as_object_mut().expect("an object");
        match self.arch {
            Arch::Llama => {
                m.insert("attention_bias".into(), false.into());
                m.insert("mlp_bias".into(), false.into());
            }
            Arch::Mistral => {
                m.insert("sliding_window".into(), serde_json::json!(self.sliding_window));
            }
            Arch::Qwen2 => {
                m.insert("use_sliding_window".into(), false.into());
            }
        }
        Ok(j)
    }

    /// Parameters of the model (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        let d = self.hidden_size;
        let biases = if self.attention_bias { self.q_dim() + 2 * self.kv_dim() } else { 0 };
        let per_block = 2 * d + d * self.q_dim() * 2 + d * self.kv_dim() * 2 + 3 * d * self.intermediate_size + biases;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * d };
        self.vocab_size * d + self.num_hidden_layers * per_block + d + head
    }
}

#[cfg(test)]
mod tests {
    //! What each family's config.json turns into, and the settings refused by name.
    use super::*;

    fn parse(extra: &str) -> std::result::Result<LlamaConfig, String> {
        let text = format!(
            r#"{{"vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
                "num_attention_heads": 4, "num_key_value_heads": 2 {extra}}}"#
        );
        LlamaConfig::from_hf_json(&text, Path::new("config.json")).map_err(|e| e.to_string())
    }

    #[test]
    fn families_read_their_differences() {
        let q = parse(r#", "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": false"#).unwrap();
        assert!(q.attention_bias && q.sliding_window.is_none() && q.arch == Arch::Qwen2);
        let m = parse(r#", "model_type": "mistral", "sliding_window": 4096"#).unwrap();
        assert_eq!((m.arch, m.sliding_window, m.attention_bias), (Arch::Mistral, Some(4096), false));
        let l = parse(
            r#", "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        )
        .unwrap();
        assert!(matches!(l.rope_scaling, Some(RopeScaling::Llama3 { original_max_position_embeddings: 8192, .. })));
        // transformers 5 nests the scaling in rope_parameters; the old `type` key is read too.
        let n = parse(r#", "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}"#).unwrap();
        assert_eq!((&n.rope_scaling, n.rope_theta), (&Some(RopeScaling::Linear { factor: 2.0 }), 5e5));
        let d = parse(r#", "rope_scaling": {"type": "dynamic", "factor": 2.0}"#).unwrap();
        assert_eq!(d.rope_scaling, Some(RopeScaling::Dynamic { factor: 2.0 }));
        // Each exports as the family it is, and reads back the same.
        for cfg in [q, m, l, n, d] {
            let j = cfg.to_hf_json().unwrap().to_string();
            assert_eq!(LlamaConfig::from_hf_json(&j, Path::new("x")).unwrap(), cfg);
        }
    }

    #[test]
    fn settings_qtune_does_not_implement_are_refused_by_name() {
        for (extra, named) in [
            (r#", "model_type": "gemma""#, "gemma"),
            (r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#, "yarn"),
            (r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#, "low_freq_factor"),
            (r#", "model_type": "qwen2", "use_sliding_window": true"#, "use_sliding_window"),
            (r#", "attention_bias": true"#, "attention_bias"),
            (r#", "mlp_bias": true"#, "mlp_bias"),
            (r#", "sliding_window": 8"#, "sliding_window"),
            (r#", "partial_rotary_factor": 0.5"#, "partial_rotary_factor"),
            (r#", "model_type": "mistral", "sliding_window": 0"#, "sliding_window"),
        ] {
            let e = parse(extra).unwrap_err();
            assert!(e.contains(named) && e.contains("config.json"), "{extra}: {e}");
        }
    }
}

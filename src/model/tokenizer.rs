//! Tokenizer: a `tokenizer.json` file (with the `tokenizer_config.json` beside it) or one built from GGUF metadata,
//! together with what a prompt needs besides the vocabulary: the BOS/EOS tokens, whether BOS is added, and the chat
//! template ([`Specials`]). GGUF vocabularies are built by [`super::gguf_tokenizer`].
use crate::{Error, Result};
use candle_core::quantized::gguf_file;
use std::path::Path;
use tokenizers::Tokenizer;

#[derive(Clone)]
pub struct Tok {
    inner: Tokenizer,
    pub specials: Specials,
    /// llama.cpp's pre-tokenizer name, when the tokenizer came from a GGUF (`tokenizer.ggml.pre`).
    pre: Option<String>,
}

/// The special tokens and prompt format a model's tokenizer config declares.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Specials {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Prepend BOS to a prompt (`add_bos_token`; GGUF `tokenizer.ggml.add_bos_token`). When the config does not
    /// say: as tokenizer.json's post-processor does, or for a GGUF, for SentencePiece vocabularies (llama.cpp's rule).
    pub add_bos: bool,
    /// The Jinja chat template (`chat_template`; GGUF `tokenizer.chat_template`).
    pub chat_template: Option<String>,
}

impl Tok {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        // The whole file must parse as JSON before `tokenizers` reads it: tokenizers 0.23 panics on a syntax error
        // inside its "decoder" object (found by the tokenizer fuzz target: `fuzz/regressions/tokenizer/`).
        serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| Error::file(path, format!("not a valid tokenizer.json: {e}")))?;
        let inner =
            text.parse::<Tokenizer>().map_err(|e| Error::file(path, format!("not a valid tokenizer.json: {e}")))?;
        let mut tok = Tok { inner, specials: Specials::default(), pre: None };
        tok.specials.bos = tok.post_processor_bos();
        tok.specials.add_bos = tok.specials.bos.is_some();
        let cfg_path = path.with_file_name("tokenizer_config.json");
        if cfg_path.exists() {
            tok.specials = tok.read_config(&cfg_path)?;
        }
        Ok(tok)
    }

    /// Reads `tokenizer_config.json`: `bos_token`/`eos_token` (a string or `{"content": ...}`), `add_bos_token`
    /// and `chat_template` (a string, or a list of named templates of which `default` is used).
    fn read_config(&self, path: &Path) -> Result<Specials> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
        let token = |key: &str| -> Result<Option<u32>> {
            let name = match &v[key] {
                serde_json::Value::String(s) => s.as_str(),
                serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).unwrap_or(""),
                _ => return Ok(None),
            };
            self.inner
                .token_to_id(name)
                .map(Some)
                .ok_or_else(|| Error::file(path, format!("`{key}` {name:?} is not in the vocabulary")))
        };
        let (bos, eos) = (token("bos_token")?.or(self.specials.bos), token("eos_token")?);
        let chat_template = match &v["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(list) => {
                list.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str()).map(str::to_string)
            }
            _ => None,
        };
        // Without `add_bos_token`, transformers adds what tokenizer.json's post-processor adds.
        let add_bos = match v["add_bos_token"].as_bool() {
            Some(b) => b,
            None => bos.is_some() && self.post_processor_bos() == bos,
        };
        Ok(Specials { bos, eos, add_bos, chat_template })
    }

    pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Self> {
        let inner = super::gguf_tokenizer::from_gguf(ct, path)?;
        let pre = ct.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned();
        let meta = |key: &str| ct.metadata.get(key);
        let specials = Specials {
            bos: meta("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok()),
            eos: meta("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok()),
            // llama.cpp's default when the key is absent: add BOS for SentencePiece (`llama`) vocabularies only.
            add_bos: match meta("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()) {
                Some(b) => b,
                None => meta("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).is_some_and(|m| m == "llama"),
            },
            chat_template: meta("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned(),
        };
        Ok(Tok { inner, specials, pre })
    }

    /// `tokenizer_config.json` for an export: BOS/EOS by name, `add_bos_token` and the chat template, so the
    /// exported model renders prompts as this one does (and `transformers` reads the same settings).
    pub fn config_json(&self) -> serde_json::Value {
        let name = |id: Option<u32>| id.and_then(|i| self.token(i));
        let mut v = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.specials.add_bos,
            "add_eos_token": false,
        });
        if let Some(b) = name(self.specials.bos) {
            v["bos_token"] = b.into();
        }
        if let Some(e) = name(self.specials.eos) {
            v["eos_token"] = e.into();
        }
        if let Some(t) = &self.specials.chat_template {
            v["chat_template"] = t.clone().into();
        }
        v
    }

    /// The special token tokenizer.json's post-processor puts first, if it puts one there.
    fn post_processor_bos(&self) -> Option<u32> {
        let (plain, with) = (self.inner.encode("a", false).ok()?, self.inner.encode("a", true).ok()?);
        (with.get_ids().len() > plain.get_ids().len() && with.get_special_tokens_mask().first() == Some(&1))
            .then(|| with.get_ids()[0])
    }

    /// Token ids of `text`, without special tokens added (prompts are built explicitly).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false).map_err(|e| Error::Msg(format!("tokenizer: {e}")))?.get_ids().to_vec())
    }

    /// Token ids of `text` (no special tokens added) with each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<Vec<(u32, std::ops::Range<usize>)>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Msg(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().iter().zip(enc.get_offsets()).map(|(&id, &(a, b))| (id, a..b)).collect())
    }

    /// A token's text (special tokens included), e.g. for a chat template's `bos_token`.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Msg(format!("tokenizer: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The largest token id (ids may have gaps, so this is not always `vocab_size() - 1`); None for an empty
    /// vocabulary.
    pub fn max_id(&self) -> Option<u32> {
        self.inner.get_vocab(true).into_values().max()
    }

    /// llama.cpp's name for this tokenizer's pre-tokenizer (`tokenizer.ggml.pre` of a GGUF export): the GGUF's
    /// own, or recognized from tokenizer.json's: SmolLM's digit split, LLaMA-3's and Qwen2's regexes, else GPT-2's (llama.cpp's names).
    pub fn gguf_pre(&self) -> String {
        if let Some(p) = &self.pre {
            return p.clone();
        }
        let pre = self.inner.get_pre_tokenizer().and_then(|p| serde_json::to_string(p).ok()).unwrap_or_default();
        if pre.contains("\"Digits\"") {
            "smollm"
        } else if pre.contains("\\p{N}{1,3}") {
            "llama-bpe"
        } else if pre.contains("\\p{N}") {
            "qwen2"
        } else {
            "gpt-2"
        }
        .into()
    }

    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| Error::Msg(format!("tokenizer: {e}")))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The tiny byte-level tokenizer of the test fixtures with ChatML's two special tokens added (ids 256, 257),
    /// EOS `<|im_end|>`, BOS `<|im_start|>` not added (as SmolLM2's config says).
    pub fn byte_tok() -> Tok {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_llama/tokenizer.json");
        let mut inner = Tok::from_file(&path).unwrap().inner;
        let special = |s: &str| tokenizers::AddedToken::from(s.to_string(), true);
        inner.add_special_tokens([special("<|im_start|>"), special("<|im_end|>")]).unwrap();
        let id = |s: &str| inner.token_to_id(s).unwrap();
        let specials = Specials {
            bos: Some(id("<|im_start|>")),
            eos: Some(id("<|im_end|>")),
            add_bos: false,
            chat_template: None,
        };
        Tok { inner, specials, pre: None }
    }

    /// tokenizer_config.json sets BOS/EOS by name, `add_bos_token` and the chat template (a string or a named
    /// list); a token name outside the vocabulary is an error naming the file.
    #[test]
    fn tokenizer_config_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_llama/tokenizer.json");
        let mut inner = Tok::from_file(&src).unwrap().inner;
        inner.add_special_tokens([tokenizers::AddedToken::from("<s>".to_string(), true)]).unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), inner.to_string(false).unwrap()).unwrap();
        let cfg = dir.path().join("tokenizer_config.json");
        std::fs::write(
            &cfg,
            r#"{"bos_token": {"content": "<s>"}, "eos_token": "a", "add_bos_token": true,
            "chat_template": [{"name": "default", "template": "T"}, {"name": "tool_use", "template": "U"}]}"#,
        )
        .unwrap();
        let t = Tok::from_file(&dir.path().join("tokenizer.json")).unwrap();
        let bos = t.inner.token_to_id("<s>").unwrap();
        assert_eq!(
            t.specials,
            Specials { bos: Some(bos), eos: t.inner.token_to_id("a"), add_bos: true, chat_template: Some("T".into()) }
        );
        // An export's tokenizer_config.json reads back to the same settings.
        std::fs::write(&cfg, serde_json::to_string(&t.config_json()).unwrap()).unwrap();
        assert_eq!(Tok::from_file(&dir.path().join("tokenizer.json")).unwrap().specials, t.specials);
        std::fs::write(&cfg, r#"{"eos_token": "<nope>"}"#).unwrap();
        let e = Tok::from_file(&dir.path().join("tokenizer.json")).err().unwrap().to_string();
        assert!(e.contains("tokenizer_config.json") && e.contains("<nope>"), "{e}");
    }
}

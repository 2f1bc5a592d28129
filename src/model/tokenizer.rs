//! Tokenizer: a `tokenizer.json` file or one built from GGUF metadata. For SmolLM2 (`tokenizer.ggml.pre = smollm`)
//! candle's builder falls back to GPT-2 byte-level BPE with a prefix space; HF's SmolLM2 tokenizer splits digits
//! individually and adds no prefix space, so we set that pre-tokenizer to match `transformers`' ids.
use crate::{Error, Result};
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use std::path::Path;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::Tokenizer;

#[derive(Clone)]
pub struct Tok {
    inner: Tokenizer,
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
        Ok(Tok { inner })
    }

    pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Self> {
        let mut inner = Tokenizer::from_gguf(ct)
            .map_err(|e| Error::file(path, format!("cannot build the tokenizer from GGUF metadata: {e}")))?;
        let pre = ct.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned();
        if pre.as_deref() == Some("smollm") {
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])));
        }
        Ok(Tok { inner })
    }

    /// Token ids of `text`, without special tokens added (prompts are built explicitly).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false).map_err(|e| Error::Msg(format!("tokenizer: {e}")))?.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Msg(format!("tokenizer: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| Error::Msg(format!("tokenizer: {e}")))
    }
}

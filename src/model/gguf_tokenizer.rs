//! Tokenizers from GGUF metadata, built as transformers' GGUF loader builds them (so a GGUF model tokenizes as the
//! same model does in transformers):
//! - byte-level BPE (`tokenizer.ggml.model = gpt2`): candle's builder for the vocabulary and merges, then the
//!   pre-tokenizer set by `tokenizer.ggml.pre`: LLaMA-3's split (`llama-bpe`, `llama3`, ...), Qwen2's (`qwen2`),
//!   SmolLM's digit split (`smollm`), else GPT-2's byte-level split without a prefix space;
//! - SentencePiece BPE (`llama`: LLaMA-1/2, Mistral): the vocabulary, merges rebuilt from the token scores
//!   (transformers' `generate_merges`), byte fallback, and a `▁` prepended to the text's start (Metaspace, first).
use crate::{Error, Result};
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer a GGUF's metadata describes.
pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Tokenizer> {
    let text = |key: &str| ct.metadata.get(key).and_then(|v| v.to_string().ok()).cloned();
    let bad = |m: String| Error::file(path, format!("cannot build the tokenizer from GGUF metadata: {m}"));
    match text("tokenizer.ggml.model").as_deref() {
        Some("gpt2") => {
            let mut t = Tokenizer::from_gguf(ct).map_err(|e| bad(e.to_string()))?;
            let split = |re: &str| -> Result<Split> {
                Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| bad(e.to_string()))
            };
            let pre: Sequence = match text("tokenizer.ggml.pre").as_deref() {
                Some("llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "dbrx" | "falcon3") => {
                    Sequence::new(vec![split(LLAMA3_SPLIT)?.into(), ByteLevel::new(false, true, false).into()])
                }
                Some("qwen2" | "deepseek-r1-qwen") => {
                    Sequence::new(vec![split(QWEN2_SPLIT)?.into(), ByteLevel::new(false, true, false).into()])
                }
                Some("smollm") => {
                    Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()])
                }
                _ => Sequence::new(vec![ByteLevel::new(false, true, true).into()]),
            };
            t.with_pre_tokenizer(Some(pre));
            t.with_decoder(Some(ByteLevelDecoder::default()));
            Ok(t)
        }
        Some("llama") => sentencepiece(ct).map_err(bad),
        Some(other) => Err(bad(format!("tokenizer model `{other}` is not supported (gpt2 and llama are)"))),
        None => Err(bad("no `tokenizer.ggml.model`".into())),
    }
}

/// SentencePiece BPE as transformers' `LlamaTokenizer` builds it from a GGUF.
fn sentencepiece(ct: &gguf_file::Content) -> std::result::Result<Tokenizer, String> {
    let array = |key: &str| -> std::result::Result<&Vec<gguf_file::Value>, String> {
        ct.metadata.get(key).ok_or(format!("no `{key}`"))?.to_vec().map_err(|e| format!("`{key}`: {e}"))
    };
    let tokens: Vec<String> = array("tokenizer.ggml.tokens")?
        .iter()
        .map(|v| v.to_string().cloned().map_err(|e| e.to_string()))
        .collect::<std::result::Result<_, _>>()?;
    let scores: Vec<f32> = array("tokenizer.ggml.scores")?
        .iter()
        .map(|v| v.to_f32().map_err(|e| e.to_string()))
        .collect::<std::result::Result<_, _>>()?;
    let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec().map_err(|e| e.to_string())?.iter().map(|t| t.to_i32().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    if scores.len() != tokens.len() {
        return Err(format!("{} scores for {} tokens", scores.len(), tokens.len()));
    }
    // A token appearing twice keeps its first id, as a Python dict built in order keeps the last id but the merges
    // below read the first score: duplicates do not occur in real vocabularies.
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), i as u32);
    }
    let merges = generate_merges(&tokens, &scores, &vocab);
    let unk = ct
        .metadata
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| v.to_u32().ok())
        .and_then(|i| tokens.get(i as usize).cloned())
        .unwrap_or_else(|| "<unk>".into());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.clone().into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
        .byte_fallback(true)
        .fuse_unk(true)
        .unk_token(unk)
        .build()
        .map_err(|e| e.to_string())?;
    let mut t = Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
    let replace = Replace::new("▁", " ").map_err(|e| e.to_string())?;
    t.with_decoder(Some(DecoderSequence::new(vec![
        replace.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
        Strip::new(' ', 1, 0).into(),
    ])));
    // Control tokens (type 3) match whole as special tokens; user-defined ones (4) as plain added tokens.
    let added = |ty: i32, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == ty)
            .map(|(tok, _)| AddedToken::from(tok.clone(), special).normalized(false))
            .collect()
    };
    t.add_special_tokens(added(3, true)).map_err(|e| e.to_string())?;
    t.add_tokens(added(4, false)).map_err(|e| e.to_string())?;
    Ok(t)
}

/// transformers' `generate_merges(vocab, vocab_scores)`: every split of every token into two vocabulary pieces,
/// best score first (then longer left, then longer right piece), ties in vocabulary order.
fn generate_merges(tokens: &[String], scores: &[f32], vocab: &HashMap<String, u32>) -> Vec<(String, String)> {
    let mut merges: Vec<(String, String, f32)> = Vec::new();
    for (tok, &score) in tokens.iter().zip(scores) {
        let cuts: Vec<usize> = tok.char_indices().map(|(i, _)| i).skip(1).collect();
        let mut local: Vec<(String, String, f32)> = cuts
            .iter()
            .map(|&i| (&tok[..i], &tok[i..]))
            .filter(|(l, r)| vocab.contains_key(*l) && vocab.contains_key(*r))
            .map(|(l, r)| (l.to_string(), r.to_string(), score))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    let key = |m: &(String, String, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
    // Python's sorted(..., reverse=True) is stable: equal keys keep their order.
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0).then(kb.1.cmp(&ka.1)).then(kb.2.cmp(&ka.2))
    });
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}

#[cfg(test)]
mod tests {
    //! Ids against the ones transformers' GGUF tokenizer loader gives for the committed fixtures
    //! (scripts/make_gguf_tokenizers.py): SentencePiece, LLaMA-3 and Qwen2 byte-level BPE; exact, and decoding
    //! gives transformers' text back.
    use super::*;

    #[test]
    fn gguf_tokenizers_give_transformers_ids() {
        let dir = Path::new("tests/fixtures/gguf_tokenizers");
        let want: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("ids.json")).unwrap()).unwrap();
        let strings: Vec<String> = serde_json::from_value(want["strings"].clone()).unwrap();
        for name in ["spm.gguf", "llama-bpe.gguf", "qwen2.gguf"] {
            let path = dir.join(name);
            let mut f = std::fs::File::open(&path).unwrap();
            let ct = gguf_file::Content::read(&mut f).unwrap();
            let t = from_gguf(&ct, &path).unwrap();
            let ids: Vec<Vec<u32>> = serde_json::from_value(want[name].clone()).unwrap();
            let texts: Vec<String> = serde_json::from_value(want[format!("{name}.decoded")].clone()).unwrap();
            for ((s, want_ids), text) in strings.iter().zip(&ids).zip(&texts) {
                let got = t.encode(s.as_str(), false).unwrap().get_ids().to_vec();
                assert_eq!(&got, want_ids, "{name}: {s:?}");
                assert_eq!(&t.decode(&got, false).unwrap(), text, "{name}: decoding {s:?}");
            }
        }
    }
}

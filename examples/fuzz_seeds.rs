//! Writes the seed corpus of every fuzz target into `fuzz/seeds/<target>/`: a valid input of each reader (the micro
//! model as GGUF and safetensors, its config, the tiny tokenizer, an lm jsonl, checkpoints of several methods), so
//! the fuzzer starts from files that reach deep into the parsers. Run: `cargo run --release --example fuzz_seeds`.
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::DType;
use qtune::checkpoint::StateWriter;
use qtune::fuzzing::{micro_config, micro_options, MICRO_CONFIG, STATE_METHODS};
use qtune::methods::RunContext;
use qtune::model::quantized::Source;
use qtune::model::{export_hf, ParamStore};
use std::path::Path;

fn put(target: &str, name: &str, data: &[u8]) -> qtune::Result<()> {
    let dir = Path::new("fuzz/seeds").join(target);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(name), data)?;
    Ok(())
}

fn main() -> qtune::Result<()> {
    let cfg = micro_config()?;
    let params = ParamStore::random(&cfg, 1, 0.1, DType::F32)?;
    // safetensors: the micro model as `export_hf` writes it.
    let tmp = std::env::temp_dir().join(format!("qtune-seeds-{}", std::process::id()));
    export_hf(&params, None, &tmp)?;
    put("safetensors", "micro.safetensors", &std::fs::read(tmp.join("model.safetensors"))?)?;
    std::fs::remove_dir_all(&tmp)?;
    // GGUF: the micro model in f32 with llama metadata (no tokenizer, which the reader allows).
    let u32v = gguf_file::Value::U32;
    let meta = [
        ("general.architecture", gguf_file::Value::String("llama".into())),
        ("llama.embedding_length", u32v(cfg.hidden_size as u32)),
        ("llama.feed_forward_length", u32v(cfg.intermediate_size as u32)),
        ("llama.block_count", u32v(cfg.num_hidden_layers as u32)),
        ("llama.attention.head_count", u32v(cfg.num_attention_heads as u32)),
        ("llama.attention.head_count_kv", u32v(cfg.num_key_value_heads as u32)),
        ("llama.context_length", u32v(cfg.max_position_embeddings as u32)),
    ];
    let tensors: Vec<(String, QTensor)> = params
        .ids()
        .into_iter()
        .map(|id| Ok((id.gguf_name(), QTensor::quantize(params.get(id), GgmlDType::F32)?)))
        .collect::<qtune::Result<_>>()?;
    let mut gguf = std::io::Cursor::new(Vec::new());
    gguf_file::write(
        &mut gguf,
        &meta.iter().map(|(k, v)| (*k, v)).collect::<Vec<_>>(),
        &tensors.iter().map(|(k, t)| (k.as_str(), t)).collect::<Vec<_>>(),
    )?;
    put("gguf", "micro.gguf", gguf.get_ref())?;
    put("config", "micro.json", MICRO_CONFIG.as_bytes())?;
    put("tokenizer", "tiny.json", &std::fs::read("tests/fixtures/tiny_llama/tokenizer.json")?)?;
    let lines: String =
        (0..6).map(|i| format!("{{\"prompt\": \"Q{i}: is it?\", \"completion\": \" yes\"}}\n")).collect();
    put("jsonl", "lm.jsonl", lines.as_bytes())?;
    // Checkpoints of the methods the state target loads.
    let ctx = RunContext::cpu(0, qtune::train::OnNonFinite::Stop, 1);
    for method in STATE_METHODS {
        let m = method.build(&micro_options(), Source::Params(params.clone()), &ctx)?;
        let mut w = StateWriter::new(m.name());
        m.save_state(&mut w)?;
        let path = std::env::temp_dir().join(format!("qtune-seed-{method}.safetensors"));
        w.write(&path)?;
        put("state", &format!("{method}.safetensors"), &std::fs::read(&path)?)?;
        std::fs::remove_file(&path)?;
    }
    println!("wrote fuzz/seeds/{{gguf,safetensors,config,tokenizer,jsonl,state}}");
    Ok(())
}

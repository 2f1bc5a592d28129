//! The readers of untrusted input, driven from bytes: the entry points of the fuzz targets (`fuzz/`) and of their
//! regression tests (`tests/fuzz_regressions.rs`). Each writes its input where `qtune` would find such a file and
//! reads it through the same code path the CLI uses; for any input it must return — `Ok`, or an error naming the
//! file — never panic, never allocate without bound.
use crate::methods::{MethodKind, MethodOptions, RunContext};
use crate::model::quantized::Source;
use crate::model::{load_model, LlamaConfig, ParamStore, Tok};
use crate::Result;
use candle_core::DType;
use std::path::{Path, PathBuf};

/// The micro model every model-file target reads: 1 layer, width 8, 2 heads (1 KV head), vocabulary 16, untied.
pub const MICRO_CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
"hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2,
"num_key_value_heads": 1, "vocab_size": 16, "max_position_embeddings": 32, "rms_norm_eps": 1e-5,
"rope_theta": 10000.0, "tie_word_embeddings": false}"#;

/// Options that fit the micro model (side width 4, adapter and LoRA rank 2, INT4 QuZO).
pub fn micro_options() -> MethodOptions {
    let mut o = MethodOptions::default();
    o.bits.bits = 4;
    o.qft.outlier_fraction = 0.05;
    (o.qst.side_r, o.qst.adapter_rank, o.lora.lora_r) = (2, 2, 2);
    o
}

/// The methods whose checkpoints the state target loads (each has its own state layout).
pub const STATE_METHODS: &[MethodKind] =
    &[MethodKind::FullLion, MethodKind::Qft, MethodKind::Quzo, MethodKind::Qst, MethodKind::Lora, MethodKind::Mezo];

pub fn micro_config() -> Result<LlamaConfig> {
    LlamaConfig::from_hf_json(MICRO_CONFIG, Path::new("micro config"))
}

/// A scratch folder of this thread (in memory where /dev/shm exists): targets rewrite the same files each run, and
/// tests running targets on parallel threads must not share them.
fn scratch() -> Result<PathBuf> {
    let root = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let thread: String = format!("{:?}", std::thread::current().id()).chars().filter(char::is_ascii_digit).collect();
    let dir = root.join(format!("qtune-fuzz-{}-{thread}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| crate::Error::file(&dir, format!("cannot create: {e}")))?;
    Ok(dir)
}

fn put(dir: &Path, name: &str, data: &[u8]) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, data).map_err(|e| crate::Error::file(&path, format!("cannot write: {e}")))?;
    Ok(path)
}

/// A GGUF model file: header, tokenizer from the metadata, every tensor dequantized and checked.
pub fn gguf(data: &[u8]) -> Result<()> {
    let path = put(&scratch()?, "model.gguf", data)?;
    load_model(&path).map(|_| ())
}

/// `model.safetensors` of an HF directory holding the micro config.
pub fn safetensors(data: &[u8]) -> Result<()> {
    let dir = scratch()?.join("hf");
    std::fs::create_dir_all(&dir).map_err(|e| crate::Error::file(&dir, format!("cannot create: {e}")))?;
    put(&dir, "config.json", MICRO_CONFIG.as_bytes())?;
    put(&dir, "model.safetensors", data)?;
    load_model(&dir).map(|_| ())
}

/// A `config.json`.
pub fn config(data: &[u8]) -> Result<()> {
    let path = put(&scratch()?, "config.json", data)?;
    LlamaConfig::from_hf_file(&path).map(|_| ())
}

/// A `tokenizer.json`, then an encoding with it.
pub fn tokenizer(data: &[u8]) -> Result<()> {
    let path = put(&scratch()?, "tokenizer.json", data)?;
    Tok::from_file(&path)?.encode("Is the sky blue? Yes").map(|_| ())
}

/// An `lm` task file (prompt/completion jsonl), tokenized with `tok`, split 2/1/1.
pub fn jsonl(data: &[u8], tok: &Tok) -> Result<()> {
    let path = put(&scratch()?, "data.jsonl", data)?;
    let sizes = crate::data::SplitSizes { train: 2, dev: 1, eval: 1 };
    crate::data::tasks::load_task(crate::data::TaskKind::Chat, &path, tok, sizes, 0).map(|_| ())
}

/// A checkpoint (`checkpoint.safetensors`), loaded into each method that saves state, on the micro model.
pub fn state(data: &[u8]) -> Result<()> {
    let path = put(&scratch()?, "checkpoint.safetensors", data)?;
    let r = crate::checkpoint::StateReader::open(&path)?;
    let cfg = micro_config()?;
    let params = ParamStore::random(&cfg, 0, 0.1, DType::F32)?;
    // Every method reads its own names; a state of another method is an error, which is fine here.
    let ctx = RunContext::cpu(0, crate::train::OnNonFinite::Stop, 1);
    for method in STATE_METHODS {
        let mut m = method.build(&micro_options(), Source::Params(params.clone()), &ctx)?;
        let _ = m.load_state(&r);
    }
    Ok(())
}

/// The fuzz targets by name, for the regression tests (the jsonl target takes the micro tokenizer).
pub const TARGETS: &[&str] = &["gguf", "safetensors", "config", "tokenizer", "jsonl", "state"];

/// Runs target `name` on `data` (`tok` serves the jsonl target).
pub fn run(name: &str, data: &[u8], tok: &Tok) -> Result<()> {
    match name {
        "gguf" => gguf(data),
        "safetensors" => safetensors(data),
        "config" => config(data),
        "tokenizer" => tokenizer(data),
        "jsonl" => jsonl(data, tok),
        "state" => state(data),
        other => Err(crate::Error::Option(format!("unknown fuzz target `{other}` (known: {})", TARGETS.join(", ")))),
    }
}

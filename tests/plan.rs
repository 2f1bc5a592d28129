//! The memory planner against measured peak RSS: every `qtune bench` run, each in its own process, on a model the
//! test builds, predicted within ±10% by `qtune plan`. The model is narrow (width 128) with many heads (16) at 512
//! tokens, so attention activations and forward intermediates (what the phase model adds beyond the exact counts
//! that `plan::tests` checks) are most of the memory, while a step stays fast. The runtime term is measured here:
//! the peak of `qtune eval` on the same model and data with no evaluation, minus its f32 weights.
use qtune::model::{export_hf, LlamaConfig, ParamStore, Tok};
use std::path::Path;
use std::process::Command;

const TOLERANCE: f64 = 0.10;

fn qtune(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_qtune")).args(args).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "qtune {args:?} failed: {stderr}");
    stdout.into_owned()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn plan_predicts_peak_rss_of_every_bench_run() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_llama");
    let cfg = LlamaConfig {
        vocab_size: 256,
        hidden_size: 128,
        intermediate_size: 256,
        num_hidden_layers: 4,
        num_attention_heads: 16,
        num_key_value_heads: 4,
        head_dim: 8,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 512,
        tie_word_embeddings: true,
        bos_token_id: None,
        // Completions end with EOS (the tiny tokenizer's config has none of its own).
        eos_token_id: Some(2),
        arch: Default::default(),
        attention_bias: false,
        rope_scaling: None,
        sliding_window: None,
    };
    let model = dir.path().join("model");
    let tok = Tok::from_file(&fixtures.join("tokenizer.json")).unwrap();
    export_hf(&ParamStore::random(&cfg, 1, 0.05, candle_core::DType::F32).unwrap(), Some(&tok), &model).unwrap();
    // Prompts longer than 512 byte-level tokens, so every batch is 8 × 512.
    let data = dir.path().join("data.jsonl");
    let line = |i: usize| format!("{{\"prompt\": \"{}\", \"completion\": \" yes\"}}\n", format!("w{i} ").repeat(200));
    std::fs::write(&data, (0..16).map(line).collect::<String>()).unwrap();
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let task = ["--model", m, "--task", "lm", "--data", d, "--train-size", "8", "--max-seq-len", "512"];
    let split = ["--dev-size", "0", "--eval-size", "0"];

    // Runtime: the f32 model alone (evaluation of empty splits) minus its weights.
    let base = dir.path().join("base");
    qtune(&[&["eval"][..], &task, &split, &["--out", base.to_str().unwrap()]].concat());
    let runtime = json(&base.join("summary.json"))["peak_rss_bytes"].as_f64().unwrap() - 4.0 * cfg.num_params() as f64;

    let plans = dir.path().join("plans.json");
    qtune(&[
        "plan",
        "--model",
        m,
        "--method",
        "all",
        "--batch",
        "8",
        "--seq",
        "512",
        "--eval-batch",
        "0",
        "--classes",
        "0",
        "--json",
        plans.to_str().unwrap(),
    ]);
    let bench = dir.path().join("bench");
    qtune(
        &[
            &["bench", "--out", bench.to_str().unwrap(), "--"][..],
            &task,
            &split,
            &["--steps", "1", "--batch-size", "8", "--lr", "1e-4"],
        ]
        .concat(),
    );
    let mut failures = Vec::new();
    for p in json(&plans).as_array().unwrap() {
        let name = p["method"].as_str().unwrap();
        let phases = ["load", "train", "eval"].map(|k| p[k].as_f64().unwrap());
        let predicted = runtime + phases.iter().cloned().fold(0.0, f64::max);
        let measured = json(&bench.join(name).join("summary.json"))["peak_rss_bytes"].as_f64().unwrap();
        let err = predicted / measured - 1.0;
        eprintln!(
            "{name:<12} predicted {:>7.1} MiB  measured {:>7.1} MiB  {:+.1}%",
            predicted / 1048576.0,
            measured / 1048576.0,
            100.0 * err
        );
        if err.abs() > TOLERANCE {
            failures.push(format!("{name}: {:+.1}%", 100.0 * err));
        }
    }
    assert!(failures.is_empty(), "plan off by more than {}%: {failures:?}", 100.0 * TOLERANCE);
}

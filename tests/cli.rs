//! The `qtune` binary end to end on the tiny fixture model: a short training run writes every report it promises,
//! and bad input of each kind ends in a one-line error that names the file or option and the problem.
use std::path::{Path, PathBuf};
use std::process::Command;

const TINY: &str = "tests/fixtures/tiny_llama";

fn qtune(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qtune")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

mod common;
use common::lm_data;

/// Runs and expects failure with exactly one `error:` line containing every `needle`.
/// A temporary folder with the lm data written into it, and the run folder a test writes to.
fn scratch() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = lm_data(dir.path());
    let out = dir.path().join("run");
    (dir, data, out)
}

/// `qtune eval` of an exported model on the lm data, writing to `ev`.
fn eval_export(model: &Path, data: &Path, ev: &Path, extra: &[&str]) -> (bool, String, String) {
    let (m, d, e) = (model.to_str().unwrap(), data.to_str().unwrap(), ev.to_str().unwrap());
    let mut args = vec!["eval", "--model", m, "--task", "lm", "--data", d, "--train-size", "12", "--dev-size", "4"];
    args.extend(["--eval-size", "4", "--out", e]);
    args.extend(extra);
    qtune(&args)
}

/// A command that fails after its progress lines: the last line is the error, naming `needles`.
fn expect_last_error(args: &[&str], needles: &[&str]) {
    let (ok, _, err) = qtune(args);
    assert!(!ok, "{args:?} should fail");
    let last = err.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    assert!(last.starts_with("error: "), "{err}");
    for n in needles {
        assert!(last.contains(n), "`{n}` missing from: {last}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

/// A new folder `dst` holding these files of the tiny model (the test writes the others).
fn copy_tiny(dst: &Path, files: &[&str]) {
    std::fs::create_dir(dst).unwrap();
    for f in files {
        std::fs::copy(Path::new(TINY).join(f), dst.join(f)).unwrap();
    }
}

fn expect_error(args: &[&str], needles: &[&str]) {
    let (ok, _, err) = qtune(args);
    assert!(!ok, "{args:?} should fail");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` missing from: {}", lines[0]);
    }
    assert!(!err.contains("panicked"), "{err}");
}

fn train_args<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        model,
        "--task",
        "lm",
        "--data",
        data,
        "--method",
        "full-lion",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--train-size",
        "12",
        "--dev-size",
        "4",
        "--eval-size",
        "4",
        "--max-seq-len",
        "32",
        "--lr",
        "1e-3",
        "--out",
        out,
    ]
}

#[test]
fn train_writes_summary_log_and_a_loadable_export() {
    let (dir, data, out) = scratch();
    let (ok, _, err) = qtune(&train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap()));
    assert!(ok, "{err}");
    assert!(err.contains("peak RSS"), "memory report missing: {err}");
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    for key in [
        "method",
        "model",
        "task",
        "steps",
        "batch_size",
        "max_seq_len",
        "params",
        "trainable_params",
        "peak_rss_bytes",
        "model_state_bytes",
        "bytes_per_param",
        "step_time_s",
        "tokens_per_s",
        "dev_accuracy_before",
        "dev_accuracy_after",
        "eval_accuracy",
        "dev_loss_before",
        "dev_loss_after",
        "eval_loss",
    ] {
        assert!(!s[key].is_null(), "summary.json lacks {key}");
    }
    for key in ["weights", "gradients", "optimizer", "activations", "scratch"] {
        assert!(s["breakdown"][key].as_u64().is_some(), "breakdown lacks {key}");
    }
    assert_eq!(s["method"], "full-lion");
    let command: Vec<&str> = s["command"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(command[1..], train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap())[..]);
    // FP32 Lion: 4 (weights) + 4 (gradients) + 4 (momentum) bytes per parameter.
    assert!((s["bytes_per_param"].as_f64().unwrap() - 12.0).abs() < 1e-9, "{}", s["bytes_per_param"]);
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3);
    // The export is an HF directory this tool (and transformers) loads, in f32 and with INT4 weights (QuZO's
    // inference baseline).
    let model = out.join("model");
    for (name, extra) in [("ev", &[][..]), ("ev4", &["--bits", "4"][..])] {
        let (ok, _, err) = eval_export(&model, &data, &dir.path().join(name), extra);
        assert!(ok, "{name}: {err}");
    }
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("ev4/summary.json")).unwrap()).unwrap();
    assert_eq!(s["method"], "inference-int4");
    assert!(s["bytes_per_param"].as_f64().unwrap() < 1.0, "{}", s["bytes_per_param"]);
}

/// `quzo --lora` trains only LoRA factors over an INT4 base; the merged export evaluates.
#[test]
fn quzo_lora_trains_factors_and_exports_a_merged_model() {
    let (dir, data, out) = scratch();
    let mut args = train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap());
    args[8] = "quzo";
    args.extend(["--lora", "--bits", "4", "--eps", "1e-2", "--export", "hf,peft,gguf", "--gguf-type", "f16"]);
    let (ok, _, err) = qtune(&args);
    assert!(ok, "{err}");
    for f in ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "model/config.json", "model.gguf"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["method"], "quzo-lora");
    // Two forwards per step: MFU counts 4 FLOPs per matmul parameter and token, not backprop's 6.
    assert_eq!(s["flops_per_param"], 4.0);
    let (trained, params) = (s["trainable_params"].as_u64().unwrap(), s["params"].as_u64().unwrap());
    assert!(trained > 0 && trained < params / 2, "{trained} of {params}");
    assert_eq!(s["breakdown"]["gradients"], 0);
    assert_eq!(s["breakdown"]["optimizer"], 0);
    let (ok, _, err) = eval_export(&out.join("model"), &data, &dir.path().join("ev"), &[]);
    assert!(ok, "{err}");
    // The GGUF export (f16, tokenizer in its metadata) evaluates to the HF export's loss within f16's rounding.
    let (ok, _, err) = eval_export(&out.join("model.gguf"), &data, &dir.path().join("ev-gguf"), &[]);
    assert!(ok, "{err}");
    let loss = |d: &str| {
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(d).join("summary.json")).unwrap()).unwrap();
        s["eval_loss"].as_f64().unwrap()
    };
    assert!((loss("ev") - loss("ev-gguf")).abs() < 1e-2 * loss("ev"), "{} vs {}", loss("ev"), loss("ev-gguf"));
    // `qtune export` converts the run's model to bf16, sharded, and it evaluates the same within bf16's rounding.
    let conv = dir.path().join("bf16");
    let (ok, _, err) = qtune(&[
        "export",
        out.to_str().unwrap(),
        "--out",
        conv.to_str().unwrap(),
        "--export-dtype",
        "bf16",
        "--shard-size",
        "100KB",
    ]);
    assert!(ok, "{err}");
    assert!(conv.join("model.safetensors.index.json").exists());
    let (ok, _, err) =
        qtune(&["export", out.to_str().unwrap(), "--format", "peft", "--out", dir.path().join("a").to_str().unwrap()]);
    assert!(ok && dir.path().join("a/adapter_model.safetensors").exists(), "{err}");
    let (ok, _, err) = eval_export(&conv, &data, &dir.path().join("ev-bf16"), &[]);
    assert!(ok, "{err}");
    assert!((loss("ev") - loss("ev-bf16")).abs() < 2e-2 * loss("ev"), "{} vs {}", loss("ev"), loss("ev-bf16"));
}

/// A QST run's export (side network + a manifest naming the base, here with one side head) evaluates back to the
/// run's own dev loss; a damaged side file, or `--bits` on an NF4-based export, is a one-line error naming it.
#[test]
fn qst_export_evaluates_to_the_runs_own_dev_loss() {
    let (dir, data, out) = scratch();
    let mut args = train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap());
    args[8] = "qst";
    args.extend(["--side-r", "2", "--side-heads", "1", "--qst-start", "code"]);
    let (ok, _, err) = qtune(&args);
    assert!(ok, "{err}");
    let read = |p: PathBuf| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let trained = read(out.join("summary.json"));
    let model = out.join("model");
    let (ok, _, err) = eval_export(&model, &data, &dir.path().join("ev"), &[]);
    assert!(ok, "{err}");
    let ev = read(dir.path().join("ev/summary.json"));
    assert_eq!(ev["method"], "inference-qst");
    assert_eq!(read(model.join("qst.json"))["side_config"]["num_attention_heads"], 1);
    // The same forward on the same NF4 base and side weights: the loss agrees to f32 rounding of the export.
    let (a, b) = (trained["dev_loss_after"].as_f64().unwrap(), ev["dev_loss_after"].as_f64().unwrap());
    assert!((a - b).abs() <= 1e-6 * a.abs(), "run {a} vs export {b}");
    let m = model.to_str().unwrap();
    let d = data.to_str().unwrap();
    expect_error(&["eval", "--model", m, "--task", "lm", "--data", d, "--bits", "8"], &["--bits", "QST export"]);
    // The export generates (base plus side network, recomputed per token); greedy twice gives the same text.
    let gen = || qtune(&["generate", "--model", m, "--prompt", "Q1: what is", "--max-new-tokens", "4"]);
    let ((ok, text, err), (_, again, _)) = (gen(), gen());
    assert!(ok && err.contains("no KV cache"), "{err}");
    assert!(text.starts_with("Q1: what is") && text == again, "{text:?} {again:?}");
    std::fs::write(model.join("side.safetensors"), b"not a safetensors file").unwrap();
    expect_error(&["eval", "--model", m, "--task", "lm", "--data", d], &["side.safetensors", "cannot read"]);
}

/// `--max-memory` refuses a run whose planned peak exceeds it, with the plan in the message, before loading.
#[test]
fn max_memory_refuses_a_run_that_does_not_fit() {
    let (_dir, data, out) = scratch();
    let mut args = train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap());
    args.extend(["--max-memory", "0.001"]);
    expect_error(&args, &["--max-memory 0.001 GiB", "planned to peak", "activations", "--recompute"]);
    assert!(!out.exists(), "a refused run must not create its output");
    let mut args = train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap());
    args.extend(["--max-memory", "4"]);
    let (ok, _, err) = qtune(&args);
    assert!(ok, "{err}");
}

/// `qtune train --plan` plans the run's own batches without training: the train phase is for the batch with the
/// most tokens of those `--dump-batches` writes, and it needs less than the full-row plan of `qtune plan` (the
/// rows are shorter than --max-seq-len; padding is never computed).
#[test]
fn train_plan_is_for_the_runs_own_batches() {
    let (dir, data, out) = scratch();
    let (plan, batches) = (dir.path().join("plan.json"), dir.path().join("batches.jsonl"));
    let mut args = train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap());
    args.extend(["--plan", plan.to_str().unwrap()]);
    let (ok, stdout, err) = qtune(&args);
    assert!(ok, "{err}");
    assert!(stdout.contains("| full-lion |") && stdout.contains("3 training batches"), "{stdout}");
    assert!(!out.exists(), "planning must not create the run's output");
    let mut args = train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap());
    args.extend(["--dump-batches", batches.to_str().unwrap()]);
    assert!(qtune(&args).0);
    let most_tokens = std::fs::read_to_string(&batches)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["lengths"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_u64().unwrap())
                .sum::<u64>()
        })
        .max()
        .unwrap();
    let own: serde_json::Value = serde_json::from_slice(&std::fs::read(&plan).unwrap()).unwrap();
    let lengths = own[0]["train_batch"]["lengths"].as_array().unwrap();
    assert_eq!(lengths.iter().map(|n| n.as_u64().unwrap()).sum::<u64>(), most_tokens);
    assert!(most_tokens < 2 * 32, "the test needs rows shorter than --max-seq-len");

    let full = dir.path().join("full.json");
    let f = full.to_str().unwrap();
    let args = ["plan", "--model", TINY, "--method", "full-lion", "--batch", "2", "--seq", "32", "--classes", "0"];
    assert!(qtune(&[&args[..], &["--json", f]].concat()).0);
    let full: serde_json::Value = serde_json::from_slice(&std::fs::read(&full).unwrap()).unwrap();
    let act = |p: &serde_json::Value| p[0]["counted"]["activations"].as_u64().unwrap();
    assert!(act(&own) < act(&full), "{} against {}", act(&own), act(&full));
    assert!(own[0]["peak"].as_u64() <= full[0]["peak"].as_u64());
}

/// `qtune plan` prints every bench method for a named config without any model file.
#[test]
fn plan_prints_every_method_for_a_named_config() {
    let (ok, out, err) = qtune(&["plan", "--model", "llama-2-7b", "--method", "all", "--batch", "4", "--seq", "512"]);
    assert!(ok, "{err}");
    for m in ["full-adamw", "qft", "qst", "qlora", "quzo-int4", "qat-int4", "mezo"] {
        assert!(out.contains(&format!("| {m} |")), "{m} missing: {out}");
    }
    expect_error(&["plan", "--model", "no-such.json"], &["no-such.json"]);
}

#[test]
fn unknown_task_and_method_are_named() {
    let (_dir, data, out) = scratch();
    let mut a = train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap());
    a[4] = "sst9";
    expect_error(&a, &["invalid value 'sst9' for '--task", "possible values: boolq, classify, choice"]);
    let mut a = train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap());
    a[8] = "full-sgd";
    expect_error(&a, &["invalid value 'full-sgd' for '--method", "possible values: full-adamw"]);
}

#[test]
fn missing_and_truncated_model_files_are_named() {
    let (dir, data, out) = scratch();
    let missing = dir.path().join("nope.gguf");
    expect_error(
        &train_args(missing.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap()),
        &["nope.gguf", "not found"],
    );
    // A copy of the tiny model with its weights cut short.
    let m = dir.path().join("model");
    copy_tiny(&m, &["config.json", "tokenizer.json"]);
    let w = std::fs::read(Path::new(TINY).join("model.safetensors")).unwrap();
    std::fs::write(m.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    expect_error(
        &train_args(m.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap()),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

/// A tokenizer or special token beyond the model's vocabulary, and a NaN in the weights, are refused when the model
/// is opened, naming the file (they used to surface as a bare index error, or as a NaN loss after training).
#[test]
fn vocabulary_overflow_and_non_finite_weights_are_named() {
    let (dir, data, out) = scratch();
    let m = dir.path().join("model");
    copy_tiny(&m, &["model.safetensors", "tokenizer.json"]);
    let cfg = std::fs::read_to_string(Path::new(TINY).join("config.json")).unwrap();
    let vocab: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let vocab = vocab["vocab_size"].as_u64().unwrap();
    let args = || train_args(m.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap());
    let with = |key: &str, v: &str| {
        let mut j: serde_json::Value = serde_json::from_str(&cfg).unwrap();
        j[key] = serde_json::from_str(v).unwrap();
        std::fs::write(m.join("config.json"), j.to_string()).unwrap();
    };
    with("eos_token_id", &format!("{vocab}"));
    expect_error(&args(), &["config.json", "eos_token_id", "outside the vocabulary"]);
    with("bos_token_id", "-1");
    expect_error(&args(), &["config.json", "bos_token_id (-1) is not a token id"]);
    with("bos_token_id", "4294967297");
    expect_error(&args(), &["config.json", "bos_token_id (4294967297) is not a token id"]);
    // The tokenizer's 256 tokens against a config that claims fewer embedding rows (the weights' shapes would be
    // refused later; the tokenizer is checked first, when the header is read).
    with("vocab_size", "200");
    expect_error(&args(), &["tokenizer.json", "ids reach 255, past the model's vocab_size of 200"]);
    std::fs::write(m.join("config.json"), &cfg).unwrap();

    // One NaN in the last tensor's bytes of the safetensors file.
    let mut w = std::fs::read(Path::new(TINY).join("model.safetensors")).unwrap();
    let n = w.len();
    w[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(m.join("model.safetensors"), &w).unwrap();
    expect_last_error(&args(), &["model.safetensors", "non-finite value", "corrupt"]);
}

/// A new run in a folder that holds an earlier one: the earlier checkpoint is refused without --resume, the earlier
/// run's other files are replaced (none of them passes for the new run's); an output that is one of the run's own
/// inputs is refused.
#[test]
fn earlier_runs_and_inputs_are_not_taken_for_outputs() {
    let (dir, data, out) = scratch();
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let (ok, _, err) = qtune(&[train_args(TINY, d, o), vec!["--save-state", "--export", "hf,gguf"]].concat());
    assert!(ok, "{err}");
    expect_last_error(&train_args(TINY, d, o), &["checkpoint.safetensors", "--resume continues that run"]);
    std::fs::remove_file(out.join("checkpoint.safetensors")).unwrap();
    // (Rows may also run past the model's 128 positions: said, not refused.)
    let mut again = train_args(TINY, d, o);
    again[20] = "200";
    let (ok, _, err) = qtune(&[again, vec!["--no-export", "--no-eval"]].concat());
    assert!(ok, "{err}");
    assert!(err.contains("held an earlier run"), "{err}");
    assert!(err.contains("--max-seq-len 200 is beyond the model's max_position_embeddings 128"), "{err}");
    for gone in ["model", "model.gguf", "predictions.jsonl"] {
        assert!(!out.join(gone).exists(), "{gone} of the earlier run is still there");
    }
    assert!(out.join("summary.json").exists() && out.join("log.jsonl").exists());

    // --dump-batches onto the data file; a run whose export would replace its own --model.
    let copy = dir.path().join("copy.jsonl");
    std::fs::copy(&data, &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    expect_last_error(
        &[train_args(TINY, copy.to_str().unwrap(), o), vec!["--dump-batches", copy.to_str().unwrap()]].concat(),
        &["--dump-batches", "an input of this run"],
    );
    assert_eq!(std::fs::read(&copy).unwrap(), before, "the data file was touched");
    let run = dir.path().join("in-place");
    std::fs::create_dir(&run).unwrap();
    let model = run.join("model");
    copy_tiny(&model, &["config.json", "model.safetensors", "tokenizer.json"]);
    expect_last_error(
        &train_args(model.to_str().unwrap(), d, run.to_str().unwrap()),
        &["which is (or holds) its input", "another --out"],
    );
    assert!(model.join("model.safetensors").exists());
    // A data file named as a run file in --out (a dev split saved as <out>/dev.jsonl).
    let proj = dir.path().join("proj");
    std::fs::create_dir(&proj).unwrap();
    std::fs::copy(&data, proj.join("dev.jsonl")).unwrap();
    let dev = proj.join("dev.jsonl");
    expect_last_error(
        &[train_args(TINY, d, proj.to_str().unwrap()), vec!["--dev-data", dev.to_str().unwrap()]].concat(),
        &["dev.jsonl", "which is (or holds) its input"],
    );
    assert!(dev.exists());
    // `export` onto a file it reads.
    expect_error(
        &[
            "export",
            model.to_str().unwrap(),
            "--format",
            "gguf",
            "--out",
            model.join("model.safetensors").to_str().unwrap(),
        ],
        &["model.safetensors", "is what the export reads"],
    );
}

#[test]
fn config_with_a_wrong_shape_is_named() {
    let (dir, data, out) = scratch();
    let m = dir.path().join("model");
    copy_tiny(&m, &["model.safetensors", "tokenizer.json"]);
    let cfg = std::fs::read_to_string(Path::new(TINY).join("config.json")).unwrap();
    std::fs::write(m.join("config.json"), cfg.replace("\"intermediate_size\": 160", "\"intermediate_size\": 128"))
        .unwrap();
    expect_error(
        &train_args(m.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap()),
        &["model.safetensors", "has shape", "128"],
    );
    std::fs::write(m.join("config.json"), cfg.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"))
        .unwrap();
    expect_error(
        &train_args(m.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap()),
        &["config.json", "multiple of num_key_value_heads"],
    );
}

#[test]
fn malformed_dataset_line_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = lm_data(dir.path());
    let mut text = std::fs::read_to_string(&data).unwrap();
    text = text.replacen("\n", "\n{\"prompt\": \"broken\n", 1);
    std::fs::write(&data, text).unwrap();
    let out = dir.path().join("run");
    expect_error(&train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap()), &["lm.jsonl:2", "malformed JSON"]);
}

#[test]
fn impossible_options_are_named() {
    let (_dir, data, out) = scratch();
    let mut a = train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap());
    a[22] = "0";
    expect_error(&a, &["--lr"]);
    let mut a = train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap());
    a[16] = "500";
    expect_error(&a, &["lm.jsonl", "splits ask for"]);
    for (flag, value, needle) in [
        ("--qst-start", "middle", "invalid value 'middle' for '--qst-start"),
        ("--alpha-lr-scale", "nan", "--alpha-lr-scale"),
    ] {
        let mut a = train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap());
        a[8] = "qst";
        a.extend([flag, value]);
        expect_error(&a, &[needle]);
    }
    expect_error(&["bench", "--out", out.to_str().unwrap(), "--peers", "no-such-peers"], &["no-such-peers"]);
    // An export the method cannot write is refused before training; a model file holds no adapter.
    let mut a = train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap());
    a.extend(["--export", "peft"]);
    expect_error(&a, &["--export peft", "full-lion trains no LoRA adapter"]);
    expect_error(&["export", TINY, "--format", "peft", "--out", out.to_str().unwrap()], &["no adapter/"]);
    expect_error(&["export", TINY, "--shard-size", "0", "--out", out.to_str().unwrap()], &["shard size"]);
    // A GGUF llama.cpp could not run as qtune does (a window shorter than the context) is refused before training.
    let mistral = _dir.path().join("mistral");
    copy_tiny(&mistral, &["model.safetensors", "tokenizer.json"]);
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(TINY).join("config.json")).unwrap()).unwrap();
    (cfg["model_type"], cfg["sliding_window"]) = ("mistral".into(), 4.into());
    std::fs::write(mistral.join("config.json"), cfg.to_string()).unwrap();
    let mut a = train_args(mistral.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap());
    a.extend(["--export", "gguf"]);
    expect_error(&a, &["--export gguf", "sliding_window 4"]);
    assert!(!out.exists(), "the run started");
    // An option the method would ignore is refused, by `train`, `plan` and (before any run starts) `bench`.
    let mut a = train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap());
    a.extend(["--side-r", "8"]);
    expect_error(&a, &["--side-r is not read by --method full-lion", "only by qst"]);
    expect_error(&["plan", "--method", "mezo", "--recompute"], &["--recompute", "--method mezo"]);
    expect_error(&["plan", "--method", "all", "--lora-r", "4"], &["--lora-r", "--method all"]);
    let bench_out = out.join("bench");
    expect_error(
        &["bench", "--out", bench_out.to_str().unwrap(), "--runs", "lora,mezo", "--", "--recompute"],
        &["bench run `mezo`", "--recompute"],
    );
    assert!(!bench_out.exists(), "bench started a run before checking them all");
    // Planning (--plan, --max-memory) checks the batch options before drawing a batch; so does `qtune plan`.
    for (i, value, extra, needle) in [
        (12, "0", "--plan", "--batch-size 0"),
        (12, "100000000000", "--plan", "at most 65536"),
        (14, "0", "--plan", "training split is empty"),
        (14, "0", "--max-memory", "training split is empty"),
    ] {
        let mut a = train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap());
        a[i] = value;
        a.extend(if extra == "--plan" { vec![extra] } else { vec![extra, "4"] });
        expect_error(&a, &[needle]);
    }
    expect_error(&["plan", "--batch", "100000000000000"], &["batch 100000000000000", "65536"]);
    // Numbers no run could use are refused by name at parse time, by `train` and `plan` alike.
    for (flag, value, method) in [
        ("--weight-decay", "nan", "full-lion"),
        ("--clip", "nan", "full-lion"),
        ("--outlier-fraction", "2", "qft"),
        ("--bits", "3", "quzo"),
        ("--max-memory", "nan", "full-lion"),
        ("--eval-batch-size", "0", "full-lion"),
    ] {
        let mut a = train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap());
        a[8] = method;
        a.extend([flag, value]);
        expect_error(&a, &[flag]);
        if !["--max-memory", "--eval-batch-size"].contains(&flag) {
            expect_error(&["plan", "--method", method, flag, value], &[flag]);
        }
    }
    // Options the task or the run would not read.
    for (extra, needle) in [
        (&["--labels", "0=a,1=b"][..], "--labels is not read by --task chat (only by classify)"),
        (&["--template", "{text}"][..], "--template is not read by --task chat"),
        (&["--eval-every", "1", "--no-eval"][..], "--eval-every"),
        (&["--eval-data", data.to_str().unwrap()][..], "is --data itself"),
    ] {
        let a = train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap());
        expect_last_error(&[a, extra.to_vec()].concat(), &[needle]);
    }
    expect_error(&["init", "--config", "smollm2-135m", "--std", "nan", "--out", out.to_str().unwrap()], &["--std NaN"]);
}

/// Every method trains end to end through the CLI on the tiny model, and `qtune bench` tabulates them.
#[test]
fn bench_runs_every_method() {
    let dir = tempfile::tempdir().unwrap();
    let data = lm_data(dir.path());
    let out = dir.path().join("bench");
    let (ok, stdout, err) = qtune(&[
        "bench",
        "--out",
        out.to_str().unwrap(),
        "--",
        "--model",
        TINY,
        "--task",
        "lm",
        "--data",
        data.to_str().unwrap(),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--train-size",
        "12",
        "--dev-size",
        "4",
        "--eval-size",
        "4",
        "--max-seq-len",
        "24",
        "--lr",
        "1e-3",
    ]);
    assert!(ok, "{err}");
    for (name, _) in qtune::bench::RUNS {
        assert!(stdout.contains(&format!("| {name} |")), "{name} missing from the table:\n{stdout}");
    }
    for f in ["results.md", "results.json", "loss.png", "memory.png"] {
        assert!(out.join(f).exists(), "{f}");
    }
}

/// `--save-state` leaves the training state after the last step, and resuming from it with no step left exports
/// the same weights bit for bit (QFT: INT8 codes, outliers and momentum travel through the file); a resume with
/// other options is refused.
#[test]
fn save_state_writes_a_state_that_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = lm_data(dir.path());
    let out = dir.path().join("qft");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let mut args = train_args(TINY, d, o);
    args[8] = "qft";
    let (ok, _, err) = qtune(&[args.clone(), vec!["--save-state"]].concat());
    assert!(ok, "{err}");
    assert!(out.join("checkpoint.safetensors").exists(), "--save-state wrote no state");
    let load =
        || candle_core::safetensors::load(out.join("model/model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let saved = load();
    // A resume with options that define another run is refused, naming each difference; one that changes only
    // what the run writes is not.
    let mut other = args.clone();
    other[12] = "3";
    let (ok, _, err) = qtune(&[other, vec!["--resume", "--warmup", "1"]].concat());
    assert!(!ok && err.contains("--batch-size: `2` when written, `3` now"), "{err}");
    assert!(err.contains("--warmup: `0` when written, `1` now") && !err.contains("--resume:"), "{err}");
    let mut shorter = args.clone();
    shorter[10] = "2";
    let (ok, _, err) = qtune(&[shorter, vec!["--resume"]].concat());
    assert!(!ok && err.contains("is at step 3, past --steps 2"), "{err}");
    // The same options spelled otherwise (a path with a trailing slash, 1e-3 as 0.001) are the same run.
    let (slashed, mut same) = (format!("{TINY}/"), args.clone());
    (same[2], same[22]) = (&slashed, "0.001");
    let (ok, _, err) = qtune(&[same, vec!["--resume", "--checkpoint-every", "5"]].concat());
    assert!(ok, "{err}");
    for (name, t) in load() {
        let d = (&t - &saved[&name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{name} differs after resuming the saved state");
    }
}

/// A run killed with SIGKILL at an arbitrary step and resumed from its last checkpoint ends with weights
/// bit-identical to an uninterrupted run with the same seed.
#[test]
fn sigkill_and_resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let data = lm_data(dir.path());
    let steps = "24";
    for method in ["full-lion", "qft", "qst", "quzo"] {
        let args = |out: &Path, extra: &[&str]| -> Vec<String> {
            let mut a: Vec<String> =
                train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap()).iter().map(|s| s.to_string()).collect();
            a[8] = method.into();
            a[10] = steps.into();
            a.push("--no-eval".into());
            if method == "quzo" {
                a.extend(["--eps".to_string(), "1e-2".into()]);
            }
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        let whole = dir.path().join(format!("{method}-whole"));
        let (ok, _, err) = qtune(&args(&whole, &[]).iter().map(|s| s.as_str()).collect::<Vec<_>>());
        assert!(ok, "{method}: {err}");
        let cut = dir.path().join(format!("{method}-cut"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_qtune"))
            .args(args(&cut, &["--checkpoint-every", "1"]))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let ckpt = cut.join("checkpoint.safetensors");
        let killed_at = loop {
            if let Ok(r) = qtune::checkpoint::StateReader::open(&ckpt) {
                let n = r.meta()["trainer"]["next_step"].as_u64().unwrap();
                if n >= 3 {
                    child.kill().unwrap(); // SIGKILL
                    break n;
                }
            }
            if child.try_wait().unwrap().is_some() {
                panic!("{method}: the run finished before it could be killed");
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        child.wait().unwrap();
        assert!(killed_at < 24, "{method}: killed after the last step");
        let (ok, _, err) =
            qtune(&args(&cut, &["--checkpoint-every", "1", "--resume"]).iter().map(|s| s.as_str()).collect::<Vec<_>>());
        assert!(ok, "{method}: resume failed: {err}");
        let load = |d: &Path| {
            let f = if d.join("model/model.safetensors").exists() {
                d.join("model/model.safetensors")
            } else {
                d.join("model/side.safetensors")
            };
            candle_core::safetensors::load(f, &candle_core::Device::Cpu).unwrap()
        };
        let (a, b) = (load(&whole), load(&cut));
        assert_eq!(a.len(), b.len());
        for (name, t) in &a {
            let d = (t - &b[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(d, 0.0, "{method}: {name} differs after resume (killed at step {killed_at})");
        }
        let log = std::fs::read_to_string(cut.join("log.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 24, "{method}: the log must have one line per step");
    }
}

/// SIGINT (Ctrl-C) checkpoints after the current step and exits with a message; `--resume` then finishes the run,
/// and its weights equal an uninterrupted run's, bit for bit.
#[test]
fn sigint_checkpoints_and_resume_finishes_identically() {
    let dir = tempfile::tempdir().unwrap();
    let data = lm_data(dir.path());
    let args = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> =
            train_args(TINY, data.to_str().unwrap(), out.to_str().unwrap()).iter().map(|s| s.to_string()).collect();
        a[8] = "qft".into();
        a[10] = "200".into();
        a.push("--no-eval".into());
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let whole = dir.path().join("whole");
    let (ok, _, err) = qtune(&args(&whole, &[]).iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let cut = dir.path().join("cut");
    let child = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args(args(&cut, &[]))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = cut.join("log.jsonl");
    while std::fs::read_to_string(&log).map_or(0, |l| l.lines().count()) < 2 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the interrupted run must not report success");
    assert!(err.contains("interrupted after step") && err.contains("--resume"), "{err}");
    assert!(cut.join("checkpoint.safetensors").exists());
    assert!(!cut.join("model").exists(), "an interrupted run must not export");
    let summary = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(cut.join("summary.json")).unwrap()).unwrap()
    };
    let resume = |extra: &[&str]| {
        let (ok, _, err) = qtune(&args(&cut, extra).iter().map(|s| s.as_str()).collect::<Vec<_>>());
        assert!(ok, "resume failed: {err}");
    };
    // A kill in mid-write leaves a cut last line: resume drops it (it is past the checkpoint).
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, br#"{"step":9999,"loss":0.12"#).unwrap();
    drop(f);
    resume(&["--resume", "--checkpoint-every", "200"]);
    let first = summary();
    // Resumed once more from the checkpoint of its last step (as when a run dies in its final evaluation), it runs
    // no step, and its summary is still the whole run's, from the log.
    resume(&["--resume"]);
    let again = summary();
    for key in ["step_time_s", "tokens_per_s", "final_loss", "breakdown"] {
        assert!(!first[key].is_null() && first[key] == again[key], "{key}: {} then {}", first[key], again[key]);
    }
    // The log is the whole run's: every step once, in order; the summary's peak RSS is at least every step's RSS
    // sample, the earlier processes' included.
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (0..200).collect::<Vec<u64>>());
    let max_rss = lines.iter().map(|l| l["rss_bytes"].as_u64().unwrap()).max().unwrap();
    assert!(again["peak_rss_bytes"].as_u64().unwrap() >= max_rss, "{again}");
    assert_eq!(again["final_loss"], lines[199]["loss"]);
    let load = |d: &Path| {
        candle_core::safetensors::load(d.join("model/model.safetensors"), &candle_core::Device::Cpu).unwrap()
    };
    let (a, b) = (load(&whole), load(&cut));
    for (name, t) in &a {
        let d = (t - &b[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{name} differs after an interrupt and resume");
    }
}

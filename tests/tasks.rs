//! Every kind of task end to end through the `qtune` binary on the tiny fixture model: classification from a CSV,
//! multiple choice from the generic jsonl, chat with a template file, separate dev/eval files, and evaluation during
//! training with the best state, early stopping and resume. Each run must finish, record what it promises, and
//! bad data must end in one line naming the file and line.
use std::path::Path;
use std::process::Command;

mod common;

const TINY: &str = "tests/fixtures/tiny_llama";

fn qtune(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qtune")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into())
}

fn summary(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap()
}

/// Trains full-lion on `task` with `extra` options (4 steps at lr 1e-3 unless they say), into `out`.
fn train(task: &str, out: &Path, extra: &[&str]) -> (bool, String) {
    let mut a = vec!["train", "--model", TINY, "--task", task, "--method", "full-lion"];
    for (opt, default) in [("--steps", "4"), ("--lr", "1e-3")] {
        if !extra.contains(&opt) {
            a.extend([opt, default]);
        }
    }
    a.extend(["--batch-size", "2", "--max-seq-len", "48", "--out", out.to_str().unwrap()]);
    a.extend(extra);
    qtune(&a)
}

/// A CSV classification with a template and label words, dev and eval from their own file: the run reports
/// accuracy against the majority class, and a label outside the classes names its line.
#[test]
fn classification_from_csv_with_separate_eval_file() {
    let dir = tempfile::tempdir().unwrap();
    let rows = |n: usize| -> String {
        let mut s = String::from("text,label\n");
        for i in 0..n {
            s += &format!("\"item {i}, said x\",{}\n", if i % 3 == 0 { "neg" } else { "pos" });
        }
        s
    };
    let (train_csv, eval_csv) = (dir.path().join("train.csv"), dir.path().join("eval.csv"));
    std::fs::write(&train_csv, rows(20)).unwrap();
    std::fs::write(&eval_csv, rows(9)).unwrap();
    let out = dir.path().join("run");
    let args = [
        "--data",
        train_csv.to_str().unwrap(),
        "--eval-data",
        eval_csv.to_str().unwrap(),
        "--template",
        "{text}:",
        "--labels",
        "neg=n,pos=p",
        "--no-label-space",
        "--train-size",
        "12",
        "--dev-size",
        "4",
        "--eval-size",
        "9",
    ];
    let (ok, err) = train("classify", &out, &args);
    assert!(ok, "{err}");
    let s = summary(&out);
    assert_eq!(s["task"], "classify");
    // The eval file has 3 neg and 6 pos rows: the majority class is right 6 times in 9.
    assert!((s["eval_majority"].as_f64().unwrap() - 6.0 / 9.0).abs() < 1e-12, "{s}");
    assert!(err.contains("eval: accuracy") && err.contains("majority class"), "{err}");
    // Two classes on one token; a label field no row has (the pool's note says why it is empty).
    let mut same = args;
    same[7] = "neg=n,pos=n";
    let (ok, err) = train("classify", &dir.path().join("same"), &same);
    assert!(!ok && err.contains("are the same token"), "{err}");
    let (ok, err) = train("classify", &dir.path().join("field"), &[&args[..], &["--label-field", "nosuch"]].concat());
    assert!(!ok && err.contains("has 0 usable rows (kept 0 rows, skipped 20 unlabelled)"), "{err}");
    std::fs::write(&eval_csv, "text,label\na,pos\nb,maybe\n").unwrap();
    let (ok, err) = train("classify", &dir.path().join("bad"), &args);
    assert!(!ok && err.contains("eval.csv:3") && err.contains("`maybe`"), "{err}");
}

/// Generic multiple choice: trains on cross-entropy over the options, reports accuracy and the length-normalized
/// accuracy, and writes each example's predicted option.
#[test]
fn multiple_choice_trains_and_scores_options() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::choice_data(dir.path(), 16);
    let out = dir.path().join("run");
    let sizes = ["--train-size", "8", "--dev-size", "4", "--eval-size", "4"];
    let (ok, err) = train("choice", &out, &[&["--data", data.to_str().unwrap()][..], &sizes].concat());
    assert!(ok, "{err}");
    let s = summary(&out);
    assert!(s["eval_acc_norm"].as_f64().is_some(), "{s}");
    let preds = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
    assert_eq!(preds.lines().count(), 8, "dev and eval, 4 each");
    assert!(preds.lines().all(|l| l.contains("\"predicted\"")));
}

/// Chat data through a template file: the run trains and evaluates; a model without a template and no
/// --chat-template is refused at the first line that needs one.
#[test]
fn chat_with_a_template_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("chat.jsonl");
    let rows: Vec<String> = (0..12)
        .map(|i| {
            format!(
                r#"{{"messages": [{{"role": "user", "content": "n{i}?"}}, {{"role": "assistant", "content": "{}"}}, {{"role": "user", "content": "again"}}, {{"role": "assistant", "content": "ok"}}]}}"#,
                i + 1
            )
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let tmpl = dir.path().join("t.jinja");
    std::fs::write(&tmpl, "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}").unwrap();
    let sizes = ["--train-size", "8", "--dev-size", "2", "--eval-size", "2"];
    let d = data.to_str().unwrap();
    let out = dir.path().join("run");
    let (ok, err) =
        train("chat", &out, &[&["--data", d, "--chat-template", tmpl.to_str().unwrap()][..], &sizes].concat());
    assert!(ok, "{err}");
    assert!(summary(&out)["eval_loss"].as_f64().unwrap().is_finite());
    let (ok, err) = train("chat", &dir.path().join("no"), &[&["--data", d][..], &sizes].concat());
    assert!(!ok && err.contains("chat.jsonl:1") && err.contains("no chat template"), "{err}");
}

/// --eval-every writes a dev line per evaluation and keeps the best state; --early-stop stops; a run trained in two
/// halves (checkpoint, then --resume) ends with the same dev record as one trained at once.
#[test]
fn eval_every_keeps_the_best_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("lm.jsonl");
    let rows: Vec<String> =
        (0..24).map(|i| format!(r#"{{"prompt": "Q{i}: {i} plus one?", "completion": " {}"}}"#, i + 1)).collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let d = data.to_str().unwrap();
    // A constant learning rate, so a run of 2 steps then 2 more is the run of 4 (the schedule is by total steps).
    let base = [
        "--data",
        d,
        "--train-size",
        "12",
        "--dev-size",
        "4",
        "--eval-size",
        "4",
        "--eval-every",
        "2",
        "--schedule",
        "constant",
    ];
    let full = dir.path().join("full");
    let (ok, err) = train("chat", &full, &base);
    assert!(ok, "{err}");
    let dev = std::fs::read_to_string(full.join("dev.jsonl")).unwrap();
    let steps: Vec<u64> =
        dev.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 2, 4]);
    assert!(full.join("best.safetensors").exists());
    let best = summary(&full)["best_step"].as_u64().unwrap();
    assert!(best == 2 || best == 4);
    // The same run in two halves: checkpoint at step 2, then resume.
    let half = dir.path().join("half");
    let mut first = base.to_vec();
    first.extend(["--steps", "2", "--checkpoint-every", "2"]);
    let (ok, err) = train("chat", &half, &first);
    assert!(ok, "{err}");
    let mut second = base.to_vec();
    second.extend(["--steps", "4", "--checkpoint-every", "2", "--resume"]);
    let (ok, err) = train("chat", &half, &second);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(half.join("dev.jsonl")).unwrap(), dev);
    // Patience 1 with a dev loss that cannot improve at lr 0-ish: stops after the second evaluation.
    let stop = dir.path().join("stop");
    let mut es = base.to_vec();
    es.extend(["--early-stop", "1", "--steps", "40", "--lr", "1e-12"]);
    let (ok, err) = train("chat", &stop, &es);
    assert!(ok, "{err}");
    assert_eq!(summary(&stop)["stopped_early_at"].as_u64(), Some(4), "{err}");
}

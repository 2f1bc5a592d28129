//! The training loop shared by every method: seeded batches, LR schedule, evaluation before and after, a progress
//! bar (loss, tokens/s, memory), a jsonl run log, the memory report, `summary.json`, and the HF export.
use super::memory::{self, Breakdown};
use super::schedule::Schedule;
use crate::data::{make_batch, Batcher, Splits, TaskData};
use crate::methods::Method;
use crate::model::{Batch, Llama, Output, Tok};
use crate::{Error, Result};
use candle_core::{Device, D};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub eval_batch_size: usize,
    pub schedule: Schedule,
    pub seed: u64,
    pub out: PathBuf,
    pub pad_id: u32,
    /// Skip the evaluations (tests and benchmarks that only time steps).
    pub skip_eval: bool,
    /// Write the method's training state to `<out>/checkpoint.safetensors` at the end.
    pub save_state: bool,
    /// Also checkpoint every this many steps (0: never).
    pub checkpoint_every: usize,
    /// Continue from `<out>/checkpoint.safetensors`.
    pub resume: bool,
}

/// Set by SIGINT: the loop checkpoints after the current step and stops.
pub static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The file a run checkpoints to.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    out.join("checkpoint.safetensors")
}

/// Where a checkpointed run stands: the next step, the data order and position, and the figures the summary needs.
#[derive(serde::Serialize, serde::Deserialize)]
struct LoopState {
    next_step: usize,
    batcher: Batcher,
    dev_before: Option<f64>,
    /// Absent in checkpoints written before the summary recorded losses.
    #[serde(default)]
    dev_loss_before: Option<f64>,
    skipped: usize,
}

fn save_checkpoint(method: &dyn Method, out: &Path, st: &LoopState) -> Result<()> {
    let mut w = crate::checkpoint::StateWriter::new(method.name());
    w.meta("trainer", st);
    method.save_state(&mut w)?;
    w.write(&checkpoint_path(out))
}

/// One example's answer on a classification split. `key` (a hash of the prompt's tokens and the label) names the
/// example across runs, so two runs' answers can be paired on the examples they share ([`crate::report::paired`]).
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Prediction {
    /// The example's index in its split.
    pub example: usize,
    pub key: String,
    pub label: u32,
    pub predicted: u32,
    /// The example's cross-entropy over the label words.
    pub loss: f64,
    /// A model with a side branch (QST): the branch's part of the example's label-word logits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side: Option<Vec<f32>>,
}

/// FNV-1a over the prompt's tokens and the label, as 16 hex digits (a JSON number would lose bits in some readers).
fn example_key(prompt: &[u32], label: u32) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in prompt.iter().chain(std::iter::once(&label)).flat_map(|t| t.to_le_bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Accuracy and mean loss of a model on one split.
#[derive(Clone, Debug, Serialize)]
pub struct EvalResult {
    /// Classification: argmax over the label words. Causal LM: next-token accuracy on completion tokens.
    pub accuracy: f64,
    /// Mean cross-entropy of the targets (less noisy than the accuracy on a few hundred examples).
    pub loss: f64,
    /// Classification: the accuracy of always answering the split's most frequent class.
    pub majority: Option<f64>,
    pub examples: usize,
    pub tokens: usize,
    pub seconds: f64,
    /// Classification by a model with a side branch (QST): Σ‖side‖ / Σ‖rest‖ over the examples, each a row of
    /// label-word logits centred over the classes (softmax ignores a common shift): how far the side branch moves
    /// the answer against the frozen base (with two label words, the ratio of their |logit margins|).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub side_share: Option<f64>,
    /// Classification: every example's answer, in split order (empty for causal LM, whose answers are tokens).
    #[serde(skip)]
    pub predictions: Vec<Prediction>,
}

/// The batches evaluation reads `data` in, each with its examples' indices: sorted by prompt length, so a batch's
/// rows are about as long as each other.
fn eval_batches(
    data: &TaskData,
    batch_size: usize,
    max_len: usize,
    pad: u32,
    dev: Device,
) -> impl Iterator<Item = Result<(Vec<usize>, Batch)>> + '_ {
    let mut order: Vec<usize> = (0..data.examples.len()).collect();
    order.sort_by_key(|&i| data.examples[i].prompt.len());
    let chunks: Vec<Vec<usize>> = order.chunks(batch_size.max(1)).map(<[usize]>::to_vec).collect();
    chunks.into_iter().map(move |chunk| {
        let exs: Vec<_> = chunk.iter().map(|&i| &data.examples[i]).collect();
        let batch = make_batch(&exs, data.classes.as_deref(), max_len, pad, &dev)?;
        Ok((chunk, batch))
    })
}

/// Evaluates an inference `forward` (a model's, or a method's own such as QST's base plus side network) on `data`;
/// examples are batched by length so little compute goes to padding.
pub fn evaluate(
    forward: &dyn Fn(&Batch) -> Result<Output>,
    data: &TaskData,
    batch_size: usize,
    max_len: usize,
    pad: u32,
    dev: &Device,
) -> Result<EvalResult> {
    let t0 = Instant::now();
    let (mut correct, mut count, mut loss_sum, mut tokens) = (0usize, 0usize, 0f64, 0usize);
    let mut class_counts = vec![0usize; data.classes.as_ref().map_or(0, |c| c.len())];
    let mut predictions = Vec::new();
    let mut side_norms: Option<(f64, f64)> = None; // (Σ‖side‖, Σ‖rest‖), centred rows
    for b in eval_batches(data, batch_size, max_len, pad, dev.clone()) {
        let (chunk, batch) = b?;
        let out = forward(&batch)?;
        let pred: Vec<u32> = out.logits.argmax(D::Minus1)?.to_vec1()?;
        let n = batch.targets.labels.len();
        correct += pred.iter().zip(&batch.targets.labels).filter(|(p, l)| p == l).count();
        if data.classes.is_some() {
            // One loss position per example: row k of the [n, C] label-word logits is example chunk[k].
            let logits: Vec<Vec<f32>> = out.logits.to_vec2()?;
            let side: Option<Vec<Vec<f32>>> = out.side.as_ref().map(|s| s.to_vec2()).transpose()?;
            if let Some(side) = &side {
                // ‖v − mean(v)‖ of a row of logits.
                let centred_norm = |v: &[f64]| {
                    let mean = v.iter().sum::<f64>() / v.len() as f64;
                    v.iter().map(|x| (x - mean).powi(2)).sum::<f64>().sqrt()
                };
                let (s, r) = side_norms.get_or_insert((0.0, 0.0));
                for (row, side) in logits.iter().zip(side) {
                    let sv: Vec<f64> = side.iter().map(|&x| x as f64).collect();
                    let rv: Vec<f64> = row.iter().zip(side).map(|(&l, &x)| l as f64 - x as f64).collect();
                    *s += centred_norm(&sv);
                    *r += centred_norm(&rv);
                }
            }
            for (k, &i) in chunk.iter().enumerate() {
                let (row, label) = (&logits[k], batch.targets.labels[k]);
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
                predictions.push(Prediction {
                    example: i,
                    key: example_key(&data.examples[i].prompt, label),
                    label,
                    predicted: pred[k],
                    loss: lse - row[label as usize] as f64,
                    side: side.as_ref().map(|s| s[k].clone()),
                });
            }
        }
        for &l in &batch.targets.labels {
            if let Some(c) = class_counts.get_mut(l as usize) {
                *c += 1;
            }
        }
        count += n;
        loss_sum += out.loss as f64 * n as f64;
        tokens += batch.real_tokens();
    }
    Ok(EvalResult {
        accuracy: correct as f64 / count.max(1) as f64,
        loss: loss_sum / count.max(1) as f64,
        majority: class_counts.iter().max().filter(|_| count > 0).map(|&m| m as f64 / count as f64),
        examples: data.examples.len(),
        tokens,
        seconds: t0.elapsed().as_secs_f64(),
        side_share: side_norms.map(|(s, r)| s / r),
        predictions: {
            predictions.sort_by_key(|p| p.example);
            predictions
        },
    })
}

/// Writes `<out>/predictions.jsonl`: one line per example of each evaluated classification split (`split` is
/// "dev" or "eval"; the dev split as it stands after training). Nothing is written when there is none.
pub fn write_predictions(out: &Path, splits: &[(&str, Option<&EvalResult>)]) -> Result<()> {
    let mut text = Vec::new();
    for (split, r) in splits {
        for p in r.iter().flat_map(|r| &r.predictions) {
            let mut line = serde_json::to_value(p).map_err(|e| Error::Msg(e.to_string()))?;
            line["split"] = (*split).into();
            text.extend(serde_json::to_vec(&line).map_err(|e| Error::Msg(e.to_string()))?);
            text.push(b'\n');
        }
    }
    if text.is_empty() {
        return Ok(());
    }
    crate::io::write_bytes_atomic(&out.join("predictions.jsonl"), &text)
}

/// "0.6150 (loss 0.6641; majority class 0.6180)": accuracy and loss, and for a classification split the accuracy a
/// model needs to beat to have learned more than the label prior; "none (no examples)" for an empty split.
pub fn describe(r: &EvalResult) -> String {
    if r.examples == 0 {
        return "none (no examples)".into();
    }
    let majority = r.majority.map_or(String::new(), |m| format!("; majority class {m:.4}"));
    let side = r.side_share.map_or(String::new(), |s| format!("; side branch {:.2}% of the logit spread", 100.0 * s));
    format!("{:.4} (loss {:.4}{majority}{side})", r.accuracy, r.loss)
}

/// One line of the run log.
#[derive(Serialize, serde::Deserialize)]
struct LogLine {
    step: usize,
    loss: f32,
    lr: f64,
    grad_norm: Option<f64>,
    applied: bool,
    tokens: usize,
    step_time_s: f64,
    rss_bytes: usize,
    memory: Breakdown,
    #[serde(skip_serializing_if = "Option::is_none")]
    changed_fraction: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    changed_int8_fraction: Option<f64>,
}

#[derive(Serialize)]
pub struct Summary {
    pub method: String,
    pub model: String,
    pub task: String,
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub lr: f64,
    pub seed: u64,
    pub params: usize,
    /// Parameters that take part in a token's matmuls (the embedding table is a lookup; a label-word task reads
    /// only a few LM-head rows): what FLOPs per token are counted from.
    pub matmul_params: usize,
    pub trainable_params: usize,
    pub peak_rss_bytes: usize,
    pub model_state_bytes: usize,
    pub breakdown: Breakdown,
    pub bytes_per_param: f64,
    pub step_time_s: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub dev_accuracy_before: Option<f64>,
    pub dev_accuracy_after: Option<f64>,
    pub eval_accuracy: Option<f64>,
    /// The splits' mean cross-entropies and majority-class accuracies (classification).
    pub dev_loss_before: Option<f64>,
    pub dev_loss_after: Option<f64>,
    pub eval_loss: Option<f64>,
    pub dev_majority: Option<f64>,
    pub eval_majority: Option<f64>,
    /// QST on label words: the side branch's share of the logits after training ([`EvalResult::side_share`]).
    pub dev_side_share: Option<f64>,
    pub eval_side_share: Option<f64>,
    pub final_loss: Option<f32>,
    pub skipped_steps: usize,
    pub machine: String,
    /// The command line this process was started with (`qtune train ...`), to re-run or re-plan the run.
    pub command: Vec<String>,
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{} threads, {cpu}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// Reads a run's `log.jsonl` for `--resume`. A last line that does not parse was cut by a kill in mid-write: it is
/// a step after the checkpoint (the checkpoint is written after its step's line), so it is dropped; any other bad
/// line is an error naming it.
fn read_log(path: &Path) -> Result<Vec<LogLine>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let rows: Vec<(usize, &str)> = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
    let mut kept = Vec::with_capacity(rows.len());
    for (k, &(i, line)) in rows.iter().enumerate() {
        match serde_json::from_str::<LogLine>(line) {
            Ok(l) => kept.push(l),
            Err(e) if k + 1 == rows.len() && !text.ends_with('\n') => {
                eprintln!("note: {}:{}: dropping a cut last line ({e})", path.display(), i + 1)
            }
            Err(e) => return Err(Error::line(path, i + 1, format!("not a step line: {e}"))),
        }
    }
    Ok(kept)
}

/// Trains `method` on `splits` and writes `<out>/{summary.json, log.jsonl, model/}`.
pub fn train(
    model: &Llama,
    method: &mut dyn Method,
    splits: &Splits,
    tok: Option<&Tok>,
    model_name: &str,
    cfg: &TrainConfig,
) -> Result<Summary> {
    if cfg.steps == 0 && !cfg.skip_eval {
        eprintln!("note: --steps 0: evaluating only");
    }
    if (cfg.save_state || cfg.checkpoint_every > 0 || cfg.resume) && !method.saves_state() {
        return Err(Error::Option(format!(
            "{} cannot save its training state yet (--save-state, --checkpoint-every, --resume)",
            method.name()
        )));
    }
    check_batching(splits, cfg)?;
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::file(&cfg.out, format!("cannot create: {e}")))?;
    let dev = Device::Cpu;
    // An empty split (--dev-size 0, --eval-size 0) is not evaluated.
    let eval = |data: &TaskData, m: &dyn Method| -> Result<Option<EvalResult>> {
        if data.examples.is_empty() {
            return Ok(None);
        }
        evaluate(&|b| m.forward(model, b), data, cfg.eval_batch_size, cfg.max_seq_len, cfg.pad_id, &dev).map(Some)
    };
    let mut resumed = None;
    if cfg.resume {
        let path = checkpoint_path(&cfg.out);
        let r = crate::checkpoint::StateReader::open(&path)?;
        if r.meta()["method"].as_str() != Some(method.name()) {
            return Err(Error::file(
                &path,
                format!("is a checkpoint of `{}`, not `{}`", r.meta()["method"], method.name()),
            ));
        }
        let st: LoopState = serde_json::from_value(r.meta()["trainer"].clone())
            .map_err(|e| Error::file(&path, format!("trainer state: {e}")))?;
        if st.batcher.n != splits.train.examples.len() {
            return Err(Error::file(&path, "was written for another training split (--train-size, --seed)"));
        }
        method.load_state(&r)?;
        eprintln!("resuming from {} at step {}", path.display(), st.next_step);
        resumed = Some(st);
    }
    let dev_before = match &resumed {
        Some(st) => st.dev_before.map(|accuracy| EvalResult {
            accuracy,
            loss: st.dev_loss_before.unwrap_or(f64::NAN),
            majority: None,
            examples: 0,
            tokens: 0,
            seconds: 0.0,
            side_share: None,
            predictions: Vec::new(),
        }),
        None if cfg.skip_eval => None,
        None => eval(&splits.dev, method)?,
    };
    if let (Some(r), None) = (&dev_before, &resumed) {
        eprintln!(
            "dev accuracy before: {:.4} (loss {:.4}, {} examples, {:.0} tok/s)",
            r.accuracy,
            r.loss,
            r.examples,
            r.tokens as f64 / r.seconds
        );
    }
    let log_path = cfg.out.join("log.jsonl");
    let first_step = resumed.as_ref().map_or(0, |st| st.next_step);
    // On resume the log keeps the lines of the steps before the checkpoint (later ones were lost with the run), and
    // the summary counts them: its step time, throughput, memory and peak RSS are the whole run's, not the tail's.
    let kept: Vec<LogLine> = match &resumed {
        Some(_) if log_path.exists() => read_log(&log_path)?.into_iter().filter(|l| l.step < first_step).collect(),
        _ => Vec::new(),
    };
    // The kept lines go to a new file that replaces the old one whole, so a resume that is itself interrupted here
    // still leaves the earlier steps' lines behind.
    let tmp = cfg.out.join("log.jsonl.tmp");
    let mut log = std::fs::File::create(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
    let mut write_line = |l: &LogLine| -> Result<()> {
        Ok(writeln!(log, "{}", serde_json::to_string(l).map_err(|e| Error::Msg(e.to_string()))?)?)
    };
    for l in &kept {
        write_line(l)?;
    }
    std::fs::rename(&tmp, &log_path).map_err(|e| Error::file(&log_path, format!("cannot replace: {e}")))?;
    let bar = indicatif::ProgressBar::new(cfg.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .expect("valid template"),
    );
    let mut batcher =
        resumed.as_ref().map_or_else(|| Batcher::new(splits.train.examples.len(), cfg.seed), |st| st.batcher.clone());
    let mut times: Vec<f64> = kept.iter().map(|l| l.step_time_s).collect();
    let mut tok_rates: Vec<f64> = kept.iter().map(|l| l.tokens as f64 / l.step_time_s).collect();
    let mut peak = kept.iter().fold(method.state_bytes(), |p, l| p.max(l.memory));
    // The earlier process's own peak died with it; its per-step RSS samples are a lower bound of that peak.
    let kept_rss = kept.iter().map(|l| l.rss_bytes).max().unwrap_or(0);
    let (mut last_loss, mut skipped) = (kept.last().map(|l| l.loss), resumed.as_ref().map_or(0, |st| st.skipped));
    bar.set_position(first_step as u64);
    for step in first_step..cfg.steps {
        let micro = next_micro_batches(&mut batcher, splits, cfg)?;
        let tokens: usize = micro.iter().map(|b| b.real_tokens()).sum();
        let lr = cfg.schedule.lr(step);
        let t0 = Instant::now();
        let stats = method.step(model, &micro, lr)?;
        let dt = t0.elapsed().as_secs_f64();
        times.push(dt);
        tok_rates.push(tokens as f64 / dt);
        peak = peak.max(stats.memory);
        if !stats.applied {
            skipped += 1;
        }
        last_loss = Some(stats.loss);
        let rss = memory::rss_bytes();
        let line = LogLine {
            step,
            loss: stats.loss,
            lr,
            grad_norm: stats.grad_norm,
            applied: stats.applied,
            tokens,
            step_time_s: dt,
            rss_bytes: rss,
            memory: stats.memory,
            changed_fraction: stats.changed_fraction,
            changed_int8_fraction: stats.changed_int8_fraction,
        };
        write_line(&line)?;
        bar.set_message(format!(
            "loss {:.4} | {:.0} tok/s | rss {} | lr {lr:.2e}{}",
            stats.loss,
            tokens as f64 / dt,
            memory::human(rss),
            if stats.applied { "" } else { " | skipped (non-finite)" }
        ));
        bar.inc(1);
        let interrupted = INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst);
        let due = cfg.checkpoint_every > 0 && (step + 1) % cfg.checkpoint_every == 0;
        if due || interrupted {
            let st = LoopState {
                next_step: step + 1,
                batcher: batcher.clone(),
                dev_before: dev_before.as_ref().map(|r| r.accuracy),
                dev_loss_before: dev_before.as_ref().map(|r| r.loss),
                skipped,
            };
            save_checkpoint(method, &cfg.out, &st)?;
        }
        if interrupted {
            bar.abandon();
            return Err(Error::Msg(format!(
                "interrupted after step {step}: checkpoint written to {}; continue with --resume",
                checkpoint_path(&cfg.out).display()
            )));
        }
    }
    bar.finish();
    let (dev_after, eval_res) =
        if cfg.skip_eval { (None, None) } else { (eval(&splits.dev, method)?, eval(&splits.eval, method)?) };
    if let Some(d) = &dev_after {
        eprintln!("dev accuracy after: {}", describe(d));
    }
    if let Some(e) = &eval_res {
        eprintln!("eval accuracy: {}", describe(e));
    }
    let params = model.cfg.num_params();
    let peak_rss = memory::peak_rss_bytes().max(kept_rss);
    eprint!("{}", memory::report(&peak, params, peak_rss));
    let summary = Summary {
        method: method.name().into(),
        model: model_name.into(),
        task: splits.task.clone(),
        steps: cfg.steps,
        batch_size: cfg.batch_size,
        grad_accum: cfg.grad_accum,
        max_seq_len: cfg.max_seq_len,
        lr: cfg.schedule.peak,
        seed: cfg.seed,
        params,
        matmul_params: params
            - if splits.train.classes.is_some() || !model.cfg.tie_word_embeddings {
                model.cfg.vocab_size * model.cfg.hidden_size
            } else {
                0
            },
        trainable_params: method.trainable_params(),
        peak_rss_bytes: peak_rss,
        model_state_bytes: peak.model_state(),
        breakdown: peak,
        bytes_per_param: peak.model_state() as f64 / params as f64,
        step_time_s: median(&mut times),
        tokens_per_s: median(&mut tok_rates),
        dev_accuracy_before: dev_before.as_ref().map(|r| r.accuracy),
        dev_accuracy_after: dev_after.as_ref().map(|r| r.accuracy),
        eval_accuracy: eval_res.as_ref().map(|r| r.accuracy),
        dev_loss_before: dev_before.as_ref().map(|r| r.loss).filter(|l| l.is_finite()),
        dev_loss_after: dev_after.as_ref().map(|r| r.loss),
        eval_loss: eval_res.as_ref().map(|r| r.loss),
        dev_majority: dev_after.as_ref().and_then(|r| r.majority),
        eval_majority: eval_res.as_ref().and_then(|r| r.majority),
        dev_side_share: dev_after.as_ref().and_then(|r| r.side_share),
        eval_side_share: eval_res.as_ref().and_then(|r| r.side_share),
        final_loss: last_loss,
        skipped_steps: skipped,
        machine: machine(),
        command: std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect(),
    };
    write_summary(&cfg.out, &summary)?;
    write_predictions(&cfg.out, &[("dev", dev_after.as_ref()), ("eval", eval_res.as_ref())])?;
    if cfg.steps > 0 {
        method.export(&model.cfg, &cfg.out.join("model"), tok, model_name)?;
    }
    Ok(summary)
}

/// The micro-batches of the next step, as training draws them.
pub fn next_micro_batches(batcher: &mut Batcher, splits: &Splits, cfg: &TrainConfig) -> Result<Vec<Batch>> {
    (0..cfg.grad_accum)
        .map(|_| {
            let idx = batcher.next_indices(cfg.batch_size);
            let exs: Vec<_> = idx.iter().map(|&i| &splits.train.examples[i]).collect();
            make_batch(&exs, splits.train.classes.as_deref(), cfg.max_seq_len, cfg.pad_id, &Device::Cpu)
        })
        .collect()
}

/// Writes the exact batches a training run with `cfg` would use, one jsonl line per micro-batch
/// (`step`, `micro`, `ids`, `lengths`, `positions`, `classes`, `labels`), so other tools (the PyTorch peers of the
/// benchmark) can train on the same data.
pub fn dump_batches(splits: &Splits, cfg: &TrainConfig, path: &Path) -> Result<()> {
    check_batching(splits, cfg)?;
    let mut batcher = Batcher::new(splits.train.examples.len(), cfg.seed);
    crate::io::write_atomic(path, |f| {
        for step in 0..cfg.steps {
            for (k, b) in next_micro_batches(&mut batcher, splits, cfg)?.iter().enumerate() {
                let line = serde_json::json!({
                    "step": step, "micro": k, "ids": b.ids.to_vec2::<u32>()?, "lengths": b.lengths,
                    "positions": b.targets.positions, "classes": b.targets.classes, "labels": b.targets.labels,
                });
                writeln!(f, "{line}")?;
            }
        }
        Ok(())
    })
}

/// The batches a run with `cfg` draws, as the memory planner sees them: every step's training micro-batches (from
/// the first step) and the evaluation batches of the dev and eval splits (none when the run evaluates nothing).
pub fn plan_shape(splits: &Splits, cfg: &TrainConfig) -> Result<crate::plan::Shape> {
    use crate::plan::BatchShape;
    check_batching(splits, cfg)?;
    let mut batcher = Batcher::new(splits.train.examples.len(), cfg.seed);
    let mut train = Vec::new();
    for _ in 0..cfg.steps {
        train.extend(next_micro_batches(&mut batcher, splits, cfg)?.iter().map(BatchShape::of));
    }
    let mut eval = Vec::new();
    for data in [&splits.dev, &splits.eval].into_iter().filter(|_| !cfg.skip_eval) {
        for b in eval_batches(data, cfg.eval_batch_size, cfg.max_seq_len, cfg.pad_id, Device::Cpu) {
            eval.push(BatchShape::of(&b?.1));
        }
    }
    Ok(crate::plan::Shape { train, eval, classes: splits.train.classes.as_ref().map(Vec::len) })
}

/// The batch options and the training split can make the batches `cfg` asks for.
fn check_batching(splits: &Splits, cfg: &TrainConfig) -> Result<()> {
    if cfg.batch_size == 0 || cfg.grad_accum == 0 || cfg.batch_size > crate::plan::MAX_ROWS {
        return Err(Error::Option(format!(
            "--batch-size {} and --grad-accum {}: both must be at least 1, the batch size at most {}",
            cfg.batch_size,
            cfg.grad_accum,
            crate::plan::MAX_ROWS
        )));
    }
    if splits.train.examples.is_empty() && cfg.steps > 0 {
        return Err(Error::Option("the training split is empty".into()));
    }
    Ok(())
}

pub fn write_summary(out: &Path, summary: &impl Serialize) -> Result<()> {
    let json = serde_json::to_vec_pretty(summary).map_err(|e| Error::Msg(e.to_string()))?;
    crate::io::write_bytes_atomic(&out.join("summary.json"), &json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Example, Target};
    use candle_core::Tensor;
    use std::collections::HashSet;

    /// Accuracy, mean loss and the majority class of a classification split, against counts made by hand: a forward
    /// that always answers class 0 on 5 examples labelled 1, 0, 1, 1, 0 is right 2/5 times, and the majority class
    /// (1) is right 3/5 times; the loss is the batch-size-weighted mean of the forward's losses (exact).
    #[test]
    fn evaluate_reports_accuracy_loss_and_majority() {
        let labels = [1u32, 0, 1, 1, 0];
        let examples =
            labels.iter().enumerate().map(|(i, &y)| Example { prompt: vec![1; i + 1], target: Target::Class(y) });
        let data = TaskData { examples: examples.collect(), classes: Some(vec![7, 8]) };
        let forward = |b: &Batch| -> Result<Output> {
            let p = b.targets.labels.len();
            let logits = Tensor::from_vec([1f32, 0.0].repeat(p), (p, 2), &Device::Cpu)?;
            Ok(Output { loss: p as f32, logits, side: None })
        };
        let r = evaluate(&forward, &data, 2, 16, 0, &Device::Cpu).unwrap();
        assert_eq!(r.accuracy, 2.0 / 5.0);
        assert_eq!(r.majority, Some(3.0 / 5.0));
        // Batches of 2, 2, 1 report losses 2, 2, 1: (2·2 + 2·2 + 1·1) / 5.
        assert_eq!(r.loss, 9.0 / 5.0);
        // Every example's answer, in split order (the batches were sorted by length), with its cross-entropy over
        // the logits [1, 0] against an f64 reference: ln(e + 1) − logit[label]; budget 1e-12 (f32 logits are exact).
        let want: Vec<(usize, u32, u32)> = labels.iter().enumerate().map(|(i, &y)| (i, y, 0)).collect();
        let got: Vec<(usize, u32, u32)> = r.predictions.iter().map(|p| (p.example, p.label, p.predicted)).collect();
        assert_eq!(got, want);
        for p in &r.predictions {
            let reference = (1f64.exp() + 1.0).ln() - if p.label == 0 { 1.0 } else { 0.0 };
            assert!((p.loss - reference).abs() < 1e-12, "{} vs {reference}", p.loss);
        }
        let keys: HashSet<&str> = r.predictions.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys.len(), 5, "distinct prompts have distinct keys");
        assert_eq!(example_key(&[1, 2], 0), example_key(&[1, 2], 0));
        assert_ne!(example_key(&[1, 2], 0), example_key(&[1, 2], 1));
        let lm = TaskData { examples: vec![], classes: None };
        assert_eq!(evaluate(&forward, &lm, 2, 16, 0, &Device::Cpu).unwrap().majority, None);
        assert_eq!(r.side_share, None, "no side branch, no share");
    }

    /// The side share against a hand computation: rows of 3 label-word logits, each centred over the classes.
    /// Example 0: logits [3, 1, 2] with side part [1, 0, 2], so rest [2, 1, 0]: centred norms √2 and √2.
    /// Example 1: logits [4, 1, 1], side [0, 0, 0]: rest's centred norm √6. Share √2 / (√2 + √6); budget 1e-12.
    #[test]
    fn evaluate_measures_the_side_branchs_share_of_the_logits() {
        let examples = (0..2).map(|i| Example { prompt: vec![1; i + 1], target: Target::Class(0) });
        let data = TaskData { examples: examples.collect(), classes: Some(vec![7, 8, 9]) };
        let forward = |b: &Batch| -> Result<Output> {
            // Batches are sorted by prompt length: the 1-token prompt is example 0.
            let rows: Vec<([f32; 3], [f32; 3])> = b
                .lengths
                .iter()
                .map(|&len| if len == 1 { ([3., 1., 2.], [1., 0., 2.]) } else { ([4., 1., 1.], [0., 0., 0.]) })
                .collect();
            let p = rows.len();
            let logits = Tensor::from_vec(rows.iter().flat_map(|r| r.0).collect(), (p, 3), &Device::Cpu)?;
            let side = Tensor::from_vec(rows.iter().flat_map(|r| r.1).collect(), (p, 3), &Device::Cpu)?;
            Ok(Output { loss: 0.0, logits, side: Some(side) })
        };
        for batch_size in [1, 2] {
            let r = evaluate(&forward, &data, batch_size, 16, 0, &Device::Cpu).unwrap();
            let want = 2f64.sqrt() / (2f64.sqrt() + 6f64.sqrt());
            let got = r.side_share.unwrap();
            assert!((got - want).abs() < 1e-12, "batch {batch_size}: {got} vs {want}");
        }
    }
}

//! The training loop shared by every method: seeded batches, LR schedule, evaluation before and after, a progress
//! bar (loss, tokens/s, memory), a jsonl run log, checkpoints and resume, the memory report, `summary.json`
//! ([`Summary`]), and the export.
//!
//! Across ranks (`crate::dist`): every rank draws the same batches and runs its share of each step's micro-batches;
//! rank 0 alone writes the log, checkpoints, summary and exports; evaluations are shared out across the ranks
//! (`super::eval`), and at the end the ranks check that their training states hash the same.
use super::eval::{describe, evaluate, write_predictions, EvalResult, EvalSettings};
use super::memory;
use super::method::Method;
use super::records::{machine, median, read_log, LogLine, Summary};
use super::schedule::Schedule;
use super::selection::{best_path, DevPoint, Selection, SelectionArgs};
use crate::data::{make_batch, Batcher, Splits, TaskData};
use crate::dist;
use crate::model::export::{export_paths, write_peft, ExportArgs, Format};
use crate::model::gguf_export::write_gguf;
use crate::model::{Batch, Llama, LlamaConfig, Tok, MAX_ROWS};
use crate::{Error, Result};
use candle_core::Device;
use std::collections::BTreeMap;
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
    /// Evaluation during training, the best state, early stopping.
    pub selection: SelectionArgs,
    /// What the run writes at the end ([`export_paths`] names where), and how.
    pub export: Vec<Format>,
    pub export_opts: ExportArgs,
    /// The options that define the run, as its caller names them (`--batch-size` → "2"): a checkpoint records them
    /// and a resume that gives others is refused with the differences listed.
    pub options: BTreeMap<String, String>,
}

impl TrainConfig {
    /// How the run evaluates on `model`'s device.
    pub fn eval_settings(&self, model: &Llama) -> EvalSettings {
        EvalSettings {
            batch_size: self.eval_batch_size,
            max_len: self.max_seq_len,
            pad: self.pad_id,
            device: model.device().clone(),
        }
    }
}

/// Set by SIGINT: the loop checkpoints after the current step and stops.
pub static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub use super::run_dir::checkpoint_path;
use super::run_dir::{check_same_options, clear_earlier_run};

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
    /// The dev evaluations during training (absent in checkpoints written before them).
    #[serde(default)]
    selection: Selection,
}

/// Rank 0 writes the checkpoint; the other ranks wait for it (every rank calls this at the same step).
fn save_checkpoint(method: &dyn Method, path: &Path, st: &LoopState, options: &BTreeMap<String, String>) -> Result<()> {
    if dist::is_root() {
        let mut w = crate::checkpoint::StateWriter::new(method.name());
        w.meta("trainer", st);
        w.meta("options", options);
        method.save_state(&mut w)?;
        w.write(path)?;
    }
    dist::wait_for_root()
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
    check_batching(splits, cfg)?;
    cfg.selection.check()?;
    if cfg.selection.eval_every > 0 && (splits.dev.examples.is_empty() || cfg.skip_eval) {
        return Err(Error::Option(
            "--eval-every evaluates the dev split during training: it needs one (--dev-size > 0), and no --no-eval"
                .into(),
        ));
    }
    let root = dist::is_root();
    if root {
        eprintln!(
            "data: {}: {} train, {} dev, {} eval examples",
            splits.task,
            splits.train.examples.len(),
            splits.dev.examples.len(),
            splits.eval.examples.len()
        );
    }
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::file(&cfg.out, format!("cannot create: {e}")))?;
    dist::check_shared_dir(&cfg.out)?;
    if !cfg.resume {
        clear_earlier_run(&cfg.out)?;
    }
    let settings = cfg.eval_settings(model);
    // An empty split (--dev-size 0, --eval-size 0) is not evaluated.
    let eval = |data: &TaskData, m: &dyn Method| -> Result<Option<EvalResult>> {
        if data.examples.is_empty() {
            return Ok(None);
        }
        evaluate(&|b| m.forward(model, b), data, &settings, m.eval_probe()).map(Some)
    };
    let mut resumed = None;
    if cfg.resume {
        let path = checkpoint_path(&cfg.out);
        let r = crate::checkpoint::StateReader::open(&path)?;
        if r.meta()["method"].as_str() != Some(method.name()) {
            return Err(Error::file(
                &path,
                format!("is a checkpoint of `{}`, not `{}`", r.meta()["method"].as_str().unwrap_or("?"), method.name()),
            ));
        }
        // Checkpoints written before the options were recorded have none to compare.
        if let Ok(written) = serde_json::from_value::<BTreeMap<String, String>>(r.meta()["options"].clone()) {
            check_same_options(&written, &cfg.options).map_err(|m| Error::file(&path, m))?;
        }
        let st: LoopState = serde_json::from_value(r.meta()["trainer"].clone())
            .map_err(|e| Error::file(&path, format!("trainer state: {e}")))?;
        if st.next_step > cfg.steps {
            return Err(Error::file(
                &path,
                format!(
                    "is at step {}, past --steps {}: a resume can extend a run, not shorten it",
                    st.next_step, cfg.steps
                ),
            ));
        }
        if st.batcher.n != splits.train.examples.len() {
            return Err(Error::file(&path, "was written for another training split (--train-size, --seed)"));
        }
        method.load_state(&r)?;
        if dist::is_root() {
            eprintln!("resuming from {} at step {}", path.display(), st.next_step);
        }
        resumed = Some(st);
    }
    let dev_before = match &resumed {
        Some(st) => st.dev_before.map(|accuracy| EvalResult {
            accuracy,
            loss: st.dev_loss_before.unwrap_or(f64::NAN),
            ..Default::default()
        }),
        None if cfg.skip_eval => None,
        None => eval(&splits.dev, method)?,
    };
    if let (Some(r), None, true) = (&dev_before, &resumed, dist::is_root()) {
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
    let mut log = match root {
        true => Some(std::fs::File::create(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?),
        false => None,
    };
    let mut write_line = |l: &LogLine| -> Result<()> {
        match &mut log {
            Some(log) => Ok(writeln!(log, "{}", serde_json::to_string(l).map_err(|e| Error::Msg(e.to_string()))?)?),
            None => Ok(()),
        }
    };
    for l in &kept {
        write_line(l)?;
    }
    if root {
        std::fs::rename(&tmp, &log_path).map_err(|e| Error::file(&log_path, format!("cannot replace: {e}")))?;
    }
    let bar = indicatif::ProgressBar::new(cfg.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .expect("valid template"),
    );
    if !root {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mine = dist::my_micro_batches(cfg.grad_accum)?;
    let mut batcher =
        resumed.as_ref().map_or_else(|| Batcher::new(splits.train.examples.len(), cfg.seed), |st| st.batcher.clone());
    // Dev evaluations during training: by accuracy when examples have answers, else by loss.
    let by_accuracy = splits.dev.answered();
    let mut selection = resumed.as_ref().map_or_else(Selection::default, |st| st.selection.clone());
    if let (Some(r), None, true) = (&dev_before, &resumed, cfg.selection.eval_every > 0) {
        selection.record(DevPoint { step: 0, accuracy: r.accuracy, loss: r.loss }, by_accuracy);
        if root {
            selection.write(&cfg.out)?;
        }
    }
    // The latest periodic dev evaluation, reused as the final one when nothing changed since.
    let mut last_dev: Option<(usize, EvalResult)> = None;
    let mut stopped_early = None;
    let mut gpu_peak = 0usize;
    let mut times: Vec<f64> = kept.iter().map(|l| l.step_time_s).collect();
    let mut tok_rates: Vec<f64> = kept.iter().map(|l| l.tokens as f64 / l.step_time_s).collect();
    let mut sent: Vec<f64> = kept.iter().filter_map(|l| l.figures.get("sent_bytes").copied()).collect();
    let mut peak = kept.iter().fold(method.state_bytes(), |p, l| p.max(l.memory));
    // The earlier process's own peak died with it; its per-step RSS samples are a lower bound of that peak.
    let kept_rss = kept.iter().map(|l| l.rss_bytes).max().unwrap_or(0);
    let (mut last_loss, mut skipped) = (kept.last().map(|l| l.loss), resumed.as_ref().map_or(0, |st| st.skipped));
    bar.set_position(first_step as u64);
    // A line above the bar, or on stderr when the bar is hidden (not a terminal).
    let say = |msg: String| match (root, bar.is_hidden()) {
        (false, _) => {}
        (true, true) => eprintln!("{msg}"),
        (true, false) => bar.println(msg),
    };
    for step in first_step..cfg.steps {
        let micro = next_micro_batches(&mut batcher, splits, cfg, mine.clone(), model.device())?;
        // This rank's tokens: tokens/s is per rank.
        let tokens: usize = micro.iter().map(|b| b.real_tokens()).sum();
        let lr = cfg.schedule.lr(step);
        let (t0, sent0) = (Instant::now(), dist::sent_bytes());
        let mut stats = method.step(model, &micro, lr)?;
        let dt = t0.elapsed().as_secs_f64();
        if dist::world().size() > 1 {
            let bytes = (dist::sent_bytes() - sent0) as f64;
            stats.figures.push(("sent_bytes", bytes));
            sent.push(bytes);
        }
        times.push(dt);
        tok_rates.push(tokens as f64 / dt);
        peak = peak.max(stats.memory);
        if !stats.applied {
            skipped += 1;
        }
        last_loss = Some(stats.loss);
        let rss = memory::rss_bytes();
        // On a GPU: the device memory in use after the step (the driver's figure, every process on the card).
        if let Some((free, total)) = crate::device::gpu_memory(model.device()) {
            gpu_peak = gpu_peak.max(total - free);
        }
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
            figures: stats.figures.iter().map(|&(k, v)| (k.to_string(), v)).collect(),
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
        let state = |selection: &Selection| LoopState {
            next_step: step + 1,
            batcher: batcher.clone(),
            dev_before: dev_before.as_ref().map(|r| r.accuracy),
            dev_loss_before: dev_before.as_ref().map(|r| r.loss),
            skipped,
            selection: selection.clone(),
        };
        // An empty dev split (--dev-size 0) is never evaluated.
        if let Some(r) = if cfg.selection.due(step + 1) { eval(&splits.dev, method)? } else { None } {
            let point = DevPoint { step: step + 1, accuracy: r.accuracy, loss: r.loss };
            let best = selection.record(point, by_accuracy);
            say(format!("step {}: dev {}{}", step + 1, describe(&r), if best { " (best so far)" } else { "" }));
            if best {
                save_checkpoint(method, &best_path(&cfg.out), &state(&selection), &cfg.options)?;
            }
            if root {
                selection.write(&cfg.out)?;
            }
            last_dev = Some((step + 1, r));
        }
        // Every rank stops at the same step when any was interrupted (one byte each with several ranks).
        let interrupted = dist::any(INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst))?;
        // `--save-state` writes the state after the last step (it was read nowhere before: the option did nothing).
        let due = (cfg.checkpoint_every > 0 && (step + 1) % cfg.checkpoint_every == 0)
            || (cfg.save_state && step + 1 == cfg.steps);
        let stop = selection.exhausted(cfg.selection.early_stop);
        if due || interrupted || stop {
            save_checkpoint(method, &checkpoint_path(&cfg.out), &state(&selection), &cfg.options)?;
        }
        dist::maybe_die(step);
        if interrupted {
            bar.abandon();
            return Err(Error::Interrupted(format!(
                "interrupted after step {step}: checkpoint written to {}; continue with --resume",
                checkpoint_path(&cfg.out).display()
            )));
        }
        if stop {
            say(format!(
                "early stop after step {}: {} dev evaluations without a better one",
                step + 1,
                selection.since_best
            ));
            stopped_early = Some(step + 1);
            break;
        }
    }
    bar.finish();
    dist::barrier()?;
    let steps_done = stopped_early.unwrap_or(cfg.steps);
    // Restore the best dev evaluation's state unless the current one is it (or the run keeps its last state).
    let mut restored = None;
    if let Some(best) = selection.best.filter(|b| b.step != steps_done && !cfg.selection.keep_last) {
        let r = crate::checkpoint::StateReader::open(&best_path(&cfg.out))?;
        method.load_state(&r)?;
        say(format!(
            "restored the best dev state (step {}: accuracy {:.4}, loss {:.4}) from {}",
            best.step,
            best.accuracy,
            best.loss,
            best_path(&cfg.out).display()
        ));
        restored = Some(best.step);
    }
    let reuse = last_dev.filter(|(s, _)| *s == steps_done && restored.is_none()).map(|(_, r)| r);
    let (dev_after, eval_res) = if cfg.skip_eval {
        (None, None)
    } else {
        let d = match reuse {
            Some(r) => Some(r),
            None => eval(&splits.dev, method)?,
        };
        (d, eval(&splits.eval, method)?)
    };
    if let (Some(d), true) = (&dev_after, root) {
        eprintln!("dev accuracy after: {}", describe(d));
    }
    if let (Some(e), true) = (&eval_res, root) {
        eprintln!("eval accuracy: {}", describe(e));
    }
    let state_hash = if dist::world().size() > 1 {
        let h = state_hash(method)?;
        dist::check_agree(h, "the trained state's hash")?;
        say(format!("trained state hash {h:016x}: the same on all {} ranks", dist::world().size()));
        Some(format!("{h:016x}"))
    } else {
        None
    };
    let params = model.cfg.num_params();
    let peak_rss = memory::peak_rss_bytes().max(kept_rss);
    if !root {
        return Ok(Summary::default());
    }
    eprint!("{}", memory::report(&peak, params, peak_rss));
    let mut summary = Summary {
        method: method.name().into(),
        model: model_name.into(),
        task: splits.task.clone(),
        steps: Some(cfg.steps),
        batch_size: Some(cfg.batch_size),
        grad_accum: Some(cfg.grad_accum),
        max_seq_len: Some(cfg.max_seq_len),
        lr: Some(cfg.schedule.peak),
        seed: Some(cfg.seed),
        params: Some(params),
        matmul_params: Some(
            params
                - if splits.train.classes.is_some() || !model.cfg.tie_word_embeddings {
                    model.cfg.vocab_size * model.cfg.hidden_size
                } else {
                    0
                },
        ),
        flops_per_param: Some(method.flops_per_param()),
        compute: Some(method.compute()),
        trainable_params: Some(method.trainable_params()),
        peak_rss_bytes: Some(peak_rss),
        model_state_bytes: Some(peak.model_state()),
        breakdown: peak,
        bytes_per_param: Some(peak.model_state() as f64 / params as f64),
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
        final_loss: last_loss,
        skipped_steps: Some(skipped),
        best_step: selection.best.map(|b| b.step).filter(|_| !cfg.selection.keep_last),
        stopped_early_at: stopped_early,
        machine: machine(),
        gpu: super::records::gpu(model.device()),
        gpu_used_peak_bytes: Some(gpu_peak).filter(|&b| b > 0),
        ranks: Some(dist::world().size()).filter(|&n| n > 1),
        sent_bytes_per_step: median(&mut sent),
        state_hash,
        command: std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect(),
        ..Default::default()
    };
    for (split, r) in [("dev", &dev_after), ("eval", &eval_res)] {
        summary.add_figures(split, r.as_ref().map_or(&[][..], |r| &r.figures));
    }
    summary.write(&cfg.out)?;
    write_predictions(&cfg.out, &[("dev", dev_after.as_ref()), ("eval", eval_res.as_ref())])?;
    if cfg.steps > 0 {
        export(method, &model.cfg, cfg, tok, model_name)?;
    }
    Ok(summary)
}

/// A hash of the method's whole training state (weights, quantization scales, optimizer state), as a checkpoint
/// would hold it, hashed as each tensor arrives (nothing is kept): ranks that trained alike hold equal ones.
fn state_hash(method: &dyn Method) -> Result<u64> {
    let mut w = crate::checkpoint::StateWriter::hashing(method.name());
    method.save_state(&mut w)?;
    Ok(w.digest())
}

/// Writes each export `cfg.export` asks for under the run directory.
fn export(method: &dyn Method, mc: &LlamaConfig, cfg: &TrainConfig, tok: Option<&Tok>, base: &str) -> Result<()> {
    for &f in &cfg.export {
        let path = export_paths(&cfg.out, f);
        match f {
            Format::Hf => method.export(mc, &path, tok, base, &cfg.export_opts)?,
            Format::Peft => {
                let adapter = method
                    .adapter()
                    .ok_or_else(|| Error::Option(format!("--export peft: {} trains no LoRA adapter", method.name())))?;
                write_peft(mc, adapter, base, &path)?
            }
            Format::Gguf => write_gguf(mc, &|id| method.export_tensor(id), tok, &path, cfg.export_opts.gguf_type)?,
        }
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The micro-batches `mine` (of the step's `cfg.grad_accum`) of the next step, as training draws them, on `dev`.
/// The batcher draws the whole step whatever `mine` is, so every rank stays at the same position.
pub fn next_micro_batches(
    batcher: &mut Batcher,
    splits: &Splits,
    cfg: &TrainConfig,
    mine: std::ops::Range<usize>,
    dev: &Device,
) -> Result<Vec<Batch>> {
    let drawn: Vec<Vec<usize>> = (0..cfg.grad_accum).map(|_| batcher.next_indices(cfg.batch_size)).collect();
    drawn[mine]
        .iter()
        .map(|idx| {
            let exs: Vec<_> = idx.iter().map(|&i| &splits.train.examples[i]).collect();
            make_batch(&exs, splits.train.classes.as_deref(), cfg.max_seq_len, cfg.pad_id, dev)
        })
        .collect()
}

/// Writes the exact batches a training run with `cfg` would use, one jsonl line per micro-batch
/// (`step`, `micro`, `ids`, `lengths`, `positions`, `classes`, `labels`), so other tools (the PyTorch peers of the
/// benchmark) can train on the same data.
pub fn dump_batches(splits: &Splits, cfg: &TrainConfig, path: &Path, dev: &Device) -> Result<()> {
    check_batching(splits, cfg)?;
    let mut batcher = Batcher::new(splits.train.examples.len(), cfg.seed);
    crate::io::write_atomic(path, |f| {
        for step in 0..cfg.steps {
            for (k, b) in next_micro_batches(&mut batcher, splits, cfg, 0..cfg.grad_accum, dev)?.iter().enumerate() {
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

/// The batch options and the training split can make the batches `cfg` asks for.
pub fn check_batching(splits: &Splits, cfg: &TrainConfig) -> Result<()> {
    if cfg.batch_size == 0 || cfg.grad_accum == 0 || cfg.batch_size > MAX_ROWS {
        return Err(Error::Option(format!(
            "--batch-size {} and --grad-accum {}: both must be at least 1, the batch size at most {}",
            cfg.batch_size, cfg.grad_accum, MAX_ROWS
        )));
    }
    dist::my_micro_batches(cfg.grad_accum)?;
    if splits.train.examples.is_empty() && cfg.steps > 0 {
        return Err(Error::Option("the training split is empty".into()));
    }
    Ok(())
}

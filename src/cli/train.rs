//! `qtune train`: fine-tune a model on a task with one method, or with `--plan` / `--max-memory` plan the run's
//! memory for its own batches first, or with `--dump-batches` write the batches it would train on.
use super::{pad_id, tokenizer, Common};
use clap::{ArgMatches, Args};
use qtune::methods::{check_given, MethodKind, MethodOptions, RunContext};
use qtune::model::export::{ExportArgs, Format};
use qtune::model::load::read_header;
use qtune::model::quantized::{Compute, Source};
use qtune::model::Llama;
use qtune::train::memory;
use qtune::train::schedule::{Schedule, ScheduleKind};
use qtune::train::selection::SelectionArgs;
use qtune::train::trainer::{self, TrainConfig};
use qtune::train::OnNonFinite;
use qtune::{plan, Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A method and its options: what `train` trains.
#[derive(Args, Clone)]
pub struct MethodArgs {
    /// The fine-tuning method (its own options are listed under its heading below).
    #[arg(long, value_enum, default_value_t = MethodKind::FullAdamw)]
    pub method: MethodKind,
    #[command(flatten)]
    pub options: MethodOptions,
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate (default: 1e-5 for AdamW, 1e-6 for Lion, QFT, MeZO and QuZO; 2e-4 for QST and 1e-4 for
    /// LoRA/QLoRA with AdamW, a tenth of that with --optimizer lion; 1e-4 for mezo/quzo --lora).
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant, linear or cosine (after --warmup steps of linear warmup).
    #[arg(long, default_value = "linear")]
    pub schedule: String,
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// On a NaN/inf loss or gradient: skip the step, or stop.
    #[arg(long, value_enum, default_value_t = OnNonFinite::Skip)]
    pub on_nan: OnNonFinite,
    #[command(flatten)]
    pub m: MethodArgs,
    /// Refuse to start when the planned peak memory (`qtune plan`) exceeds this many GiB.
    #[arg(long)]
    pub max_memory: Option<f64>,
    /// Evaluate nothing (timing runs).
    #[arg(long)]
    pub no_eval: bool,
    /// Write the training state in the method's own format (quantized weights, optimizer states, data position)
    /// to <out>/checkpoint.safetensors at the end.
    #[arg(long)]
    pub save_state: bool,
    /// Also checkpoint every N steps (atomically, to <out>/checkpoint.safetensors). Ctrl-C checkpoints and stops.
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: usize,
    /// Continue the run in --out from its checkpoint (same options as the run that wrote it).
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// What to write at the end: hf (<out>/model), peft (<out>/adapter: lora, qlora, mezo/quzo --lora), gguf
    /// (<out>/model.gguf); comma-separated. Default: hf, and peft too for the methods that train an adapter.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub export: Option<Vec<Format>>,
    /// Write no export (memory and speed runs of large models).
    #[arg(long, conflicts_with = "export")]
    pub no_export: bool,
    #[command(flatten)]
    pub export_opts: ExportArgs,
    #[command(flatten)]
    pub dist: qtune::dist::DistArgs,
    /// Write the batches this run would train on to FILE (jsonl) and exit without training.
    #[arg(long)]
    pub dump_batches: Option<PathBuf>,
    /// Print this run's planned memory for its own batches (`qtune plan` plans full rows) and exit without loading
    /// the weights; with FILE, also write the plan as JSON there.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    pub plan: Option<Option<PathBuf>>,
    /// Every option that defines the run, given or defaulted, as a value (filled from the parse by
    /// [`TrainArgs::check_options`]; checkpoints record it so a resume must match).
    #[arg(skip)]
    pub defining: BTreeMap<String, String>,
}

/// An option's value as a resume compares it: the file a path names, the number a number is, else as written.
fn canonical_value(id: &str, raw: &str) -> String {
    const PATHS: &[&str] = &["model", "data", "dev_data", "eval_data", "task_file", "chat_template"];
    if PATHS.contains(&id) {
        return Path::new(raw).canonicalize().map_or_else(|_| raw.to_string(), |p| p.display().to_string());
    }
    match raw.parse::<f64>() {
        Ok(x) => x.to_string(),
        Err(_) => raw.to_string(),
    }
}

/// Options a resume may change: where and whether the run writes, evaluates (the eval rows come after the training
/// rows), checkpoints and plans, what a NaN does, the device it runs on (a state moves between devices; the
/// arithmetic that follows from it is compared, as `--compute`), and its length (a run may be extended or stop
/// early; its schedule then spans the new length; a length short of the checkpoint's step is refused by the
/// trainer), not what it trains.
const RESUME_MAY_CHANGE: &[&str] = &[
    "resume",
    "device",
    "steps",
    "early_stop",
    "keep_last",
    "on_nan",
    "eval_size",
    "checkpoint_every",
    "save_state",
    "export",
    "no_export",
    "export_dtype",
    "shard_size",
    "gguf_type",
    "no_eval",
    "eval_batch_size",
    "dump_batches",
    "plan",
    "max_memory",
    "dist_timeout",
    "out",
];

impl TrainArgs {
    /// Refuses an option of `matches` (this command's) that the method would not read, and records the options
    /// that define the run.
    pub fn check_options(&mut self, matches: &ArgMatches) -> Result<()> {
        check_given(self.m.method, self.m.options.zo.lora, matches)?;
        self.m.options.check()?;
        self.common.check()?;
        if let Some(cap) = self.max_memory.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return Err(Error::Option(format!("--max-memory {cap} must be a positive number of GiB")));
        }
        let cmd = <TrainArgs as Args>::augment_args(clap::Command::new("train"));
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if RESUME_MAY_CHANGE.contains(&id) {
                continue;
            }
            // Spelled as the value it is: a path resolved, a number as its f64 (`1e-4` is `0.0001`); `(none)` for an
            // option without a default that was not given.
            let value = match matches.try_get_raw(id) {
                Ok(Some(raw)) => raw.map(|v| canonical_value(id, &v.to_string_lossy())).collect::<Vec<_>>().join(","),
                _ => "(none)".into(),
            };
            self.defining.insert(format!("--{}", id.replace('_', "-")), value);
        }
        Ok(())
    }
}

/// The exports the run writes: `--export`'s, or by default hf and (for a method with LoRA factors) peft. An export
/// the method cannot write is refused before any work.
fn exports(a: &TrainArgs) -> Result<Vec<Format>> {
    let (m, lora) = (a.m.method, a.m.options.zo.lora);
    let has_adapter = matches!(m, MethodKind::Lora | MethodKind::Qlora) || (lora && m.is_zeroth_order());
    let export = match &a.export {
        _ if a.no_export => vec![],
        Some(list) => list.clone(),
        None if has_adapter => vec![Format::Hf, Format::Peft],
        None => vec![Format::Hf],
    };
    if export.contains(&Format::Peft) && !has_adapter {
        return Err(Error::Option(format!(
            "--export peft: {} trains no LoRA adapter (lora, qlora, mezo --lora and quzo --lora do)",
            m.cli_name()
        )));
    }
    if export.contains(&Format::Gguf) && m == MethodKind::Qst {
        return Err(Error::Option("--export gguf: a QST model is a base plus a side network, not one LLaMA".into()));
    }
    Ok(export)
}

/// The recorded options with the values they take effect as, where a default depends on the method or the
/// device: the learning rate, and the arithmetic of the quantized products (f32 on a GPU).
fn effective_options(a: &TrainArgs, lr: f64) -> BTreeMap<String, String> {
    let mut o = a.defining.clone();
    let (m, opts) = (a.m.method, &a.m.options);
    o.insert("--lr".into(), lr.to_string());
    if matches!(m, MethodKind::Quzo | MethodKind::Qft) {
        let on_gpu = a.common.device.device != qtune::device::DeviceSpec::Cpu;
        let compute = if on_gpu { Compute::F32 } else { opts.compute.of(m, opts.zo.lora) };
        o.insert("--compute".into(), compute.cli_name());
    }
    o
}

/// The files a run reads: its model and task data.
fn inputs(a: &TrainArgs) -> Vec<&Path> {
    let (c, t) = (&a.common, &a.common.task);
    let files = [&t.data, &t.dev_data, &t.eval_data, &t.classify.task_file, &t.chat.chat_template];
    std::iter::once(c.model.as_path()).chain(files.into_iter().flatten().map(|p| p.as_path())).collect()
}

/// Refuses a run whose outputs would replace its inputs: a file the run writes in `out` (or an earlier run's,
/// which a new run removes) that is, or holds, its model or data; or `--dump-batches` onto one of them.
fn check_outputs(a: &TrainArgs, out: &Path) -> Result<()> {
    let inputs = inputs(a);
    for p in qtune::train::run_dir::run_files(out) {
        let Ok(written) = p.canonicalize() else { continue };
        if let Some(input) = inputs.iter().find(|i| i.canonicalize().is_ok_and(|i| i.starts_with(&written))) {
            return Err(Error::Option(format!(
                "--out {}: the run writes {} there, which is (or holds) its input {}; pick another --out",
                out.display(),
                p.display(),
                input.display()
            )));
        }
    }
    if let Some(dump) = &a.dump_batches {
        if let Some(input) = inputs.iter().find(|i| qtune::io::same_path(i, dump)) {
            return Err(Error::Option(format!(
                "--dump-batches {}: that is an input of this run ({}); writing there would replace it",
                dump.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

pub fn run(a: TrainArgs) -> Result<()> {
    qtune::dist::watch(&a.dist);
    let c = &a.common;
    let kind: ScheduleKind = a.schedule.parse()?;
    // A method with no GPU kernels is refused before any reading; the GPU itself is opened once the run is known to
    // train (planning and dumping batches need none: batch shapes do not depend on the device).
    a.m.method.check_device(&a.m.options, c.device.device)?;
    let host = candle_core::Device::Cpu;
    // The config and tokenizer first; the weights are read by the method, which quantizes them as they arrive.
    let header = read_header(&c.model)?;
    c.note_context(&header.cfg);
    let tok = tokenizer(header.tokenizer, &c.model)?;
    let export = exports(&a)?;
    // What an export at the end would refuse is refused now, before any training.
    if export.contains(&Format::Hf) && a.m.method != MethodKind::Qst {
        header.cfg.to_hf_json().map_err(|m| Error::file(&c.model, format!("--export hf: {m}")))?;
    }
    if export.contains(&Format::Gguf) {
        qtune::model::gguf_export::check(&header.cfg, Some(&tok))?;
    }
    let splits = c.splits(&tok)?;
    let out =
        c.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/{}-{}", a.m.method.cli_name(), c.task_name())));
    // The peak is the method's default unless --lr names one.
    let peak = a.lr.unwrap_or(a.m.method.default_lr(&a.m.options));
    let cfg = TrainConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        max_seq_len: c.max_seq_len,
        eval_batch_size: c.eval_batch_size,
        schedule: Schedule { kind, peak, warmup: a.warmup, total: a.steps },
        seed: c.seed,
        out: out.clone(),
        pad_id: pad_id(&header.cfg),
        skip_eval: a.no_eval,
        save_state: a.save_state,
        checkpoint_every: a.checkpoint_every,
        resume: a.resume,
        selection: a.selection.clone(),
        export,
        export_opts: a.export_opts.clone(),
        options: effective_options(&a, peak),
    };
    check_outputs(&a, &out)?;
    if let Some(path) = &a.dump_batches {
        return trainer::dump_batches(&splits, &cfg, path, &host);
    }
    if a.max_memory.is_some() || a.plan.is_some() {
        let shape = plan::plan_shape(&splits, &cfg, &host)?;
        let p = super::plan::plan_on(&header.cfg, &a.m, &shape, c.device.device)?;
        if let Some(json) = &a.plan {
            let title = format!(
                "{} ({:.2} B parameters), {} steps of {} × {} from {} training examples, at most {} tokens a row{}",
                c.model.display(),
                header.cfg.num_params() as f64 / 1e9,
                cfg.steps,
                cfg.grad_accum,
                cfg.batch_size,
                splits.train.examples.len(),
                cfg.max_seq_len,
                super::plan::device_note(c.device.device),
            );
            return super::plan::print_plans(&title, &shape, &[p], json.as_deref());
        }
        if let Some(cap) = a.max_memory.filter(|&cap| p.peak as f64 > cap * (1u64 << 30) as f64) {
            return Err(Error::Option(format!(
                "--max-memory {cap} GiB: this run is planned to peak at {} (load {}, train {}, eval {}, + {} runtime; \
                 weights {}, gradients {}, optimizer {}, activations {}, scratch {}). Lower --batch-size or \
                 --max-seq-len, add --recompute, or pick a method `qtune plan --method all` shows fits",
                memory::human(p.peak),
                memory::human(p.load),
                memory::human(p.train),
                memory::human(p.eval),
                memory::human(p.runtime),
                memory::human(p.counted.weights),
                memory::human(p.counted.gradients),
                memory::human(p.counted.optimizer),
                memory::human(p.counted.activations),
                memory::human(p.counted.scratch),
            )));
        }
    }
    let lr = cfg.schedule.peak;
    if !(lr.is_finite() && lr > 0.0) {
        return Err(Error::Option(format!("--lr {lr} must be positive")));
    }
    let dev = c.device.device.open()?;
    let ctx = RunContext {
        seed: c.seed,
        on_nan: a.on_nan,
        epoch_steps: c.task.train_size.div_ceil(a.batch_size.max(1) * a.grad_accum.max(1)),
        device: dev.clone(),
    };
    let model = Llama::on(header.cfg, dev);
    let mut method = a.m.method.build(&a.m.options, Source::File(c.model.clone()), &ctx)?;
    // Ctrl-C: finish the current step, checkpoint, stop.
    let _ = ctrlc::set_handler(|| trainer::INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst));
    let s = trainer::train(&model, method.as_mut(), &splits, Some(&tok), &c.model.display().to_string(), &cfg)?;
    if !qtune::dist::is_root() {
        // Rank 0 wrote the run's files and reports them.
        return Ok(());
    }
    verdict(&out)?;
    eprintln!(
        "{}: median step {:.2} s, {:.1} tok/s, model state {:.2} B/param; wrote {}",
        s.method,
        s.step_time_s.unwrap_or(0.0),
        s.tokens_per_s.unwrap_or(0.0),
        s.bytes_per_param.unwrap_or(0.0),
        out.display()
    );
    Ok(())
}

/// The last lines of a run on a task with answers: each split's accuracy against always answering its most frequent
/// label, paired example by example (exact McNemar), and whether the run is clearly above it.
pub fn verdict(out: &std::path::Path) -> Result<()> {
    let run = qtune::report::read_run(out)?;
    for split in ["dev", "eval"] {
        let preds: Vec<_> = run.predictions.iter().filter(|(s, _)| s == split).map(|(_, p)| p).collect();
        let Some(v) = qtune::report::VersusMajority::of(&preds) else { continue };
        eprintln!(
            "{split}: accuracy {:.1}% against {:.1}% for always answering the most frequent label ({} examples; right \
             where that answer is wrong on {}, wrong where it is right on {}; McNemar p = {:.3}): {}",
            100.0 * v.accuracy,
            100.0 * v.majority,
            v.n,
            v.run_only,
            v.majority_only,
            v.p,
            if v.clearly_above() { "clearly above the majority class" } else { "not clearly above the majority class" }
        );
    }
    Ok(())
}

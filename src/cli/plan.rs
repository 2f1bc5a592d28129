//! `qtune plan` (and `train --plan`): a method's predicted memory for a model config and batch shape, printed as a
//! table; `--method all` plans every run of `qtune bench`, each with its own options.
use super::train::MethodArgs;
use clap::{ArgMatches, Args, FromArgMatches};
use qtune::device::DeviceSpec;
use qtune::methods::{check_given, Group, MethodKind, MethodOptions};
use qtune::model::LlamaConfig;
use qtune::{plan, Error, Result};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct PlanArgs {
    /// A known config (smollm2-135m, llama-2-7b, llama-2-13b, llama-2-70b), a config.json, an HF directory or a GGUF
    /// file (only its header is read).
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Sequence length (of the longest batch).
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Evaluation batch size (0: the run evaluates nothing).
    #[arg(long, default_value_t = 16)]
    pub eval_batch: usize,
    /// Label words of the task (BoolQ: 2); 0 plans language modelling (the head at every position).
    #[arg(long, default_value_t = 2)]
    pub classes: usize,
    /// A method (see `qtune train --help`), or `all`: every run of `qtune bench`, each with its own options.
    #[arg(long, default_value = "full-adamw", value_parser = parse_plan_method)]
    pub method: PlanMethod,
    #[command(flatten)]
    pub options: MethodOptions,
    /// Also write the plans as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub device: qtune::device::DeviceArgs,
}

/// What `qtune plan --method` names.
#[derive(Clone, Copy, Debug)]
pub enum PlanMethod {
    All,
    One(MethodKind),
}

fn parse_plan_method(s: &str) -> std::result::Result<PlanMethod, String> {
    if s == "all" {
        return Ok(PlanMethod::All);
    }
    clap::ValueEnum::from_str(s, false).map(PlanMethod::One).map_err(|_| {
        let known: Vec<&str> = MethodKind::ALL.iter().map(|k| k.cli_name()).collect();
        format!("unknown method `{s}` (known: all, {})", known.join(", "))
    })
}

impl PlanArgs {
    /// Refuses a method option the planned method would not read; `--method all` reads none (each run plans with
    /// its own options).
    pub fn check_options(&self, matches: &ArgMatches) -> Result<()> {
        self.options.check()?;
        match self.method {
            PlanMethod::One(kind) => check_given(kind, self.options.zo.lora, matches),
            PlanMethod::All => {
                let wd = matches!(matches.value_source("weight_decay"), Some(clap::parser::ValueSource::CommandLine));
                let given = Group::ALL.iter().flat_map(|g| g.given(matches)).chain(wd.then(|| "--weight-decay".into()));
                match given.into_iter().next() {
                    Some(opt) => Err(Error::Option(format!(
                        "{opt} is not read by --method all (each run plans with its own options)"
                    ))),
                    None => Ok(()),
                }
            }
        }
    }
}

/// One bench run's method arguments, parsed as `train` parses them.
#[derive(clap::Parser)]
struct MethodOnly {
    #[command(flatten)]
    m: MethodArgs,
}

/// The method and options of one `qtune bench` run, parsed from its arguments as `train` parses them.
pub fn bench_method(args: &[&str]) -> Result<MethodArgs> {
    let m = <MethodOnly as clap::CommandFactory>::command()
        .try_get_matches_from(std::iter::once("plan").chain(args.iter().copied()))
        .and_then(|m| MethodOnly::from_arg_matches(&m))
        .map_err(|e| Error::Option(e.to_string()))?;
    Ok(m.m)
}

/// Plans one run on `spec`. On a GPU every counted tensor lives on the device and the loader streams the file
/// through the host one tensor at a time, so the device's peak is the largest phase, without the host process's
/// runtime; a quantized method's products run in f32 over its matrices dequantized one at a time, which adds a
/// transient f32 copy of the largest matrix to its training and evaluation. A method with no GPU path is refused by
/// name.
pub fn plan_on(cfg: &LlamaConfig, m: &MethodArgs, shape: &plan::Shape, spec: DeviceSpec) -> Result<plan::Plan> {
    if spec == DeviceSpec::Cpu {
        return plan_run(cfg, m, shape);
    }
    m.method.check_device(&m.options, spec)?;
    let mut on_gpu = m.clone();
    on_gpu.options.compute.compute = Some(qtune::model::quantized::Compute::F32);
    let mut p = plan_run(cfg, &on_gpu, shape)?;
    let copies = match m.method {
        MethodKind::Quzo | MethodKind::Qft | MethodKind::Qat | MethodKind::Qlora | MethodKind::Qst => 1,
        _ => 0,
    };
    let transient = copies * qtune::model::quantized::gpu_dequantized_bytes(cfg);
    // Full-parameter QuZO's update is one fused kernel on a GPU (no f32 chunk of rows, the CPU's update scratch).
    let fused = if m.method == MethodKind::Quzo && !m.options.zo.lora { p.counted.scratch } else { 0 };
    p.counted.scratch = p.counted.scratch - fused + transient;
    p.train = p.train - fused + transient;
    p.eval += transient;
    p.runtime = 0;
    p.peak = p.load.max(p.train).max(p.eval);
    Ok(p)
}

/// What a plan title adds for `spec`.
pub fn device_note(spec: DeviceSpec) -> String {
    match spec {
        DeviceSpec::Cpu => String::new(),
        _ => format!(
            ", GPU memory on {spec} (the tensors; the CUDA context and cuBLAS's workspace come on top and are not \
             planned yet)"
        ),
    }
}

/// Plans one run; a quantized run's name carries its bit width (`quzo-int4`), and full-parameter QuZO's its f32
/// arithmetic when asked for (`quzo-int4-f32`), as `qtune bench` names them.
pub fn plan_run(cfg: &LlamaConfig, m: &MethodArgs, shape: &plan::Shape) -> Result<plan::Plan> {
    let mut p = plan::plan(cfg, m.method, &m.options, shape)?;
    if matches!(m.method, MethodKind::Quzo | MethodKind::Qat) {
        p.method = format!("{}-int{}", p.method, m.options.bits.bits);
    }
    let f32_quzo = m.method == MethodKind::Quzo && !m.options.zo.lora;
    if f32_quzo && m.options.compute.compute == Some(qtune::model::quantized::Compute::F32) {
        p.method += "-f32";
    }
    Ok(p)
}

/// Prints plans under a title line that names the batches they are for, and writes them as JSON when asked.
pub fn print_plans(title: &str, shape: &plan::Shape, plans: &[plan::Plan], json: Option<&Path>) -> Result<()> {
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

pub fn run(a: PlanArgs) -> Result<()> {
    let cfg = plan::resolve_config(&a.model)?;
    let shape = plan::Shape::full(a.batch, a.seq, a.eval_batch, (a.classes > 0).then_some(a.classes))?;
    let runs: Vec<MethodArgs> = match a.method {
        PlanMethod::All => qtune::bench::RUNS.iter().map(|(_, args)| bench_method(args)).collect::<Result<_>>()?,
        PlanMethod::One(method) => vec![MethodArgs { method, options: a.options }],
    };
    let spec = a.device.device;
    let mut plans = Vec::new();
    for m in &runs {
        if spec != DeviceSpec::Cpu && !m.method.runs_on_gpu(&m.options) && matches!(a.method, PlanMethod::All) {
            continue;
        }
        plans.push(plan_on(&cfg, m, &shape, spec)?);
    }
    let title =
        format!("{} ({:.2} B parameters), full rows{}", a.model, cfg.num_params() as f64 / 1e9, device_note(spec));
    print_plans(&title, &shape, &plans, a.json.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a GPU a quantized method's plan is its f32-products plan plus a transient f32 copy of its largest matrix
    /// (SmolLM2's embedding, 49152 × 576), in its training and its evaluation phase; full-parameter QuZO's update
    /// is fused there, so its CPU update scratch goes; the f32 methods' plans gain nothing; the device's peak has no
    /// host runtime row.
    #[test]
    fn gpu_plans_add_the_dequantized_matrices() {
        let cfg = plan::resolve_config("smollm2-135m").unwrap();
        let shape = plan::Shape::full(4, 128, 4, None).unwrap();
        let largest = 49152 * 576;
        for (args, copies, fused) in [
            (&["--method", "quzo", "--compute", "f32"][..], 1, true),
            (&["--method", "quzo", "--lora"], 1, false),
            (&["--method", "qlora"], 1, false),
            (&["--method", "lora"], 0, false),
        ] {
            let m = bench_method(args).unwrap();
            let cpu = plan_run(&cfg, &m, &shape).unwrap();
            let gpu = plan_on(&cfg, &m, &shape, DeviceSpec::Cuda(0)).unwrap();
            let extra = copies * 4 * largest;
            let update = if fused { qtune::methods::quzo::update_scratch_bytes(&cfg) } else { 0 };
            assert!(!fused || update > 0, "{args:?}: the CPU plan has an update scratch to drop");
            assert_eq!(gpu.train, cpu.train - update + extra, "{args:?}");
            assert_eq!(gpu.counted.scratch, cpu.counted.scratch - update + extra, "{args:?}");
            assert_eq!(gpu.eval, cpu.eval + extra, "{args:?}");
            assert_eq!((gpu.runtime, gpu.peak), (0, gpu.load.max(gpu.train).max(gpu.eval)), "{args:?}");
        }
    }
}

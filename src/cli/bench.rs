//! `qtune bench`: every method's run (`qtune::bench::RUNS`) with the same arguments, each in its own process, then
//! one table; every run's command line is checked before the first starts.
use super::ParseError;
use clap::Args;
use qtune::{Error, Result};
use std::path::PathBuf;

#[derive(Args)]
pub struct BenchArgs {
    /// Runs to include (default: all of them; see `qtune bench --list`).
    #[arg(long, value_delimiter = ',')]
    pub runs: Option<Vec<String>>,
    #[arg(long, default_value = "runs/bench")]
    pub out: PathBuf,
    /// List the runs and exit.
    #[arg(long)]
    pub list: bool,
    /// Measure the device's GEMM ceilings (`--device`), print them as JSON and exit.
    #[arg(long)]
    pub ceilings: bool,
    /// Include the PyTorch peers' runs from this folder (`scripts/peers_bench.py --out`) and their ratios.
    #[arg(long)]
    pub peers: Option<PathBuf>,
    #[command(flatten)]
    pub device: qtune::device::DeviceArgs,
    /// Arguments passed to every `qtune train` (after `--`), e.g. `-- --steps 10 --batch-size 8`.
    #[arg(last = true)]
    pub train_args: Vec<String>,
}

/// Runs the benchmark; `check` parses a whole `qtune train ...` command line as `main` would.
pub fn run(a: BenchArgs, check: impl Fn(Vec<String>) -> std::result::Result<(), ParseError>) -> Result<()> {
    if a.list {
        for (name, args) in qtune::bench::RUNS {
            println!("{name}: qtune train {}", args.join(" "));
        }
        return Ok(());
    }
    let spec = a.device.device;
    if a.ceilings {
        let c = qtune::bench::Ceilings::measure(&spec.open()?)?;
        let kernel = qtune::quant::int8::kernel_name();
        // The integer kernel is the CPU's, wherever the f32 ceiling was measured.
        let json = serde_json::json!({"device": c.device, "f32_gflops": c.f32, "cpu_int8_gops": c.int8,
            "cpu_int8_kernel": kernel});
        println!("{json}");
        return Ok(());
    }
    let mut train_args = a.train_args.clone();
    if spec != qtune::device::DeviceSpec::Cpu {
        train_args.extend(["--device".to_string(), spec.to_string()]);
    }
    // On a GPU, the runs whose method has no GPU kernels yet are left out by name (unless named with --runs).
    let runs = a.runs.clone().unwrap_or_else(|| {
        qtune::bench::RUNS
            .iter()
            .filter(|(name, args)| {
                let keep = spec == qtune::device::DeviceSpec::Cpu
                    || super::plan::bench_method(args).is_ok_and(|m| m.method.runs_on_gpu(&m.options));
                if !keep {
                    eprintln!("bench: leaving out `{name}` on {spec} (no GPU kernels yet)");
                }
                keep
            })
            .map(|r| r.0.to_string())
            .collect()
    });
    // Every run's command line is checked before the first starts, so a mistake costs nothing.
    for name in &runs {
        let Some((_, args)) = qtune::bench::RUNS.iter().find(|(n, _)| n == name) else { continue };
        let argv: Vec<String> = ["qtune", "train"]
            .into_iter()
            .chain(args.iter().copied())
            .map(String::from)
            .chain(train_args.iter().cloned())
            .collect();
        check(argv).map_err(|e| Error::Msg(format!("bench run `{name}`: {}", e.line())))?;
    }
    let exe = std::env::current_exe()?;
    print!("{}", qtune::bench::run(&exe, &runs, &train_args, &a.out, a.peers.as_deref(), spec)?);
    Ok(())
}

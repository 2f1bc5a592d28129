//! `qtune bench`: every method on the same model, task, batch, sequence length and steps, each in its own process
//! (so each peak RSS is its own), then one table: memory, step time, tokens/s, MFU against the f32 GEMM rate
//! measured on this machine in the same run, and accuracy before/after.
use crate::model::quantized::Compute;
use crate::report::{self, RunRecord};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::path::Path;
use std::time::Instant;

/// The method runs of the benchmark: (run name, extra `qtune train` arguments).
pub const RUNS: &[(&str, &[&str])] = &[
    ("full-adamw", &["--method", "full-adamw"]),
    ("full-lion", &["--method", "full-lion"]),
    ("qft", &["--method", "qft"]),
    ("lora", &["--method", "lora"]),
    ("qlora", &["--method", "qlora"]),
    ("qst", &["--method", "qst"]),
    ("mezo", &["--method", "mezo"]),
    ("quzo-int8", &["--method", "quzo", "--bits", "8"]),
    ("quzo-int4", &["--method", "quzo", "--bits", "4"]),
    ("quzo-int8-f32", &["--method", "quzo", "--bits", "8", "--compute", "f32"]),
    ("quzo-int4-f32", &["--method", "quzo", "--bits", "4", "--compute", "f32"]),
    ("qat-int4", &["--method", "qat", "--bits", "4"]),
];

/// Each bench run's closest PyTorch peer in `scripts/peers_bench.py`: what a user would otherwise run for the same
/// job. QFT's is bitsandbytes' 8-bit Lion (quantized optimizer state, f32 weights and gradients); QLoRA and QST have
/// no peer of their own yet (`peers_bench.py` has no PEFT-over-bitsandbytes-NF4 run), so theirs is PEFT LoRA on the
/// f32 model; the quantized first-order baseline's is FP32 AdamW.
pub const CLOSEST_PEER: &[(&str, &str)] = &[
    ("full-adamw", "torch-adamw"),
    ("full-lion", "torch-lion"),
    ("qft", "bnb-lion8bit"),
    ("lora", "peft-lora"),
    ("qlora", "peft-lora"),
    ("qst", "peft-lora"),
    ("mezo", "torch-mezo"),
    ("quzo-int8", "torch-mezo"),
    ("quzo-int4", "torch-mezo"),
    ("quzo-int8-f32", "torch-mezo"),
    ("quzo-int4-f32", "torch-mezo"),
    ("qat-int4", "torch-adamw"),
];

/// The GEMM ceilings of the device a benchmark runs on, in GOP/s, best of 5 products each: f32 (candle's matmul,
/// the kernels the f32 products use: gemm on the CPU at 2048³, cuBLAS on a GPU at 4096³) and INT8 (the CPU's
/// u8×i8→i32 kernel of `qtune_quant::int8` at 2048³, operands quantized beforehand; a GPU's products are f32).
#[derive(Clone, Debug)]
pub struct Ceilings {
    pub f32: f64,
    pub int8: f64,
    /// Where the f32 ceiling was measured: `cpu`, or the GPU as a run's summary names it (`records::gpu`).
    pub device: String,
}

impl Ceilings {
    pub fn measure(dev: &Device) -> Result<Ceilings> {
        let best = |n: usize, f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            f()?;
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                f()?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok(2.0 * (n * n * n) as f64 / best / 1e9)
        };
        let n = if dev.is_cpu() { 2048 } else { 4096 };
        let a = Tensor::randn(0f32, 1.0, (n, n), dev)?;
        let b = Tensor::randn(0f32, 1.0, (n, n), dev)?;
        // Synchronised, so a GPU's time is the product's and not its launch's.
        let f32 = best(n, &mut || {
            let c = a.matmul(&b)?;
            dev.synchronize()?;
            drop(c);
            Ok(())
        })?;
        let n = 2048;
        let (a8, b8) = ((0..n * n).map(|i| (i * 7 % 127) as u8).collect::<Vec<_>>(), vec![3i8; n * n]);
        let mut acc = vec![0i32; n * n];
        let int8 = best(n, &mut || {
            qtune_quant::int8::gemm_u8i8(&a8, 64, n, n, &b8, n, &mut acc).map_err(crate::model::quantized::quant_err)
        })?;
        let device = crate::train::records::gpu(dev).unwrap_or_else(|| "cpu".into());
        Ok(Ceilings { f32, int8, device })
    }

    /// The ceiling of a run's arithmetic (f32 when the summary does not say).
    fn of(&self, compute: Option<Compute>) -> f64 {
        match compute {
            Some(c) if c.is_int() => self.int8,
            _ => self.f32,
        }
    }
}

/// Runs `runs` (names from [`RUNS`]) with `common` arguments into `out/<name>`, skipping runs already done, then
/// writes the report with an MFU column. With `peers` (the `--out` folder of `scripts/peers_bench.py`, run on the
/// same batches), the peers' runs join the table and plots, and a second table gives each run's ratios to its
/// closest peer ([`CLOSEST_PEER`]).
pub fn run(
    exe: &Path,
    runs: &[String],
    common: &[String],
    out: &Path,
    peers: Option<&Path>,
    spec: crate::device::DeviceSpec,
) -> Result<String> {
    // Read first, so a wrong folder fails before an hour of runs.
    let peer_records = match peers {
        Some(dir) => read_peers(dir)?,
        None => Vec::new(),
    };
    let mut records = Vec::new();
    for name in runs {
        let (_, args) = RUNS.iter().find(|(n, _)| n == name).ok_or_else(|| {
            Error::Option(format!(
                "unknown bench run `{name}` (known: {})",
                RUNS.iter().map(|r| r.0).collect::<Vec<_>>().join(", ")
            ))
        })?;
        let dir = out.join(name);
        if !dir.join("summary.json").exists() {
            eprintln!("bench: {name}");
            let status = std::process::Command::new(exe)
                .arg("train")
                .args(*args)
                .args(common)
                .arg("--out")
                .arg(&dir)
                .status()
                .map_err(|e| Error::file(exe, format!("cannot run: {e}")))?;
            if !status.success() {
                return Err(Error::Msg(format!("bench run `{name}` failed ({status})")));
            }
        }
        records.push(report::read_run(&dir)?);
    }
    // Measured after the runs, in this process: a GPU context held here during the runs would count in their
    // device memory (the driver's figure is the whole device's).
    let ceilings = Ceilings::measure(&spec.open()?)?;
    eprintln!(
        "GEMM ceilings: f32 {:.1} GFLOP/s ({}), int8 {:.1} GOP/s ({})",
        ceilings.f32,
        ceilings.device,
        ceilings.int8,
        qtune_quant::int8::kernel_name()
    );
    for r in &mut records {
        add_mfu(r, &ceilings);
    }
    let ratios = ratio_table(&records, &peer_records);
    records.extend(peer_records);
    let mut md = format!("qtune bench, {} UTC, {}\n\n", utc_date(), crate::train::records::machine());
    md += &report::write_report(&records, out, "qtune bench")?;
    md += &format!(
        "\nGEMM ceilings (best of 5, same run): f32 {:.1} GFLOP/s ({}: candle, 2048³ on a CPU, 4096³ on a GPU), int8 \
         {:.1} GOP/s (2048³, {}). MFU = tokens/s × operations per token / the ceiling of the run's arithmetic (int8 \
         for `--compute int8` runs).\n",
        ceilings.f32,
        ceilings.device,
        ceilings.int8,
        qtune_quant::int8::kernel_name()
    );
    if !ratios.is_empty() {
        md += &format!("\nEach qtune run against its closest peer (below 1: qtune uses less / is faster):\n\n{ratios}");
    }
    crate::io::write_bytes_atomic(&out.join("results.md"), md.as_bytes())?;
    Ok(md)
}

/// The peers' runs: every sub-folder of `dir` with a summary.json, in name order.
fn read_peers(dir: &Path) -> Result<Vec<RunRecord>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::file(dir, format!("cannot read the peers folder: {e}")))?;
    let mut dirs: Vec<_> =
        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("summary.json").exists()).collect();
    if dirs.is_empty() {
        return Err(Error::file(
            dir,
            "no peer run (no sub-folder with a summary.json): run scripts/peers_bench.py first",
        ));
    }
    dirs.sort();
    dirs.iter().map(|d| report::read_run(d)).collect()
}

/// | run | peer | peak RSS ratio | step time ratio | for every run whose closest peer finished.
fn ratio_table(runs: &[RunRecord], peers: &[RunRecord]) -> String {
    let ratio = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) if y > 0.0 => format!("{:.2}×", x / y),
        _ => "–".into(),
    };
    let rss = |r: &RunRecord| r.summary.peak_rss_bytes.map(|b| b as f64);
    let mut s = String::new();
    for r in runs {
        let Some((_, peer)) = CLOSEST_PEER.iter().find(|(n, _)| *n == r.name) else { continue };
        let Some(p) = peers.iter().find(|p| p.name == *peer) else { continue };
        s += &format!(
            "| {} | {} | {} | {} |\n",
            r.name,
            p.name,
            ratio(rss(r), rss(p)),
            ratio(r.summary.step_time_s, p.summary.step_time_s)
        );
    }
    if s.is_empty() {
        return s;
    }
    format!("| run | closest peer | peak RSS ratio | step time ratio |\n|---|---|---|---|\n{s}")
}

/// Today's date (UTC) as YYYY-MM-DD, from the system clock.
fn utc_date() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    civil_date((secs / 86_400) as i64)
}

/// Days since 1970-01-01 → YYYY-MM-DD (H. Hinnant's `civil_from_days`).
fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Model FLOPs utilisation: matmul FLOPs per token over the measured GEMM rate, with N the parameters that take
/// part in matmuls (`matmul_params`) and the FLOPs per token per such parameter the method states
/// ([`crate::train::Method::flops_per_param`]: 6 for backprop through the model, 4 for adapters, 2 for side tuning,
/// 4 for the zeroth-order methods' two forwards, their LoRA modes included).
fn add_mfu(r: &mut RunRecord, ceilings: &Ceilings) {
    let s = &r.summary;
    // A run is judged against the ceilings of its own device only.
    if s.gpu.as_deref().unwrap_or("cpu") != ceilings.device {
        return;
    }
    let gflops = ceilings.of(s.compute);
    let (Some(tps), Some(params), Some(per_param)) = (s.tokens_per_s, s.matmul_params, s.flops_per_param) else {
        return;
    };
    r.summary.mfu = Some(tps * per_param * params as f64 / (gflops * 1e9));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        for (days, want) in [(0, "1970-01-01"), (59, "1970-03-01"), (11_016, "2000-02-29"), (20_780, "2026-11-23")] {
            assert_eq!(civil_date(days), want);
        }
    }

    fn record(name: &str, rss: f64, step: f64) -> RunRecord {
        let summary = crate::train::records::Summary {
            peak_rss_bytes: Some(rss as usize),
            step_time_s: Some(step),
            ..Default::default()
        };
        RunRecord { name: name.into(), summary, losses: vec![], dev: vec![], predictions: vec![] }
    }

    #[test]
    fn ratios_pair_each_run_with_its_closest_peer() {
        let runs = [record("qst", 1.0e9, 5.0), record("qft", 3.0e9, 12.0), record("mezo", 1.0, 1.0)];
        let peers = [record("peft-lora", 4.0e9, 20.0), record("bnb-lion8bit", 6.0e9, 10.0)];
        let t = ratio_table(&runs, &peers);
        assert!(t.contains("| qst | peft-lora | 0.25× | 0.25× |"), "{t}");
        assert!(t.contains("| qft | bnb-lion8bit | 0.50× | 1.20× |"), "{t}");
        assert!(!t.contains("mezo"), "a run whose peer did not finish has no row: {t}");
    }

    /// MFU = tokens/s × FLOPs per token / GEMM rate, with the FLOPs per matmul parameter the run recorded: a
    /// zeroth-order LoRA run (two forwards: 4 per parameter) at 100 tok/s over 1e8 parameters on a 100 GFLOP/s
    /// machine is 40%; a summary without the count (a peer's) gets none.
    #[test]
    fn mfu_uses_the_methods_own_flops_per_parameter() {
        let mut r = record("mezo-lora", 1.0, 1.0);
        (r.summary.tokens_per_s, r.summary.matmul_params, r.summary.flops_per_param) =
            (Some(100.0), Some(100_000_000), Some(4.0));
        let ceilings = Ceilings { f32: 100.0, int8: 400.0, device: "cpu".into() };
        add_mfu(&mut r, &ceilings);
        assert!((r.summary.mfu.unwrap() - 0.4).abs() < 1e-12, "{:?}", r.summary.mfu);
        // The same run on the integer path is judged against the INT8 ceiling.
        r.summary.compute = Some(Compute::Int8);
        add_mfu(&mut r, &ceilings);
        assert!((r.summary.mfu.unwrap() - 0.1).abs() < 1e-12, "{:?}", r.summary.mfu);
        let mut peer = record("torch-mezo", 1.0, 1.0);
        peer.summary.tokens_per_s = Some(100.0);
        add_mfu(&mut peer, &ceilings);
        assert_eq!(peer.summary.mfu, None);
        // A GPU run is judged against the ceiling measured on its GPU (the summary's own label), and only there.
        let gpu = "cuda:0, NVIDIA H100 80GB HBM3, 81559 MiB";
        let on_gpu = Ceilings { f32: 1000.0, int8: 400.0, device: gpu.into() };
        let mut g = record("lora", 1.0, 1.0);
        (g.summary.tokens_per_s, g.summary.matmul_params, g.summary.flops_per_param, g.summary.gpu) =
            (Some(100.0), Some(100_000_000), Some(4.0), Some(gpu.into()));
        add_mfu(&mut g, &ceilings);
        assert_eq!(g.summary.mfu, None, "a GPU run against the CPU's ceiling");
        add_mfu(&mut g, &on_gpu);
        assert!((g.summary.mfu.unwrap() - 0.04).abs() < 1e-12, "{:?}", g.summary.mfu);
    }
}

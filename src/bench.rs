//! `qtune bench`: every method on the same model, task, batch, sequence length and steps, each in its own process
//! (so each peak RSS is its own), then one table: memory, step time, tokens/s, MFU against the f32 GEMM rate
//! measured on this machine in the same run, and accuracy before/after.
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
    ("qat-int4", &["--method", "qat", "--bits", "4"]),
];

/// f32 GEMM GFLOP/s of candle on this machine: the best of 5 runs of a 2048³ product.
pub fn gemm_gflops() -> Result<f64> {
    let n = 2048;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        let _ = c.sum_all()?.to_scalar::<f32>()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best / 1e9)
}

/// Runs `runs` (names from [`RUNS`]) with `common` arguments into `out/<name>`, skipping runs already done, then
/// writes the report with an MFU column.
pub fn run(exe: &Path, runs: &[String], common: &[String], out: &Path) -> Result<String> {
    let gflops = gemm_gflops()?;
    eprintln!("f32 GEMM on this machine: {gflops:.1} GFLOP/s");
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
    for r in &mut records {
        add_mfu(r, gflops);
    }
    let mut md = report::write_report(&records, out, "qtune bench")?;
    md += &format!("\nf32 GEMM reference: {gflops:.1} GFLOP/s (candle, 2048³, best of 5, same run); MFU = tokens/s × FLOPs per token / that rate.\n");
    crate::io::write_bytes_atomic(&out.join("results.md"), md.as_bytes())?;
    Ok(md)
}

/// Model FLOPs utilisation: matmul FLOPs per token over the measured GEMM rate, with N the parameters that take
/// part in matmuls (`matmul_params`): 6·N for backprop through the model (forward, input and weight gradients),
/// 4·N for adapters (forward and input gradients; their own matmuls are negligible), 2·N for side tuning (the
/// frozen base runs forward only; the side network is ~1% of it), and 2·N per forward, two per step, for
/// zeroth-order methods.
fn add_mfu(r: &mut RunRecord, gflops: f64) {
    let s = &r.summary;
    let (Some(tps), Some(params)) = (s["tokens_per_s"].as_f64(), s["matmul_params"].as_f64()) else { return };
    let method = s["method"].as_str().unwrap_or("");
    let per_token = match method {
        "mezo" | "quzo" => 2.0 * 2.0 * params,
        "qst" => 2.0 * params,
        "lora" | "qlora" => 4.0 * params,
        _ => 6.0 * params,
    };
    r.summary["mfu"] = serde_json::json!(tps * per_token / (gflops * 1e9));
}

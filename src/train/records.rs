//! The records a run leaves: `summary.json` ([`Summary`], written by `train` and `eval`, read by `report` and
//! `bench`) and `log.jsonl` ([`LogLine`], one per step). Typed both ways, so every writer and reader agrees on the
//! fields; every field is optional when read, since the PyTorch peers' summaries carry only some of them.
use super::memory::Breakdown;
use crate::model::quantized::Compute;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// One line of the run log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogLine {
    pub step: usize,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: Option<f64>,
    pub applied: bool,
    pub tokens: usize,
    pub step_time_s: f64,
    pub rss_bytes: usize,
    pub memory: Breakdown,
    /// The method's own figures of the step ([`super::method::StepStats::figures`]).
    #[serde(flatten)]
    pub figures: BTreeMap<String, f64>,
}

/// `summary.json`: what a run was and what it measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Summary {
    pub method: String,
    pub model: String,
    pub task: String,
    pub steps: Option<usize>,
    pub batch_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_accum: Option<usize>,
    /// Processes that trained (data parallelism; absent for one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranks: Option<usize>,
    /// Median bytes one rank sent per step (several ranks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_bytes_per_step: Option<f64>,
    /// The trained state's hash, checked equal on every rank (several ranks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_hash: Option<String>,
    pub max_seq_len: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    pub params: Option<usize>,
    /// Parameters that take part in a token's matmuls (the embedding table is a lookup; a label-word task reads
    /// only a few LM-head rows): what FLOPs per token are counted from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matmul_params: Option<usize>,
    /// Matmul FLOPs per token per matmul parameter of a step ([`super::method::Method::flops_per_param`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flops_per_param: Option<f64>,
    /// The arithmetic of the weight products (`int8` or `f32`): which GEMM ceiling the MFU is judged against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute: Option<Compute>,
    pub trainable_params: Option<usize>,
    pub peak_rss_bytes: Option<usize>,
    pub model_state_bytes: Option<usize>,
    pub breakdown: Breakdown,
    pub bytes_per_param: Option<f64>,
    pub step_time_s: Option<f64>,
    pub tokens_per_s: Option<f64>,
    /// Model FLOPs utilisation, added by `qtune bench` against the GEMM rate it measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    pub dev_accuracy_before: Option<f64>,
    pub dev_accuracy_after: Option<f64>,
    pub eval_accuracy: Option<f64>,
    /// The splits' mean cross-entropies and majority-class accuracies (classification).
    pub dev_loss_before: Option<f64>,
    pub dev_loss_after: Option<f64>,
    pub eval_loss: Option<f64>,
    pub dev_majority: Option<f64>,
    pub eval_majority: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_loss: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped_steps: Option<usize>,
    /// With --eval-every: the step of the best dev evaluation, whose state the run ended with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_step: Option<usize>,
    /// With --early-stop: the step training stopped after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_early_at: Option<usize>,
    pub machine: String,
    /// The GPU the run ran on (`cuda:0, NVIDIA H100 80GB HBM3`, with its memory); absent on the CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    /// On a GPU: the most device memory in use after any step (the driver's used figure, so it includes the CUDA
    /// context and any other process on the card).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_used_peak_bytes: Option<usize>,
    /// The command line this process was started with (`qtune train ...`), to re-run or re-plan the run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Every other field: the method's own evaluation figures (`dev_side_share`, ...) and what other writers add
    /// (the peers' `peer`).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Summary {
    /// Adds a split's evaluation figures as `<split>_<name>` fields.
    pub fn add_figures(&mut self, split: &str, figures: &[(&'static str, f64)]) {
        for (name, v) in figures {
            self.extra.insert(format!("{split}_{name}"), serde_json::json!(v));
        }
    }

    /// Reads `<dir>/summary.json`.
    pub fn read(dir: &Path) -> Result<Summary> {
        let path = dir.join("summary.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
        let s: Summary =
            serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("not a run summary: {e}")))?;
        // Every field has a default (summaries grew over time), so `{}` would parse: a run always names its method.
        if s.method.is_empty() {
            return Err(Error::file(&path, "not a run summary: no `method`"));
        }
        Ok(s)
    }

    /// Writes `<out>/summary.json` atomically.
    pub fn write(&self, out: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Msg(e.to_string()))?;
        crate::io::write_bytes_atomic(&out.join("summary.json"), &json)
    }
}

/// "2 threads, <CPU model> (avx2+fma avx512f ...)": the machine a run was measured on, with the vector features
/// the kernels could use (they change between sessions on the same machine kind).
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let int8 = qtune_quant::int8::kernel_name();
    format!("{threads} threads, {cpu} ({}; int8 kernel {int8})", qtune_quant::CpuFeatures::detect())
}

/// The GPU `dev` is, for a summary: its ordinal, name and memory (None on the CPU).
pub fn gpu(dev: &candle_core::Device) -> Option<String> {
    if dev.is_cpu() {
        return None;
    }
    let name = crate::device::gpu_name(dev).unwrap_or_else(|| "unknown GPU".into());
    let mem = crate::device::gpu_memory(dev).map_or(String::new(), |(_, total)| format!(", {} MiB", total >> 20));
    Some(format!("{}, {name}{mem}", crate::device::name(dev)))
}

/// The median (the upper one of an even count), None for no values.
pub fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// Reads a run's `log.jsonl` for `--resume`. A last line that does not parse was cut by a kill in mid-write: it is
/// a step after the checkpoint (the checkpoint is written after its step's line), so it is dropped; any other bad
/// line is an error naming it.
pub fn read_log(path: &Path) -> Result<Vec<LogLine>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A summary written and read back is the same; a peer's partial summary reads with its other fields kept.
    #[test]
    fn summaries_round_trip_and_partial_ones_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Summary { method: "qst".into(), steps: Some(3), eval_accuracy: Some(0.5), ..Default::default() };
        s.add_figures("dev", &[("side_share", 0.25)]);
        s.write(dir.path()).unwrap();
        let back = Summary::read(dir.path()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&s).unwrap());
        assert_eq!(back.extra["dev_side_share"], 0.25);
        std::fs::write(dir.path().join("summary.json"), r#"{"method": "torch-adamw", "peer": {"torch": "2"}}"#)
            .unwrap();
        let peer = Summary::read(dir.path()).unwrap();
        assert_eq!((peer.method.as_str(), peer.steps), ("torch-adamw", None));
        assert_eq!(peer.extra["peer"]["torch"], "2");
        std::fs::write(dir.path().join("summary.json"), "[1]").unwrap();
        let e = Summary::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("summary.json") && e.contains("not a run summary"), "{e}");
        std::fs::write(dir.path().join("summary.json"), "{}").unwrap();
        let e = Summary::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no `method`"), "{e}");
    }

    /// A log line's method figures are top-level keys, as earlier logs wrote them.
    #[test]
    fn log_lines_flatten_the_methods_figures() {
        let l = LogLine {
            step: 1,
            loss: 0.5,
            lr: 1e-3,
            grad_norm: None,
            applied: true,
            tokens: 10,
            step_time_s: 0.1,
            rss_bytes: 0,
            memory: Breakdown::default(),
            figures: BTreeMap::from([("changed_fraction".to_string(), 0.01)]),
        };
        let v = serde_json::to_value(&l).unwrap();
        assert_eq!(v["changed_fraction"], 0.01);
        let back: LogLine = serde_json::from_value(v).unwrap();
        assert_eq!(back.figures["changed_fraction"], 0.01);
    }
}

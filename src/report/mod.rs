//! Reports across runs: a Markdown table, the raw numbers as JSON, and plots — the loss curves of all runs on one
//! chart and a stacked bar of each run's memory breakdown — as SVG (drawn here) and PNG (rendered with resvg).
//! Runs that wrote `predictions.jsonl` are also compared example by example ([`paired`]): on a few hundred
//! examples a gap of a point or two between two runs' accuracies can be noise, and the pairing says how much.
//! Two-class runs also get their ROC AUC ([`ranking`]): what their scores carry beyond the label prior.
pub mod plots;
pub mod stats;
pub mod tables;

pub use plots::{dev_svg, loss_svg, memory_svg, svg_to_png};
pub use stats::{auc, mcnemar_exact, paired, ranking, MarginPart, Paired, Ranking, VersusMajority};
pub use tables::{paired_table, ranking_table, table};

use crate::train::eval::Prediction;
use crate::train::records::Summary;
use crate::{Error, Result};
use serde::Serialize;
use std::path::Path;

/// One run as its output folder holds it.
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    pub name: String,
    pub summary: Summary,
    /// (step, loss) from log.jsonl.
    pub losses: Vec<(usize, f64)>,
    /// The dev evaluations during training (dev.jsonl, runs with --eval-every).
    pub dev: Vec<crate::train::selection::DevPoint>,
    /// (split, answer) from predictions.jsonl (classification runs).
    #[serde(skip)]
    pub predictions: Vec<(String, Prediction)>,
}

/// Reads `<dir>/summary.json` and, when present, `<dir>/log.jsonl`.
pub fn read_run(dir: &Path) -> Result<RunRecord> {
    let summary = Summary::read(dir)?;
    let mut losses = Vec::new();
    let lp = dir.join("log.jsonl");
    if lp.exists() {
        for (line, row) in crate::data::rows::read_jsonl(&lp)? {
            let step = row.get("step").and_then(|v| v.as_u64());
            let loss = row.get("loss").and_then(|v| v.as_f64());
            match (step, loss) {
                (Some(s), Some(l)) => losses.push((s as usize, l)),
                _ => return Err(Error::line(&lp, line, "a log line needs `step` and `loss`")),
            }
        }
    }
    let mut dev = Vec::new();
    let dp = dir.join("dev.jsonl");
    if dp.exists() {
        for (line, row) in crate::data::rows::read_jsonl(&dp)? {
            dev.push(
                serde_json::from_value(serde_json::Value::Object(row))
                    .map_err(|e| Error::line(&dp, line, format!("not a dev evaluation: {e}")))?,
            );
        }
    }
    let mut predictions = Vec::new();
    let pp = dir.join("predictions.jsonl");
    if pp.exists() {
        for (line, row) in crate::data::rows::read_jsonl(&pp)? {
            let split = row.get("split").and_then(|v| v.as_str()).map(str::to_owned);
            let p = serde_json::from_value::<Prediction>(serde_json::Value::Object(row));
            match (split, p) {
                (Some(split), Ok(p)) => predictions.push((split, p)),
                (None, _) => return Err(Error::line(&pp, line, "a prediction needs `split`")),
                (_, Err(e)) => return Err(Error::line(&pp, line, format!("not a prediction: {e}"))),
            }
        }
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(RunRecord { name, summary, losses, dev, predictions })
}

/// Writes `results.md`, `results.json`, `loss.{svg,png}` and `memory.{svg,png}` for `runs` into `out`.
pub fn write_report(runs: &[RunRecord], out: &Path, title: &str) -> Result<String> {
    let md = table(runs) + &paired_table(runs) + &ranking_table(runs);
    crate::io::write_bytes_atomic(&out.join("results.md"), md.as_bytes())?;
    let json = serde_json::to_vec_pretty(runs).map_err(|e| Error::Msg(e.to_string()))?;
    crate::io::write_bytes_atomic(&out.join("results.json"), &json)?;
    let mut plots = vec![
        ("loss", loss_svg(runs, &format!("{title}: training loss (dots: dev loss)"))),
        ("memory", memory_svg(runs, &format!("{title}: memory"))),
    ];
    if runs.iter().any(|r| !r.dev.is_empty()) {
        plots.push(("dev", dev_svg(runs, &format!("{title}: dev accuracy during training"))));
    }
    for (name, svg) in plots {
        crate::io::write_bytes_atomic(&out.join(format!("{name}.svg")), svg.as_bytes())?;
        svg_to_png(&svg, &out.join(format!("{name}.png")))?;
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, rss: f64, losses: Vec<(usize, f64)>) -> RunRecord {
        let summary = serde_json::from_value(serde_json::json!({"method": name, "peak_rss_bytes": rss as u64,
            "bytes_per_param": 3.1, "dev_accuracy_after": 0.625,
            "breakdown": {"weights": 100, "gradients": 50, "optimizer": 50, "activations": 10, "scratch": 1}}))
        .unwrap();
        RunRecord { name: name.into(), summary, losses, dev: vec![], predictions: vec![] }
    }

    /// Answers written by the trainer read back and pair on shared examples only: a right on 1, 2, 3, b right on
    /// 1 and 4, example 5 answered by a only. Counts, the difference (+1 of 4 = +25 points) and its interval by hand.
    #[test]
    fn runs_pair_on_shared_examples() {
        use crate::train::eval::{write_predictions, EvalResult};
        let answers = |right: &[u32], keys: &[u32]| EvalResult {
            accuracy: 0.0,
            loss: 0.0,
            majority: None,
            examples: keys.len(),
            tokens: 0,
            seconds: 0.0,
            figures: vec![],
            note: String::new(),
            predictions: keys
                .iter()
                .map(|&k| Prediction {
                    example: k as usize,
                    key: format!("{k:016x}"),
                    label: 1,
                    predicted: right.contains(&k) as u32,
                    loss: 0.5,
                    side: None,
                })
                .collect(),
        };
        let dir = tempfile::tempdir().unwrap();
        let mut runs = Vec::new();
        for (name, r) in [("a", answers(&[1, 2, 3], &[1, 2, 3, 4, 5])), ("b", answers(&[1, 4], &[1, 2, 3, 4]))] {
            let d = dir.path().join(name);
            Summary { method: name.into(), ..Default::default() }.write(&d).unwrap();
            write_predictions(&d, &[("dev", None), ("eval", Some(&r))]).unwrap();
            let back = read_run(&d).unwrap();
            assert_eq!(back.predictions.len(), r.predictions.len());
            assert_eq!(back.predictions[0], ("eval".to_string(), r.predictions[0].clone()));
            runs.push(back);
        }
        let p = paired(&runs[0], &runs[1]).unwrap();
        assert_eq!((p.examples, p.both_right, p.only_a, p.only_b, p.both_wrong), (4, 1, 2, 1, 0));
        assert!((p.diff_points - 25.0).abs() < 1e-12);
        // var = ((2 + 1)/4 − 0.25²)/4 = 0.171875.
        let half = 100.0 * 1.96 * 0.171875f64.sqrt();
        assert!((p.ci95_points.0 - (25.0 - half)).abs() < 1e-9 && (p.ci95_points.1 - (25.0 + half)).abs() < 1e-9);
        assert_eq!(p.p_value, 1.0);
        let md = paired_table(&runs);
        assert!(md.contains("| a | b | eval | 4 | 1 | 2 | 1 | 0 | +25.0 |"), "{md}");
        std::fs::write(dir.path().join("b/predictions.jsonl"), "{\"split\": \"eval\"}\n").unwrap();
        let err = read_run(&dir.path().join("b")).unwrap_err().to_string();
        assert!(err.contains("predictions.jsonl") && err.contains("not a prediction"), "{err}");
    }

    /// P(class 1) from each answer's loss over the two label words: label 1 with loss −ln 0.8 scores 0.8, label 0
    /// with loss −ln 0.7 scores 0.3. A three-class run has no ranking.
    #[test]
    fn ranking_reads_class_one_probabilities() {
        let pred = |k: u32, label: u32, p_label: f64| Prediction {
            example: k as usize,
            key: format!("{k:016x}"),
            label,
            predicted: label,
            loss: -p_label.ln(),
            side: None,
        };
        let mut r = run("a", 1e9, vec![]);
        r.predictions = vec![("eval".into(), pred(0, 1, 0.8)), ("eval".into(), pred(1, 0, 0.7))];
        let k = ranking(&r).unwrap();
        assert_eq!((k.examples, k.share1, k.auc), (2, 0.5, 1.0));
        assert!((k.mean_p1 - 0.55).abs() < 1e-12, "{k:?}");
        assert!(ranking_table(&[r.clone()]).contains("| a | eval | 2 | 0.500 | 0.550 | 1.000 | – | – |"));
        // With side parts: example 0's margin ln 4 = 1.386 is side 2 + rest −0.614; example 1's margin −ln(0.7/0.3)
        // = −0.847 is side 0.5 + rest −1.347. The side part ranks them right (2 > 0.5), the rest too
        // (−0.614 > −1.347); swapping the side parts makes the side branch rank them wrong.
        let with_side = |s0: [f32; 2], s1: [f32; 2]| {
            let mut r = r.clone();
            r.predictions[0].1.side = Some(s0.to_vec());
            r.predictions[1].1.side = Some(s1.to_vec());
            r
        };
        let aucs = |r: RunRecord| ranking(&r).unwrap().parts.map(|[s, b]| (s.auc, b.auc));
        assert_eq!(aucs(with_side([0.0, 2.0], [0.0, 0.5])), Some((1.0, 1.0)));
        assert_eq!(aucs(with_side([0.0, 0.5], [0.0, 2.0])), Some((0.0, 1.0)));
        // Side parts 2 and 0.5: mean 1.25, sd 0.75; rest ln 4 − 2 and −ln(7/3) − 0.5: mean −0.981, sd 0.367.
        let table = ranking_table(&[with_side([0.0, 2.0], [0.0, 0.5])]);
        assert!(table.contains("| 1.000 | +1.250 ± 0.750, 1.000 | -0.981 ± 0.367, 1.000 |"), "{table}");
        r.predictions.push(("eval".into(), pred(2, 2, 0.5)));
        assert!(ranking(&r).is_none());
    }

    #[test]
    fn table_and_plots_render() {
        let runs = vec![run("qft", 3e9, vec![(0, 0.7), (1, 0.6)]), run("full-lion", 4e9, vec![(0, 0.7), (1, 0.5)])];
        let md = table(&runs);
        assert!(md.contains("| qft | qft | 2861 | 3.10 |"), "{md}");
        assert!(md.contains("| 62.5 |"), "{md}");
        assert!(md.contains("| – | – | 62.5 |"), "MFU and dev-before absent: {md}");
        let dir = tempfile::tempdir().unwrap();
        write_report(&runs, dir.path(), "test").unwrap();
        for f in ["results.md", "results.json", "loss.svg", "loss.png", "memory.svg", "memory.png"] {
            assert!(dir.path().join(f).metadata().unwrap().len() > 100, "{f}");
        }
        let png = std::fs::read(dir.path().join("loss.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}

//! Reports across runs: a Markdown table, the raw numbers as JSON, and plots — the loss curves of all runs on one
//! chart and a stacked bar of each run's memory breakdown — as SVG (drawn here) and PNG (rendered with resvg).
//! Runs that wrote `predictions.jsonl` are also compared example by example ([`paired`]): on a few hundred
//! examples a gap of a point or two between two runs' accuracies can be noise, and the pairing says how much.
//! Two-class runs also get their ROC AUC ([`ranking`]): what their scores carry beyond the label prior.
use crate::train::memory::Breakdown;
use crate::train::trainer::Prediction;
use crate::{Error, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// One run as its output folder holds it.
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    pub name: String,
    pub summary: serde_json::Value,
    /// (step, loss) from log.jsonl.
    pub losses: Vec<(usize, f64)>,
    /// (split, answer) from predictions.jsonl (classification runs).
    #[serde(skip)]
    pub predictions: Vec<(String, Prediction)>,
}

/// Reads `<dir>/summary.json` and, when present, `<dir>/log.jsonl`.
pub fn read_run(dir: &Path) -> Result<RunRecord> {
    let sp = dir.join("summary.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::file(&sp, format!("cannot read: {e}")))?;
    let summary: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&sp, format!("not JSON: {e}")))?;
    let mut losses = Vec::new();
    let lp = dir.join("log.jsonl");
    if lp.exists() {
        for (line, row) in crate::data::tasks::read_jsonl(&lp)? {
            let step = row.get("step").and_then(|v| v.as_u64());
            let loss = row.get("loss").and_then(|v| v.as_f64());
            match (step, loss) {
                (Some(s), Some(l)) => losses.push((s as usize, l)),
                _ => return Err(Error::line(&lp, line, "a log line needs `step` and `loss`")),
            }
        }
    }
    let mut predictions = Vec::new();
    let pp = dir.join("predictions.jsonl");
    if pp.exists() {
        for (line, row) in crate::data::tasks::read_jsonl(&pp)? {
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
    Ok(RunRecord { name, summary, losses, predictions })
}

/// Two runs' answers on the examples both answered (one split: "eval" where both have it, else "dev").
#[derive(Clone, Debug, PartialEq)]
pub struct Paired {
    pub a: String,
    pub b: String,
    pub split: String,
    pub examples: usize,
    pub both_right: usize,
    pub only_a: usize,
    pub only_b: usize,
    pub both_wrong: usize,
    /// Accuracy of a minus accuracy of b, in points, and its 95% interval (normal approximation of the paired
    /// difference: var = ((only_a + only_b)/n − d²)/n).
    pub diff_points: f64,
    pub ci95_points: (f64, f64),
    /// Exact two-sided McNemar test: the probability of a split of the discordant examples at least this uneven if
    /// the two runs were equally accurate.
    pub p_value: f64,
}

/// Pairs `a`'s and `b`'s answers by example key; `None` when they share no example.
pub fn paired(a: &RunRecord, b: &RunRecord) -> Option<Paired> {
    let has = |r: &RunRecord, s: &str| r.predictions.iter().any(|(x, _)| x == s);
    let split = ["eval", "dev"].into_iter().find(|s| has(a, s) && has(b, s))?;
    let answers = |r: &RunRecord| -> std::collections::HashMap<String, bool> {
        r.predictions.iter().filter(|(x, _)| x == split).map(|(_, p)| (p.key.clone(), p.predicted == p.label)).collect()
    };
    let (ra, rb) = (answers(a), answers(b));
    let mut counts = [0usize; 4]; // both right, only a, only b, both wrong
    for (key, &right_a) in &ra {
        if let Some(&right_b) = rb.get(key) {
            counts[match (right_a, right_b) {
                (true, true) => 0,
                (true, false) => 1,
                (false, true) => 2,
                (false, false) => 3,
            }] += 1;
        }
    }
    let n = counts.iter().sum::<usize>();
    if n == 0 {
        return None;
    }
    let (nf, disc) = (n as f64, (counts[1] + counts[2]) as f64);
    let d = (counts[1] as f64 - counts[2] as f64) / nf;
    let half = 1.96 * ((disc / nf - d * d).max(0.0) / nf).sqrt();
    Some(Paired {
        a: a.name.clone(),
        b: b.name.clone(),
        split: split.into(),
        examples: n,
        both_right: counts[0],
        only_a: counts[1],
        only_b: counts[2],
        both_wrong: counts[3],
        diff_points: 100.0 * d,
        ci95_points: (100.0 * (d - half), 100.0 * (d + half)),
        p_value: mcnemar_exact(counts[1], counts[2]),
    })
}

/// Two-sided exact McNemar p-value: 2·P(X ≤ min(b, c)) for X ~ Binomial(b + c, 1/2), at most 1. The terms are
/// built in log space (2^−n underflows f64 past n ≈ 1074).
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    let mut log_term = -(n as f64) * std::f64::consts::LN_2; // log C(n, 0) / 2^n
    let mut tail = 0.0;
    for i in 0..=b.min(c) {
        tail += log_term.exp();
        log_term += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
    }
    (2.0 * tail).min(1.0)
}

/// The first run with answers against each later one, on the examples they share (Markdown; empty if no pair).
pub fn paired_table(runs: &[RunRecord]) -> String {
    let Some(i) = runs.iter().position(|r| !r.predictions.is_empty()) else {
        return String::new();
    };
    let pairs: Vec<Paired> = runs[i + 1..].iter().filter_map(|b| paired(&runs[i], b)).collect();
    if pairs.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\n| a | b | split | examples | both right | only a right | only b right | both wrong | a − b (points) | 95% interval | McNemar p |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in &pairs {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:+.1} | {:+.1} … {:+.1} | {:.3} |",
            p.a,
            p.b,
            p.split,
            p.examples,
            p.both_right,
            p.only_a,
            p.only_b,
            p.both_wrong,
            p.diff_points,
            p.ci95_points.0,
            p.ci95_points.1,
            p.p_value
        );
    }
    s
}

/// How well a two-class run's scores order the examples, whatever its decision threshold: a run that has learned
/// only the label prior answers the majority class everywhere and its accuracy says nothing of what its scores
/// carry. Read from `predictions.jsonl` (one split: "eval" where the run has it, else "dev").
#[derive(Clone, Debug, PartialEq)]
pub struct Ranking {
    pub name: String,
    pub split: String,
    pub examples: usize,
    /// Mean P(class 1): the run's prior (the data's is the share of class 1).
    pub mean_p1: f64,
    /// Share of class 1 in the split.
    pub share1: f64,
    /// ROC AUC of P(class 1): the chance that a class-1 example scores above a class-0 one (ties count half).
    pub auc: f64,
    /// A run with a side branch (QST): its class-1 logit margin split into the side branch's part and the rest
    /// (the frozen base's state, scaled by α), [side, rest].
    pub parts: Option<[MarginPart; 2]>,
}

/// One part of a two-class run's logit margin over a split's examples: its mean (what it adds to the prior), its
/// spread, and its AUC scored alone (what of the ranking it carries).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MarginPart {
    pub mean: f64,
    pub sd: f64,
    pub auc: f64,
}

impl MarginPart {
    fn of(scored: &[(f64, bool)]) -> Option<Self> {
        let n = scored.len() as f64;
        let mean = scored.iter().map(|s| s.0).sum::<f64>() / n;
        let sd = (scored.iter().map(|s| (s.0 - mean).powi(2)).sum::<f64>() / n).sqrt();
        Some(MarginPart { mean, sd, auc: auc(scored)? })
    }
}

/// The ranking of a run whose answers are two-class (every label and answer 0 or 1); `None` otherwise. Each
/// prediction's loss is the cross-entropy over the two label words, so P(label) = exp(−loss).
pub fn ranking(r: &RunRecord) -> Option<Ranking> {
    let split = ["eval", "dev"].into_iter().find(|s| r.predictions.iter().any(|(x, _)| x == s))?;
    let preds: Vec<&Prediction> = r.predictions.iter().filter(|(x, _)| x == split).map(|(_, p)| p).collect();
    if preds.iter().any(|p| p.label > 1 || p.predicted > 1) {
        return None;
    }
    let scored: Vec<(f64, bool)> = preds
        .iter()
        .map(|p| {
            let p_label = (-p.loss).exp();
            (if p.label == 1 { p_label } else { 1.0 - p_label }, p.label == 1)
        })
        .collect();
    // The class-1 margin logit₁ − logit₀ from the label's loss softplus(−margin_label), split into the side part and
    // the rest.
    let parts = preds
        .iter()
        .map(|p| {
            let s = p.side.as_ref().filter(|s| s.len() == 2)?;
            let m_label = -p.loss.exp_m1().ln();
            let margin = if p.label == 1 { m_label } else { -m_label };
            let side = (s[1] - s[0]) as f64;
            Some(((side, p.label == 1), (margin - side, p.label == 1)))
        })
        .collect::<Option<(Vec<_>, Vec<_>)>>()
        .and_then(|(side, rest)| Some([MarginPart::of(&side)?, MarginPart::of(&rest)?]));
    let n = scored.len() as f64;
    Some(Ranking {
        name: r.name.clone(),
        split: split.into(),
        examples: scored.len(),
        mean_p1: scored.iter().map(|s| s.0).sum::<f64>() / n,
        share1: scored.iter().filter(|s| s.1).count() as f64 / n,
        auc: auc(&scored)?,
        parts,
    })
}

/// ROC AUC by ranks (Mann–Whitney U): sort the scores, give tied scores their mean rank, and
/// AUC = (sum of the positives' ranks − n₊(n₊ + 1)/2) / (n₊·n₋). `None` when one class is absent.
pub fn auc(scored: &[(f64, bool)]) -> Option<f64> {
    let mut v = scored.to_vec();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut i) = (0.0, 0);
    while i < v.len() {
        let j = i + v[i..].iter().take_while(|x| x.0 == v[i].0).count();
        let mean_rank = (i + 1 + j) as f64 / 2.0; // ranks i + 1 ..= j
        rank_sum += mean_rank * v[i..j].iter().filter(|x| x.1).count() as f64;
        i = j;
    }
    let pos = v.iter().filter(|x| x.1).count() as f64;
    let neg = v.len() as f64 - pos;
    (pos > 0.0 && neg > 0.0).then(|| (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg))
}

/// Every two-class run's prior and AUC (Markdown; empty if none).
pub fn ranking_table(runs: &[RunRecord]) -> String {
    let rows: Vec<Ranking> = runs.iter().filter_map(ranking).collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\n| run | split | examples | class-1 share | mean P(class 1) | AUC | side branch's margin: mean ± sd, AUC | \
         the rest's |\n|---|---|---|---|---|---|---|---|\n",
    );
    let part =
        |p: Option<MarginPart>| p.map_or("–".into(), |p| format!("{:+.3} ± {:.3}, {:.3}", p.mean, p.sd, p.auc));
    for r in &rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {} | {} |",
            r.name,
            r.split,
            r.examples,
            r.share1,
            r.mean_p1,
            r.auc,
            part(r.parts.map(|p| p[0])),
            part(r.parts.map(|p| p[1]))
        );
    }
    s
}

fn breakdown(r: &RunRecord) -> Breakdown {
    serde_json::from_value(r.summary["breakdown"].clone()).unwrap_or_default()
}

fn mib(b: f64) -> String {
    format!("{:.0}", b / (1u64 << 20) as f64)
}

fn num(v: &serde_json::Value, digits: usize) -> String {
    v.as_f64().map_or("–".into(), |x| format!("{x:.digits$}"))
}

fn pct(v: &serde_json::Value) -> String {
    v.as_f64().map_or("–".into(), |x| format!("{:.1}", 100.0 * x))
}

/// The comparison table (one row per run).
pub fn table(runs: &[RunRecord]) -> String {
    let mut s = String::from(
        "| run | method | peak RSS MiB | model state B/param | weights MiB | gradients MiB | optimizer MiB | activations MiB | trainable params | step s | tokens/s | MFU % | dev acc before | dev acc after | eval acc |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let m = &r.summary;
        let b = breakdown(r);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            m["method"].as_str().unwrap_or("?"),
            mib(m["peak_rss_bytes"].as_f64().unwrap_or(0.0)),
            num(&m["bytes_per_param"], 2),
            mib(b.weights as f64),
            mib(b.gradients as f64),
            mib(b.optimizer as f64),
            mib(b.activations as f64),
            m["trainable_params"].as_u64().map_or("–".into(), |x| x.to_string()),
            num(&m["step_time_s"], 2),
            num(&m["tokens_per_s"], 1),
            pct(&m["mfu"]),
            pct(&m["dev_accuracy_before"]),
            pct(&m["dev_accuracy_after"]),
            pct(&m["eval_accuracy"]),
        );
    }
    s
}

const COLORS: [&str; 10] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

/// Loss against step for every run with a log, smoothed by an exponential moving average (raw losses faint).
pub fn loss_svg(runs: &[RunRecord], title: &str) -> String {
    let (w, h, l, r, t, b) = (760.0, 420.0, 60.0, 170.0, 40.0, 45.0);
    let runs: Vec<&RunRecord> = runs.iter().filter(|r| !r.losses.is_empty()).collect();
    let max_step = runs.iter().flat_map(|r| r.losses.iter().map(|p| p.0)).max().unwrap_or(1).max(1) as f64;
    let ys: Vec<f64> = runs.iter().flat_map(|r| r.losses.iter().map(|p| p.1)).filter(|y| y.is_finite()).collect();
    let (ymin, ymax) =
        (ys.iter().cloned().fold(f64::INFINITY, f64::min).min(0.0), ys.iter().cloned().fold(0.0, f64::max).max(1e-9));
    let x = |s: f64| l + (w - l - r) * s / max_step;
    let y = |v: f64| t + (h - t - b) * (1.0 - (v - ymin) / (ymax - ymin));
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="DejaVu Sans, sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" font-size="15" text-anchor="middle">{title}</text>"#,
        (w - r + l) / 2.0
    );
    axes(&mut s, (l, t, w - r, h - b), (0.0, max_step), (ymin, ymax), "step", "training loss");
    for (i, run) in runs.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        // Past the palette, the colours come round again dashed.
        let dash = if i >= COLORS.len() { r#" stroke-dasharray="6 3""# } else { "" };
        let raw: Vec<String> = run.losses.iter().map(|&(st, v)| format!("{:.1},{:.1}", x(st as f64), y(v))).collect();
        let _ = write!(s, r#"<polyline fill="none" stroke="{c}" stroke-opacity="0.25" points="{}"/>"#, raw.join(" "));
        let mut ema = run.losses[0].1;
        let smooth: Vec<String> = run
            .losses
            .iter()
            .map(|&(st, v)| {
                ema = 0.8 * ema + 0.2 * v;
                format!("{:.1},{:.1}", x(st as f64), y(ema))
            })
            .collect();
        let _ =
            write!(s, r#"<polyline fill="none" stroke="{c}" stroke-width="2"{dash} points="{}"/>"#, smooth.join(" "));
        let ly = t + 18.0 * i as f64 + 10.0;
        let _ = write!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="3"{dash}/><text x="{}" y="{}">{}</text>"#,
            w - r + 12.0,
            w - r + 32.0,
            w - r + 38.0,
            ly + 4.0,
            run.name
        );
    }
    s + "</svg>"
}

/// A stacked bar per run: weights, gradients, optimizer states, activations, scratch (MiB), and the peak RSS as a
/// marker.
pub fn memory_svg(runs: &[RunRecord], title: &str) -> String {
    let (w, h, l, r, t, b) = (760.0, 420.0, 60.0, 150.0, 40.0, 80.0);
    let parts = ["weights", "gradients", "optimizer", "activations", "scratch"];
    let vals: Vec<([f64; 5], f64)> = runs
        .iter()
        .map(|run| {
            let bd = breakdown(run);
            let m = |x: usize| x as f64 / (1u64 << 20) as f64;
            (
                [m(bd.weights), m(bd.gradients), m(bd.optimizer), m(bd.activations), m(bd.scratch)],
                run.summary["peak_rss_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
            )
        })
        .collect();
    let ymax = vals.iter().map(|(v, p)| v.iter().sum::<f64>().max(*p)).fold(1.0, f64::max) * 1.05;
    let y = |v: f64| t + (h - t - b) * (1.0 - v / ymax);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="DejaVu Sans, sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" font-size="15" text-anchor="middle">{title}</text>"#,
        (w - r + l) / 2.0
    );
    axes(&mut s, (l, t, w - r, h - b), (0.0, 0.0), (0.0, ymax), "", "MiB");
    let slot = (w - l - r) / vals.len().max(1) as f64;
    for (i, (v, peak)) in vals.iter().enumerate() {
        let x0 = l + slot * i as f64 + slot * 0.2;
        let bw = slot * 0.6;
        let mut acc = 0.0;
        for (k, part) in v.iter().enumerate() {
            let _ = write!(
                s,
                r#"<rect x="{x0:.1}" y="{:.1}" width="{bw:.1}" height="{:.1}" fill="{}"/>"#,
                y(acc + part),
                y(acc) - y(acc + part),
                COLORS[k]
            );
            acc += part;
        }
        let _ = write!(
            s,
            r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black" stroke-width="2" stroke-dasharray="4 2"/>"#,
            x0 - 4.0,
            y(*peak),
            x0 + bw + 4.0,
            y(*peak)
        );
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end" transform="rotate(-35 {:.1} {:.1})">{}</text>"#,
            x0 + bw / 2.0,
            h - b + 14.0,
            x0 + bw / 2.0,
            h - b + 14.0,
            runs[i].name
        );
    }
    for (k, part) in parts.iter().enumerate() {
        let ly = t + 18.0 * k as f64 + 10.0;
        let _ = write!(
            s,
            r#"<rect x="{}" y="{}" width="14" height="10" fill="{}"/><text x="{}" y="{}">{part}</text>"#,
            w - r + 12.0,
            ly - 5.0,
            COLORS[k],
            w - r + 32.0,
            ly + 4.0
        );
    }
    let ly = t + 18.0 * parts.len() as f64 + 10.0;
    let _ = write!(
        s,
        r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="black" stroke-width="2" stroke-dasharray="4 2"/><text x="{}" y="{}">peak RSS</text>"#,
        w - r + 10.0,
        w - r + 28.0,
        w - r + 32.0,
        ly + 4.0
    );
    s + "</svg>"
}

/// Frame, ticks and labels of a chart whose plot area is `(x0, y0, x1, y1)`; an empty x range draws no x ticks.
fn axes(
    s: &mut String,
    (x0, y0, x1, y1): (f64, f64, f64, f64),
    (xa, xb): (f64, f64),
    (ya, yb): (f64, f64),
    xlabel: &str,
    ylabel: &str,
) {
    let _ =
        write!(s, r##"<rect x="{x0}" y="{y0}" width="{}" height="{}" fill="none" stroke="#444"/>"##, x1 - x0, y1 - y0);
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let yy = y1 - (y1 - y0) * f;
        let _ = write!(
            s,
            r##"<line x1="{x0}" y1="{yy:.1}" x2="{x1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 - 5.0,
            yy + 4.0,
            tick(ya + (yb - ya) * f)
        );
        if xb > xa {
            let xx = x0 + (x1 - x0) * f;
            let v = xa + (xb - xa) * f;
            let label = if xb - xa >= 10.0 { format!("{v:.0}") } else { tick(v) };
            let _ = write!(s, r#"<text x="{xx:.1}" y="{}" text-anchor="middle">{label}</text>"#, y1 + 16.0);
        }
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{xlabel}</text><text x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">{ylabel}</text>"#,
        (x0 + x1) / 2.0,
        y1 + 34.0,
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0
    );
}

fn tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Renders an SVG to a PNG file (system fonts for the text).
pub fn svg_to_png(svg: &str, path: &Path) -> Result<()> {
    let mut opt = resvg::usvg::Options::default();
    opt.fontdb_mut().load_system_fonts();
    let tree = resvg::usvg::Tree::from_str(svg, &opt).map_err(|e| Error::Msg(format!("svg: {e}")))?;
    let size = tree.size().to_int_size();
    let mut pixmap =
        resvg::tiny_skia::Pixmap::new(size.width(), size.height()).ok_or_else(|| Error::Msg("empty image".into()))?;
    resvg::render(&tree, resvg::tiny_skia::Transform::default(), &mut pixmap.as_mut());
    let png = pixmap.encode_png().map_err(|e| Error::Msg(format!("png: {e}")))?;
    crate::io::write_bytes_atomic(path, &png)
}

/// Writes `results.md`, `results.json`, `loss.{svg,png}` and `memory.{svg,png}` for `runs` into `out`.
pub fn write_report(runs: &[RunRecord], out: &Path, title: &str) -> Result<String> {
    let md = table(runs) + &paired_table(runs) + &ranking_table(runs);
    crate::io::write_bytes_atomic(&out.join("results.md"), md.as_bytes())?;
    let json = serde_json::to_vec_pretty(runs).map_err(|e| Error::Msg(e.to_string()))?;
    crate::io::write_bytes_atomic(&out.join("results.json"), &json)?;
    for (name, svg) in [
        ("loss", loss_svg(runs, &format!("{title}: training loss"))),
        ("memory", memory_svg(runs, &format!("{title}: memory"))),
    ] {
        crate::io::write_bytes_atomic(&out.join(format!("{name}.svg")), svg.as_bytes())?;
        svg_to_png(&svg, &out.join(format!("{name}.png")))?;
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, rss: f64, losses: Vec<(usize, f64)>) -> RunRecord {
        let summary = serde_json::json!({"method": name, "peak_rss_bytes": rss, "bytes_per_param": 3.1,
            "breakdown": {"weights": 100, "gradients": 50, "optimizer": 50, "activations": 10, "scratch": 1},
            "dev_accuracy_after": 0.625});
        RunRecord { name: name.into(), summary, losses, predictions: vec![] }
    }

    /// Exact McNemar p-values against binomial sums by hand: (10, 2): 2·(1 + 12 + 66)/2¹²; (3, 0): 2/2³; equal
    /// splits give 1; past n = 1074 (where 2^−n underflows) the value stays a probability, symmetric in (b, c).
    #[test]
    fn mcnemar_matches_binomial_sums() {
        assert!((mcnemar_exact(10, 2) - 158.0 / 4096.0).abs() < 1e-15);
        assert!((mcnemar_exact(0, 3) - 0.25).abs() < 1e-15);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        let (p, q) = (mcnemar_exact(700, 800), mcnemar_exact(800, 700));
        // Normal approximation: z = 100/√1500 = 2.58, two-sided 0.0098; the exact value is close to it.
        assert!(p == q && (p - 0.0098).abs() < 0.002, "{p}");
    }

    /// Answers written by the trainer read back and pair on shared examples only: a right on 1, 2, 3, b right on
    /// 1 and 4, example 5 answered by a only. Counts, the difference (+1 of 4 = +25 points) and its interval by hand.
    #[test]
    fn runs_pair_on_shared_examples() {
        use crate::train::trainer::{write_predictions, EvalResult};
        let answers = |right: &[u32], keys: &[u32]| EvalResult {
            accuracy: 0.0,
            loss: 0.0,
            majority: None,
            examples: keys.len(),
            tokens: 0,
            seconds: 0.0,
            side_share: None,
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
            crate::train::trainer::write_summary(&d, &serde_json::json!({"method": name})).unwrap();
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

    /// AUC by ranks against the pairwise count by brute force (ties count half), on scores with ties; a perfect
    /// ranking is 1, a reversed one 0, one class alone has none.
    #[test]
    fn auc_matches_pairwise_counts() {
        let scored: Vec<(f64, bool)> = [0.1, 0.4, 0.4, 0.35, 0.8, 0.4, 0.9, 0.1, 0.55]
            .iter()
            .zip([false, true, false, true, true, false, true, true, false])
            .map(|(&s, y)| (s, y))
            .collect();
        let (mut wins, mut pairs) = (0.0, 0.0);
        for a in scored.iter().filter(|x| x.1) {
            for b in scored.iter().filter(|x| !x.1) {
                pairs += 1.0;
                wins += if a.0 > b.0 {
                    1.0
                } else if a.0 == b.0 {
                    0.5
                } else {
                    0.0
                };
            }
        }
        assert!((auc(&scored).unwrap() - wins / pairs).abs() < 1e-15);
        assert_eq!(auc(&[(0.2, false), (0.9, true)]), Some(1.0));
        assert_eq!(auc(&[(0.9, false), (0.2, true)]), Some(0.0));
        assert_eq!(auc(&[(0.9, true), (0.2, true)]), None);
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

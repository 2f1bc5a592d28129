//! The report's Markdown tables: one row per run (memory, speed, accuracy), the paired comparisons and the
//! two-class rankings.
use super::stats::{paired, ranking, MarginPart, Paired, Ranking};
use super::RunRecord;
use std::fmt::Write as _;

fn mib(b: f64) -> String {
    format!("{:.0}", b / (1u64 << 20) as f64)
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.digits$}"))
}

fn pct(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{:.1}", 100.0 * x))
}

/// The comparison table (one row per run).
pub fn table(runs: &[RunRecord]) -> String {
    let mut s = String::from(
        "| run | method | peak RSS MiB | model state B/param | weights MiB | gradients MiB | optimizer MiB | activations MiB | trainable params | step s | tokens/s | MFU % | dev acc before | dev acc after | eval acc |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let (m, b) = (&r.summary, &r.summary.breakdown);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            m.method,
            mib(m.peak_rss_bytes.unwrap_or(0) as f64),
            num(m.bytes_per_param, 2),
            mib(b.weights as f64),
            mib(b.gradients as f64),
            mib(b.optimizer as f64),
            mib(b.activations as f64),
            m.trainable_params.map_or("–".into(), |x| x.to_string()),
            num(m.step_time_s, 2),
            num(m.tokens_per_s, 1),
            pct(m.mfu),
            pct(m.dev_accuracy_before),
            pct(m.dev_accuracy_after),
            pct(m.eval_accuracy),
        );
    }
    s
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

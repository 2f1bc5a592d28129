//! The report's plots: every run's loss curve on one chart and a stacked bar of each run's memory breakdown, drawn
//! as SVG here and rendered to PNG with resvg.
use super::RunRecord;
use crate::{Error, Result};
use std::fmt::Write as _;
use std::path::Path;

const COLORS: [&str; 10] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

/// Loss against step for every run with a log, smoothed by an exponential moving average (raw losses faint).
pub fn loss_svg(runs: &[RunRecord], title: &str) -> String {
    let (w, h, l, r, t, b) = (760.0, 420.0, 60.0, 170.0, 40.0, 45.0);
    let runs: Vec<&RunRecord> = runs.iter().filter(|r| !r.losses.is_empty()).collect();
    let max_step = runs.iter().flat_map(|r| r.losses.iter().map(|p| p.0)).max().unwrap_or(1).max(1) as f64;
    let ys: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.losses.iter().map(|p| p.1).chain(r.dev.iter().map(|d| d.loss)))
        .filter(|y| y.is_finite())
        .collect();
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
        // Dev losses during training: dots joined by a thin line.
        let dev: Vec<(f64, f64)> = run.dev.iter().map(|d| (x(d.step as f64), y(d.loss))).collect();
        if !dev.is_empty() {
            let pts: Vec<String> = dev.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
            let _ = write!(s, r#"<polyline fill="none" stroke="{c}" stroke-width="1" points="{}"/>"#, pts.join(" "));
            for (a, b) in dev {
                let _ = write!(s, r#"<circle cx="{a:.1}" cy="{b:.1}" r="3.5" fill="{c}"/>"#);
            }
        }
        legend(&mut s, (w - r, t), i, c, dash, &run.name);
    }
    s + "</svg>"
}

/// Dev accuracy against step for every run that evaluated during training (`--eval-every`), with each run's
/// majority-class accuracy as a dotted line where the task has one.
pub fn dev_svg(runs: &[RunRecord], title: &str) -> String {
    let (w, h, l, r, t, b) = (760.0, 420.0, 60.0, 170.0, 40.0, 45.0);
    let runs: Vec<&RunRecord> = runs.iter().filter(|r| !r.dev.is_empty()).collect();
    let max_step = runs.iter().flat_map(|r| r.dev.iter().map(|p| p.step)).max().unwrap_or(1).max(1) as f64;
    let ys: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.dev.iter().map(|p| p.accuracy).chain(r.summary.dev_majority))
        .filter(|y| y.is_finite())
        .collect();
    let ymin = (ys.iter().cloned().fold(1.0, f64::min) - 0.02).max(0.0);
    let ymax = (ys.iter().cloned().fold(0.0, f64::max) + 0.02).min(1.0).max(ymin + 1e-3);
    let x = |s: f64| l + (w - l - r) * s / max_step;
    let y = |v: f64| t + (h - t - b) * (1.0 - (v - ymin) / (ymax - ymin));
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="DejaVu Sans, sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" font-size="15" text-anchor="middle">{title}</text>"#,
        (w - r + l) / 2.0
    );
    axes(&mut s, (l, t, w - r, h - b), (0.0, max_step), (ymin, ymax), "step", "dev accuracy");
    for (i, run) in runs.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<String> =
            run.dev.iter().map(|d| format!("{:.1},{:.1}", x(d.step as f64), y(d.accuracy))).collect();
        let _ = write!(s, r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#, pts.join(" "));
        for d in &run.dev {
            let _ = write!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{c}"/>"#, x(d.step as f64), y(d.accuracy));
        }
        if let Some(m) = run.summary.dev_majority {
            let _ = write!(
                s,
                r#"<line x1="{l}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="{c}" stroke-dasharray="2 3"/>"#,
                y(m),
                w - r
            );
        }
        legend(&mut s, (w - r, t), i, c, "", &run.name);
    }
    s + "</svg>"
}

/// Entry `i` of a legend whose top-left corner is `at`: a line in colour `c` (with `dash`, an SVG attribute or "")
/// and the run's name.
fn legend(s: &mut String, at: (f64, f64), i: usize, c: &str, dash: &str, name: &str) {
    let ly = at.1 + 18.0 * i as f64 + 10.0;
    let _ = write!(
        s,
        r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="3"{dash}/><text x="{}" y="{}">{name}</text>"#,
        at.0 + 12.0,
        at.0 + 32.0,
        at.0 + 38.0,
        ly + 4.0,
    );
}

/// A stacked bar per run: weights, gradients, optimizer states, activations, scratch (MiB), and the peak RSS as a
/// marker.
pub fn memory_svg(runs: &[RunRecord], title: &str) -> String {
    let (w, h, l, r, t, b) = (760.0, 420.0, 60.0, 150.0, 40.0, 80.0);
    let parts = ["weights", "gradients", "optimizer", "activations", "scratch"];
    let vals: Vec<([f64; 5], f64)> = runs
        .iter()
        .map(|run| {
            let bd = run.summary.breakdown;
            let m = |x: usize| x as f64 / (1u64 << 20) as f64;
            (
                [m(bd.weights), m(bd.gradients), m(bd.optimizer), m(bd.activations), m(bd.scratch)],
                run.summary.peak_rss_bytes.unwrap_or(0) as f64 / (1u64 << 20) as f64,
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

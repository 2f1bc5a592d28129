//! Parity with the reference implementation: tiny random models made with `transformers` (LLaMA by
//! `scripts/make_tiny_llama.py`; Qwen2, Mistral and LLaMA with `llama3` / `dynamic` RoPE scaling by
//! `scripts/make_tiny_families.py`), whose logits, causal-LM loss and parameter gradients were computed in float64.
//! Budgets: f32 logits within 1e-4 of the largest |logit| (the bound); f64 logits, loss and gradients
//! within 1e-9 relative (both sides are f64; what remains is summation order).
use candle_core::{DType, Device, Tensor};
use qtune::model::{load_model, Batch, Keep, Llama, ParamId, Targets};
use qtune::train::DenseGrads;
use std::collections::HashMap;
use std::path::Path;

const F32_LOGIT_BUDGET: f64 = 1e-4;
const F64_BUDGET: f64 = 1e-9;

fn reference(dir: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(Path::new(dir).join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// max |a − b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    d / b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

fn ids_u32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

fn check_dir(dir: &str) {
    let refs = reference(dir);
    let loaded = load_model(Path::new(dir)).unwrap();
    let model = Llama::new(loaded.params.cfg.clone());
    let ids = ids_u32(&refs["input_ids"]);
    // f32 logits against the f64 reference.
    let logits = model.logits(&loaded.params, &ids).unwrap();
    let e32 = rel_err(&logits, &refs["logits"]);
    println!("{dir}: f32 max relative logit error {e32:.2e}");
    assert!(e32 < F32_LOGIT_BUDGET, "{dir}: f32 logits off by {e32:e}");
    // Padded batch: the real positions of the padded row match the reference run with an attention mask.
    let pids = ids_u32(&refs["input_ids_padded"]);
    let mask: Vec<Vec<i64>> = refs["attention_mask_padded"].to_vec2().unwrap();
    let pl = model.logits(&loaded.params, &pids).unwrap();
    for (b, row) in mask.iter().enumerate() {
        let n = row.iter().filter(|&&m| m == 1).count();
        let e = rel_err(
            &pl.get(b).unwrap().narrow(0, 0, n).unwrap(),
            &refs["logits_padded"].get(b).unwrap().narrow(0, 0, n).unwrap(),
        );
        assert!(e < F32_LOGIT_BUDGET, "{dir}: padded row {b} off by {e:e}");
    }
    // f64: logits, HF's causal-LM loss and every parameter's gradient.
    let p64 = loaded.params.to_dtype(DType::F64).unwrap();
    let e64 = rel_err(&model.logits(&p64, &ids).unwrap(), &refs["logits"]);
    assert!(e64 < F64_BUDGET, "{dir}: f64 logits off by {e64:e}");
    let (b, t) = ids.dims2().unwrap();
    let idv: Vec<Vec<u32>> = ids.to_vec2().unwrap();
    let mut positions = vec![];
    let mut labels = vec![];
    for (r, row) in idv.iter().enumerate() {
        for i in 0..t - 1 {
            positions.push((r * t + i) as u32);
            labels.push(row[i + 1]);
        }
    }
    let batch = Batch {
        ids: ids.clone(),
        lengths: vec![t; b],
        targets: Targets { positions, classes: None, labels, choices: None },
    };
    let (out, trace) = model.forward(&p64, &batch, Keep::All).unwrap();
    let ref_loss = refs["loss"].flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
    assert!(((out.loss as f64) - ref_loss).abs() / ref_loss < 1e-6, "loss {} vs {ref_loss}", out.loss);
    let mut grads = DenseGrads::default();
    model.backward(&p64, trace.unwrap(), &mut grads).unwrap();
    let mut worst = 0f64;
    for id in ParamId::all(&p64.cfg) {
        let r = &refs[&format!("grad.{}", id.hf_name())];
        let e = rel_err(grads.get(id).unwrap(), r);
        worst = worst.max(e);
        assert!(e < F64_BUDGET, "{dir}: gradient of {} off by {e:e}", id.hf_name());
    }
    println!("{dir}: f64 logits {e64:.2e}, worst gradient {worst:.2e}");
}

#[test]
fn tied_tiny_llama_matches_transformers() {
    check_dir("tests/fixtures/tiny_llama");
}

#[test]
fn untied_tiny_llama_matches_transformers() {
    check_dir("tests/fixtures/tiny_llama_untied");
}

#[test]
fn tiny_qwen2_with_qkv_biases_matches_transformers() {
    check_dir("tests/fixtures/tiny_qwen2");
}

#[test]
fn tiny_mistral_with_sliding_window_matches_transformers() {
    check_dir("tests/fixtures/tiny_mistral");
}

#[test]
fn tiny_llama3_rope_scaling_matches_transformers() {
    check_dir("tests/fixtures/tiny_llama3");
}

#[test]
fn tiny_llama_dynamic_rope_matches_transformers() {
    check_dir("tests/fixtures/tiny_llama_dynamic");
}

//! `qtune eval`: a model's accuracy and loss on a task's dev and eval splits, in f32, INT8/INT4 (`--bits`) or as a
//! QST export (NF4 base + side network); writes `summary.json` and `predictions.jsonl` as a training run does.
use super::{pad_id, tokenizer, Common};
use clap::Args;
use qtune::methods::qst::{QstModel, SideShare};
use qtune::model::load::read_header;
use qtune::model::quantized::{Compute, Source};
use qtune::model::{Batch, Keep, Llama, Weights};
use qtune::train::eval::{describe, evaluate, write_predictions, EvalProbe, EvalResult, EvalSettings};
use qtune::train::memory;
use qtune::train::records::{machine, Summary};
use qtune::{Error, Result};
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub int: super::IntModelArgs,
}

/// The model `qtune eval` runs: dense weights (f32 or INT8/INT4), or a QST export (NF4 base + side network).
enum EvalModel {
    Weights(Box<dyn Weights>),
    Qst(Box<QstModel>),
}

pub fn run(a: EvalArgs) -> Result<()> {
    let c = a.common;
    c.check()?;
    // A QST export names its base model; the decoder's shape and the tokenizer come from that base.
    let is_qst = QstModel::is_export(&c.model);
    if is_qst && a.int.bits.is_some() {
        return Err(Error::Option(format!("--bits: {} is a QST export (its base is NF4)", c.model.display())));
    }
    let qst = is_qst.then(|| QstModel::load(&c.model)).transpose()?;
    let base_path = qst.as_ref().map_or(c.model.clone(), |(_, p)| p.clone());
    let header = read_header(&base_path)?;
    c.note_context(&header.cfg);
    let tok = tokenizer(header.tokenizer, &base_path)?;
    let splits = c.splits(&tok)?;
    if is_qst {
        qtune::device::require_cpu(c.device.device, "a QST export (NF4 base)")?;
    }
    let int_compute = a.int.compute_on(c.device.device)?;
    let dev = c.device.device.open()?;
    let model = Llama::on(header.cfg, dev.clone());
    // f32, or quantized while the file is read (no f32 model in memory).
    let compute = if a.int.bits.is_some() { int_compute } else { Compute::F32 };
    let (run, weights, method) = match (qst, a.int.bits) {
        (Some((q, _)), _) => {
            let b = q.weight_bytes();
            (EvalModel::Qst(Box::new(q)), b, "inference-qst".to_string())
        }
        (None, None) => {
            let p = Source::File(c.model.clone()).params_on(&dev)?;
            let b = p.bytes();
            (EvalModel::Weights(Box::new(p)), b, "inference".into())
        }
        (None, Some(bits)) => {
            let (w, b) = super::int_weights(&c.model, bits, compute, &dev)?;
            let name = match compute {
                Compute::Int8 => format!("inference-int{bits}"),
                Compute::Int8Mixed => format!("inference-int{bits}-mixed"),
                Compute::F32 => format!("inference-int{bits}-f32"),
            };
            (EvalModel::Weights(w), b, name)
        }
    };
    let forward = |b: &Batch| match &run {
        EvalModel::Weights(w) => Ok(model.forward(w.as_ref(), b, Keep::Nothing)?.0),
        EvalModel::Qst(q) => q.forward(&model, b),
    };
    let probe = || -> Option<Box<dyn EvalProbe>> {
        matches!(run, EvalModel::Qst(_)).then(|| Box::new(SideShare::default()) as Box<dyn EvalProbe>)
    };
    let settings = EvalSettings {
        batch_size: c.eval_batch_size,
        max_len: c.max_seq_len,
        pad: pad_id(&model.cfg),
        device: model.device().clone(),
    };
    let (d, e) =
        (evaluate(&forward, &splits.dev, &settings, probe())?, evaluate(&forward, &splits.eval, &settings, probe())?);
    // An empty split has no accuracy.
    let acc = |r: &EvalResult| (r.examples > 0).then_some(r.accuracy);
    let loss = |r: &EvalResult| (r.examples > 0).then_some(r.loss);
    let params = model.cfg.num_params();
    let breakdown = memory::Breakdown { weights, ..Default::default() };
    let mut summary = Summary {
        method,
        model: c.model.display().to_string(),
        task: splits.task.clone(),
        steps: Some(0),
        batch_size: Some(c.eval_batch_size),
        max_seq_len: Some(c.max_seq_len),
        params: Some(params),
        trainable_params: Some(0),
        peak_rss_bytes: Some(memory::peak_rss_bytes()),
        model_state_bytes: Some(weights),
        breakdown,
        bytes_per_param: Some(weights as f64 / params as f64),
        tokens_per_s: Some((d.tokens + e.tokens) as f64 / (d.seconds + e.seconds)),
        dev_accuracy_before: acc(&d),
        dev_accuracy_after: acc(&d),
        eval_accuracy: acc(&e),
        dev_loss_before: loss(&d),
        dev_loss_after: loss(&d),
        eval_loss: loss(&e),
        dev_majority: d.majority,
        eval_majority: e.majority,
        machine: machine(),
        gpu: qtune::train::records::gpu(&dev),
        compute: Some(compute),
        ..Default::default()
    };
    summary.add_figures("dev", &d.figures);
    summary.add_figures("eval", &e.figures);
    if !qtune::dist::is_root() {
        // Under mpirun the ranks shared the evaluation out and hold the same result: rank 0 reports and writes.
        return Ok(());
    }
    eprintln!(
        "dev accuracy {}; eval accuracy {}; {:.0} tok/s",
        describe(&d),
        describe(&e),
        summary.tokens_per_s.unwrap_or(0.0)
    );
    let out = c.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/eval-{}", c.task_name())));
    summary.write(&out)?;
    write_predictions(&out, &[("dev", Some(&d)), ("eval", Some(&e))])?;
    eprint!("{}", memory::report(&breakdown, params, memory::peak_rss_bytes()));
    Ok(())
}

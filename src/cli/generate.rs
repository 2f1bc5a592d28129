//! `qtune generate`: a continuation of a prompt (greedy, or sampled with temperature, top-k and top-p), decoded
//! over a KV cache, from f32 weights or INT8/INT4 ones (`--bits`, quantized as the file is read); prints the text
//! and the speed.
use super::DEFAULT_MODEL;
use candle_core::{DType, Tensor};
use clap::Args;
use qtune::data::chat::{ChatTemplate, Message};
use qtune::data::tasks::encode_prompt;
use qtune::methods::qst::QstModel;
use qtune::model::generate::{KvCache, SamplerArgs};
use qtune::model::load::read_header;
use qtune::model::quantized::Source;
use qtune::model::{Batch, Llama, Targets, Weights};
use qtune::{Error, Result};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct GenArgs {
    /// HF model directory, GGUF file, or a run's model/ or model.gguf export (a QST export too).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt with the model's chat template (a user turn, then the assistant's generation prompt).
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub int: super::IntModelArgs,
    /// Recompute the whole text for every new token instead of keeping a KV cache (the old path; for comparison).
    #[arg(long)]
    pub no_kv_cache: bool,
    #[command(flatten)]
    pub device: qtune::device::DeviceArgs,
}

/// What produces the next-token logits: a decoder over weights (with or without the KV cache), or a QST export
/// (base plus side network; recomputed for every token: its side network has no cache).
enum Generator {
    Weights(Box<dyn Weights>),
    Qst(Box<QstModel>),
}

pub fn run(a: GenArgs) -> Result<()> {
    a.sampler.validate()?;
    // A QST export names its base model; the decoder's shape and the tokenizer come from that base.
    let qst = QstModel::is_export(&a.model).then(|| QstModel::load(&a.model)).transpose()?;
    if qst.is_some() && a.int.bits.is_some() {
        return Err(Error::Option(format!("--bits: {} is a QST export (its base is NF4)", a.model.display())));
    }
    let base_path = qst.as_ref().map_or(a.model.clone(), |(_, p)| p.clone());
    let header = read_header(&base_path)?;
    let tok = super::tokenizer(header.tokenizer, &base_path)?;
    if qst.is_some() {
        qtune::device::require_cpu(a.device.device, "a QST export (NF4 base)")?;
    }
    let compute = a.int.compute_on(a.device.device)?;
    let dev = a.device.device.open()?;
    let model = Llama::on(header.cfg.clone(), dev.clone());
    let gen = match (qst, a.int.bits) {
        (Some((q, _)), _) => Generator::Qst(Box::new(q)),
        (None, None) => Generator::Weights(Box::new(Source::File(a.model.clone()).params_on(&dev)?)),
        (None, Some(bits)) => Generator::Weights(super::int_weights(&a.model, bits, compute, &dev)?.0),
    };
    let no_cache = a.no_kv_cache || matches!(gen, Generator::Qst(_));
    let (text, mut ids) = if a.chat {
        let tmpl = ChatTemplate::of(&tok, None)?
            .ok_or_else(|| Error::file(&a.model, "--chat: the model has no chat template"))?;
        let user = [Message { role: "user".into(), content: a.prompt.clone() }];
        let text = tmpl.render(&user, true)?;
        let ids = tok.encode(&text)?;
        (text, ids)
    } else {
        (a.prompt.clone(), encode_prompt(&tok, &a.prompt)?)
    };
    if ids.is_empty() {
        return Err(Error::Option("--prompt is empty".into()));
    }
    let n_prompt = ids.len();
    let key = qtune::quant::rng::RngKey::new(a.seed, 0, 0);
    let mut cache = KvCache::default();
    let start = Instant::now();
    let mut first = None;
    for i in 0..a.max_new_tokens {
        let logits = match &gen {
            Generator::Weights(w) if a.no_kv_cache => model.next_logits(w.as_ref(), &ids, model.device())?,
            // The prompt the first time, then only the token just chosen.
            Generator::Weights(w) => model.decode(w.as_ref(), &ids[cache.len()..], &mut cache)?,
            Generator::Qst(q) => {
                let t = ids.len();
                let batch = Batch {
                    ids: Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?,
                    lengths: vec![t],
                    targets: Targets { positions: vec![t as u32 - 1], classes: None, labels: vec![0], choices: None },
                };
                q.forward(&model, &batch)?.logits.flatten_all()?.to_dtype(DType::F32)?
            }
        };
        let u = qtune::quant::rng::uniform(&key, i as u64) as f64;
        let next = a.sampler.pick(&logits.to_vec1()?, u);
        first.get_or_insert_with(|| start.elapsed());
        ids.push(next);
        if Some(next) == tok.specials.eos || Some(next) == model.cfg.eos_token_id {
            break;
        }
    }
    println!("{}{}", text, tok.decode(&ids[n_prompt..])?);
    let (total, first) = (start.elapsed().as_secs_f64(), first.unwrap_or_default().as_secs_f64());
    let new = ids.len() - n_prompt;
    // The rate after the first token, where there was more than one.
    let rate = match new {
        0 | 1 => String::new(),
        _ => format!(", then {:.1} tokens/s", (new - 1) as f64 / (total - first)),
    };
    eprintln!(
        "{new} new tokens after a {n_prompt}-token prompt: first in {first:.2} s{rate} ({}; KV cache {:.1} MiB)",
        if no_cache { "no KV cache" } else { "KV cache" },
        cache.bytes() as f64 / (1 << 20) as f64
    );
    Ok(())
}

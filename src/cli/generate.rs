//! `qtune generate`: a greedy or sampled continuation of a prompt, to eyeball a model.
use super::{device, DEFAULT_MODEL};
use clap::Args;
use qtune::data::chat::{ChatTemplate, Message};
use qtune::data::tasks::encode_prompt;
use qtune::model::{load_model, Llama};
use qtune::{Error, Result};
use std::path::PathBuf;

#[derive(Args)]
pub struct GenArgs {
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt with the model's chat template (a user turn, then the assistant's generation prompt).
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: GenArgs) -> Result<()> {
    let loaded = load_model(&a.model)?;
    let tok = super::tokenizer(loaded.tokenizer.clone(), &a.model)?;
    let model = Llama::on(loaded.params.cfg.clone(), device());
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
    for i in 0..a.max_new_tokens {
        let logits: Vec<f32> = model.next_logits(&loaded.params, &ids, model.device())?.to_vec1()?;
        let next = if a.temperature <= 0.0 {
            logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0)
        } else {
            let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let p: Vec<f64> = logits.iter().map(|&l| (((l - m) as f64) / a.temperature).exp()).collect();
            let mut u = qtune::quant::rng::uniform(&key, i as u64) as f64 * p.iter().sum::<f64>();
            p.iter()
                .position(|&x| {
                    u -= x;
                    u <= 0.0
                })
                .unwrap_or(p.len() - 1)
        } as u32;
        ids.push(next);
        if Some(next) == tok.specials.eos || Some(next) == model.cfg.eos_token_id {
            break;
        }
    }
    println!("{}{}", text, tok.decode(&ids[n_prompt..])?);
    Ok(())
}

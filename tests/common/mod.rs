//! Data files the integration tests train the tiny fixture model on (shared by `cli.rs`, `tasks.rs`, `dist.rs`).
#![allow(dead_code)]
use std::path::{Path, PathBuf};

/// `dir/lm.jsonl`: 24 prompt/completion rows ("Qi: what is i plus one?" → " i+1"), for the causal-LM task.
pub fn lm_data(dir: &Path) -> PathBuf {
    let p = dir.join("lm.jsonl");
    let rows: Vec<String> = (0..24)
        .map(|i| format!(r#"{{"prompt": "Q{i}: what is {i} plus one?", "completion": " {}"}}"#, i + 1))
        .collect();
    std::fs::write(&p, rows.join("\n")).unwrap();
    p
}

/// `dir/mc.jsonl`: `n` multiple-choice rows of three options, the answer cycling through them.
pub fn choice_data(dir: &Path, n: usize) -> PathBuf {
    let p = dir.join("mc.jsonl");
    let rows: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"context": "Q{i}: pick", "options": ["aa", "b{i}", "ccc"], "answer": {}}}"#, i % 3))
        .collect();
    std::fs::write(&p, rows.join("\n")).unwrap();
    p
}

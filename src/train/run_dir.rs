//! A run's folder: where it checkpoints, what a new run does with an earlier run's files, and whether a checkpoint
//! continues this run (the options that define a run are recorded in its checkpoints and compared on resume).
use super::records::Summary;
use super::selection::best_path;
use crate::dist;
use crate::model::export::{export_paths, Format};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The file a run checkpoints to.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    out.join("checkpoint.safetensors")
}

/// Everything a run writes in `out`: what a new run replaces, and what must not be one of its inputs.
pub fn run_files(out: &Path) -> Vec<PathBuf> {
    let files = ["summary.json", "log.jsonl", "predictions.jsonl", "dev.jsonl"].map(|f| out.join(f));
    let exports = <Format as clap::ValueEnum>::value_variants().iter().map(|&f| export_paths(out, f));
    files.into_iter().chain([best_path(out), checkpoint_path(out)]).chain(exports).collect()
}

/// A new run in a folder that holds an earlier one: the earlier checkpoint is refused (only `--resume` continues
/// it), and a finished run's files (its summary reads as one) are removed, so that none passes for this run's
/// (`report` and `export` read what is there, and this run may not write every one of them). A folder without a
/// run summary keeps everything. Rank 0 decides; every rank fails together if it refuses.
pub fn clear_earlier_run(out: &Path) -> Result<()> {
    let outcome = if dist::is_root() { clear_on_root(out) } else { Ok(()) };
    if dist::any(outcome.is_err())? && outcome.is_ok() {
        return Err(Error::file(out, "rank 0 could not start a run in this folder (its error says why)"));
    }
    outcome
}

fn clear_on_root(out: &Path) -> Result<()> {
    let ckpt = checkpoint_path(out);
    if ckpt.exists() {
        return Err(Error::file(
            &ckpt,
            "holds an earlier run's checkpoint: --resume continues that run; remove the file (or pick another --out) \
             to start a new one",
        ));
    }
    if Summary::read(out).is_err() {
        return Ok(());
    }
    let mut gone = Vec::new();
    for p in run_files(out) {
        let removed = match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
            Ok(_) => std::fs::remove_file(&p),
            Err(_) => continue,
        };
        removed.map_err(|e| Error::file(&p, format!("cannot remove an earlier run's file: {e}")))?;
        gone.push(p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    }
    eprintln!("note: {} held an earlier run; removed its {}", out.display(), gone.join(", "));
    Ok(())
}

/// Refuses a resume whose options differ from those the checkpoint was written with, listing each difference. An
/// option only one side has (a qtune version that had it or not) is not compared.
pub fn check_same_options(
    written: &BTreeMap<String, String>,
    now: &BTreeMap<String, String>,
) -> std::result::Result<(), String> {
    let diffs: Vec<String> = written
        .iter()
        .filter_map(|(k, w)| now.get(k).filter(|n| *n != w).map(|n| format!("{k}: `{w}` when written, `{n}` now")))
        .collect();
    if diffs.is_empty() {
        return Ok(());
    }
    Err(format!("was written with other options; a resume continues the same run: {}", diffs.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Equal options pass; each difference is listed; an option only one side has is not compared.
    #[test]
    fn resume_options_are_compared_key_by_key() {
        let a = opts(&[("--lr", "0.0001"), ("--seed", "0")]);
        assert!(check_same_options(&a, &a.clone()).is_ok());
        let b = opts(&[("--lr", "0.001"), ("--warmup", "2")]);
        let e = check_same_options(&a, &b).unwrap_err();
        assert!(e.contains("--lr: `0.0001` when written, `0.001` now"), "{e}");
        assert!(!e.contains("--seed") && !e.contains("--warmup"), "{e}");
    }

    /// A folder with an earlier checkpoint is refused; a finished run's files are removed, and nothing else; a folder
    /// without a run summary (a data folder that happens to hold a dev.jsonl) keeps everything.
    #[test]
    fn an_earlier_run_is_refused_or_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        std::fs::write(out.join("dev.jsonl"), "data").unwrap();
        clear_earlier_run(out).unwrap();
        assert!(out.join("dev.jsonl").exists(), "a folder without a run summary was cleared");
        std::fs::write(out.join("summary.json"), r#"{"method": "lora"}"#).unwrap();
        std::fs::create_dir(out.join("adapter")).unwrap();
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        clear_earlier_run(out).unwrap();
        assert!(!out.join("summary.json").exists() && !out.join("adapter").exists() && !out.join("dev.jsonl").exists());
        assert!(out.join("notes.txt").exists(), "a file qtune does not write was removed");
        std::fs::write(checkpoint_path(out), "x").unwrap();
        let e = clear_earlier_run(out).unwrap_err().to_string();
        assert!(e.contains("checkpoint.safetensors") && e.contains("--resume"), "{e}");
    }
}

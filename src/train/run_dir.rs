//! A run's folder: where it checkpoints, what a new run does with an earlier run's files, and whether a checkpoint
//! continues this run (the options that define a run are recorded in its checkpoints and compared on resume).
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

/// A new run in a folder that holds an earlier one: the earlier checkpoint is refused (only `--resume` continues
/// it), and its other files are removed, so that none passes for this run's (`report` and `export` read what is
/// there, and this run may not write every one of them).
pub fn clear_earlier_run(out: &Path) -> Result<()> {
    let ckpt = checkpoint_path(out);
    if ckpt.exists() {
        return Err(Error::file(
            &ckpt,
            "holds an earlier run's checkpoint: --resume continues that run; remove the file (or pick another --out) \
             to start a new one",
        ));
    }
    if !dist::is_root() {
        return Ok(());
    }
    let files = ["summary.json", "log.jsonl", "predictions.jsonl", "dev.jsonl"].map(|f| out.join(f));
    let exports = <Format as clap::ValueEnum>::value_variants().iter().map(|&f| export_paths(out, f));
    let mut gone = Vec::new();
    for p in files.into_iter().chain([best_path(out)]).chain(exports) {
        let removed = match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
            Ok(_) => std::fs::remove_file(&p),
            Err(_) => continue,
        };
        removed.map_err(|e| Error::file(&p, format!("cannot remove an earlier run's file: {e}")))?;
        gone.push(p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    }
    if !gone.is_empty() {
        eprintln!("note: {} held an earlier run; removed its {}", out.display(), gone.join(", "));
    }
    Ok(())
}

/// Refuses a resume whose options differ from those the checkpoint was written with, listing each difference.
pub fn check_same_options(
    written: &BTreeMap<String, String>,
    now: &BTreeMap<String, String>,
) -> std::result::Result<(), String> {
    let keys: std::collections::BTreeSet<&String> = written.keys().chain(now.keys()).collect();
    let shown = |v: Option<&String>| v.map_or("(not given)".to_string(), |v| format!("`{v}`"));
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| written.get(*k) != now.get(*k))
        .map(|k| format!("{k}: {} when written, {} now", shown(written.get(k)), shown(now.get(k))))
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

    /// Equal options pass; each difference is listed, a missing one as "(not given)".
    #[test]
    fn resume_options_are_compared_key_by_key() {
        let a = opts(&[("--lr", "1e-4"), ("--seed", "0")]);
        assert!(check_same_options(&a, &a.clone()).is_ok());
        let b = opts(&[("--lr", "1e-3"), ("--warmup", "2")]);
        let e = check_same_options(&a, &b).unwrap_err();
        assert!(e.contains("--lr: `1e-4` when written, `1e-3` now"), "{e}");
        assert!(e.contains("--seed: `0` when written, (not given) now"), "{e}");
        assert!(e.contains("--warmup: (not given) when written, `2` now"), "{e}");
    }

    /// A folder with an earlier checkpoint is refused; one with an earlier run's other files is emptied of them.
    #[test]
    fn an_earlier_run_is_refused_or_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        std::fs::write(out.join("summary.json"), "{}").unwrap();
        std::fs::create_dir(out.join("adapter")).unwrap();
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        clear_earlier_run(out).unwrap();
        assert!(!out.join("summary.json").exists() && !out.join("adapter").exists());
        assert!(out.join("notes.txt").exists(), "a file qtune does not write was removed");
        std::fs::write(checkpoint_path(out), "x").unwrap();
        let e = clear_earlier_run(out).unwrap_err().to_string();
        assert!(e.contains("checkpoint.safetensors") && e.contains("--resume"), "{e}");
    }
}

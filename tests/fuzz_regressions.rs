//! Replays the fuzz corpus through the fuzz targets' entry points (src/fuzzing.rs): every seed in
//! `fuzz/seeds/<target>/` must read successfully, and every input a fuzzer found crashing
//! (`fuzz/regressions/<target>/`) must now end in an error, not a panic.
use qtune::fuzzing::{run, TARGETS};
use qtune::model::Tok;
use std::path::{Path, PathBuf};

fn files(root: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(root).join(target);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir).map_or(vec![], |d| d.map(|e| e.unwrap().path()).collect());
    v.retain(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')));
    v.sort();
    v
}

/// The tiny model's tokenizer with its config's EOS (id 2), as `read_header` gives it.
fn tok() -> Tok {
    let mut t = Tok::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_llama/tokenizer.json"))
        .unwrap();
    t.specials.eos = Some(2);
    t
}

#[test]
fn seeds_are_read() {
    let tok = tok();
    for target in TARGETS {
        let seeds = files("fuzz/seeds", target);
        assert!(!seeds.is_empty(), "no seed for {target} (cargo run --release --example fuzz_seeds)");
        for f in seeds {
            let r = run(target, &std::fs::read(&f).unwrap(), &tok);
            assert!(r.is_ok(), "{target}: seed {} fails: {}", f.display(), r.unwrap_err());
        }
    }
}

#[test]
fn crashing_inputs_are_errors_now() {
    let tok = tok();
    for target in TARGETS {
        for f in files("fuzz/regressions", target) {
            let data = std::fs::read(&f).unwrap();
            let r = std::panic::catch_unwind(|| run(target, &data, &tok).is_ok());
            assert!(r.is_ok(), "{target}: {} panics", f.display());
        }
    }
}

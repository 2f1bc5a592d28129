#![no_main]
//! Fuzz target: qtune::fuzzing::jsonl (see src/fuzzing.rs), with the tiny test tokenizer. An error is a correct
//! answer; a panic, an abort or an allocation over libFuzzer's limit is a bug.
use std::sync::OnceLock;

static TOK: OnceLock<qtune::model::Tok> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let tok = TOK.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny_llama/tokenizer.json");
        let mut t = qtune::model::Tok::from_file(std::path::Path::new(path)).expect("the test tokenizer loads");
        t.specials.eos = Some(2); // the tiny model's config's EOS, as `read_header` gives it
        t
    });
    let _ = qtune::fuzzing::jsonl(data, tok);
});

#![no_main]
//! Fuzz target: qtune::fuzzing::tokenizer (see src/fuzzing.rs). An error is a correct answer; a panic, an abort or an
//! allocation over libFuzzer's limit is a bug.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = qtune::fuzzing::tokenizer(data);
});

#!/usr/bin/env bash
# Fuzzes every reader for SECONDS each (default 600) with cargo-fuzz (nightly toolchain, libFuzzer, AddressSanitizer),
# starting from fuzz/seeds/<target> (written by `cargo run --release --example fuzz_seeds`); the corpus grows in
# fuzz/corpus/<target> and crashing inputs land in fuzz/artifacts/<target>. Prints libFuzzer's final stats per target.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET ...]
set -uo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_EACH=${1:-600}; shift || true
TARGETS=${*:-gguf safetensors config tokenizer jsonl state}
cargo +nightly fuzz build -O
for t in $TARGETS; do
  mkdir -p "corpus/$t"
  echo "== $t: ${SECONDS_EACH}s"
  cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 \
    -malloc_limit_mb=1024 -print_final_stats=1 2>&1 | grep -E "stat::number_of_executed_units|stat::peak_rss_mb|Done|ERROR|SUMMARY|panicked|Test unit written|crash-|oom-|timeout-" 
  echo "== $t: corpus $(ls "corpus/$t" | wc -l) inputs, artifacts: $(ls "artifacts/$t" 2>/dev/null | wc -l)"
done

#!/usr/bin/env bash
# Step times and peak RSS of every method on the same 3 batches (batch 8, ≤ 256 tokens, BoolQ seed 0), one process
# each, no evaluation. Run it on an otherwise idle machine: the times are the README's.
# Usage: scripts/readme_timing.sh [BIN] [OUT] [RUN...]   runs: full-adamw full-lion qft lora qlora qst mezo quzo-int8
# quzo-int4 (default: all)
set -euo pipefail
BIN=${1:-target/release/qtune}
OUT=${2:-runs/quiet}
shift 2 || true
RUNS=${*:-full-adamw full-lion qft lora qlora qst mezo quzo-int8 quzo-int4}
mkdir -p "$OUT"
for r in $RUNS; do
  case $r in
    quzo-int8) args=(--method quzo --bits 8) ;;
    quzo-int4) args=(--method quzo --bits 4) ;;
    *) args=(--method "$r") ;;
  esac
  "$BIN" train "${args[@]}" --steps 3 --batch-size 8 --max-seq-len 256 --train-size 64 --no-eval --out "$OUT/$r" \
    > "$OUT/$r.log" 2>&1 || { echo "$r failed: see $OUT/$r.log" >&2; exit 1; }
done

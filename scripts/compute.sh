#!/usr/bin/env bash
# The README's "Integer compute" figures (issue 26), every number from this one machine: the GEMM table, the
# accuracy of W8A8/W4A8 evaluation against f32 on 1000 BoolQ validation examples (paired, McNemar), evaluation
# speed, the step times of QuZO on the integer and f32 paths next to MeZO and the f32 methods, QuZO's loss
# curves over 100 steps with integer and f32 compute, and QFT's opt-in integer path against its f32 path and FP32
# Lion over 100 steps (loss curves, dev accuracy, step times).
# Usage: scripts/compute.sh [OUT] [PARTS...]   PARTS: gemm accuracy speed steps curves qft (default: all)
# Run it on an otherwise idle machine (about 2 hours on 2 cores with every part); results go to OUT (default
# runs/compute) and OUT/*.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/compute}
shift || true
PARTS=${*:-gemm accuracy speed steps curves qft}
cargo build --release --quiet
cargo build --release --quiet -p qtune-quant --example bench_quant
BIN=target/release/qtune
mkdir -p "$OUT"
want() { [[ " $PARTS " == *" $1 "* ]]; }

if want gemm; then
  target/release/examples/bench_quant gemm | tee "$OUT/gemm.md"
fi

# Zero-shot BoolQ: the same 1000 validation examples for every model (label-word log-likelihood).
if want accuracy; then
  EVAL=(--dev-size 8 --eval-size 1000 --seed 0)
  RUNS=(f32 int8-f32 int8 int4 int8-mixed int4-mixed)
  for run in f32: int8-f32:"--bits 8 --compute f32" int8:"--bits 8" int4:"--bits 4" \
    int8-mixed:"--bits 8 --compute int8-mixed" int4-mixed:"--bits 4 --compute int8-mixed"; do
    name=${run%%:*}; args=${run#*:}
    [ -f "$OUT/eval-$name/summary.json" ] || "$BIN" eval $args "${EVAL[@]}" --out "$OUT/eval-$name"
  done
  "$BIN" report "${RUNS[@]/#/$OUT/eval-}" --out "$OUT/accuracy" --title "zero-shot BoolQ" | tee "$OUT/accuracy.md"
fi

# Evaluation speed: f32 weights, INT8 weights on f32 tiles, INT8 and INT4 on the integer path (200 examples).
if want speed; then
  SPEED=(--dev-size 8 --eval-size 200 --seed 0)
  for run in f32: int8-f32:"--bits 8 --compute f32" int8:"--bits 8" int4:"--bits 4"; do
    name=${run%%:*}; args=${run#*:}
    rm -rf "$OUT/speed-$name"
    "$BIN" eval $args "${SPEED[@]}" --out "$OUT/speed-$name"
  done
  "$BIN" report "$OUT"/speed-{f32,int8-f32,int8,int4} --out "$OUT/speed" --title "evaluation speed" \
    | tee "$OUT/speed.md"
fi

# Step times: one `qtune bench` (its GEMM ceilings measured in the same run).
if want steps; then
  "$BIN" bench --out "$OUT/steps" \
    --runs full-adamw --runs full-lion --runs lora --runs qft --runs mezo \
    --runs quzo-int8 --runs quzo-int8-f32 --runs quzo-int4 --runs quzo-int4-f32 \
    -- --steps 4 --batch-size 8 --max-seq-len 256 --seed 0 --train-size 1000 --dev-size 8 --eval-size 0 \
    | tee "$OUT/steps.md"
fi

# An interrupted run (its checkpoint there, no summary yet) is resumed, not started again.
resume() { [ -f "$1/checkpoint.safetensors" ] && echo --resume; }

# QuZO INT8 over 100 steps with integer and f32 compute: same seed, same batches.
if want curves; then
  for c in int8 f32; do
    [ -f "$OUT/quzo-int8-compute-$c/summary.json" ] || "$BIN" train --method quzo --bits 8 --compute "$c" \
      --steps 100 --dev-size 64 --eval-size 64 --seed 0 --checkpoint-every 25 --out "$OUT/quzo-int8-compute-$c" \
      $(resume "$OUT/quzo-int8-compute-$c")
  done
  "$BIN" report "$OUT"/quzo-int8-compute-{int8,f32} --out "$OUT/curves" --title "QuZO INT8: integer vs f32 compute" \
    | tee "$OUT/curves.md"
fi

# QFT with its opt-in integer path (INT8 activations in the forward and the input gradient; the weight gradient f32)
# against QFT in f32 and FP32 Lion: same seed, same batches, 100 steps of batch 2, 200 dev examples before and after.
if want qft; then
  for run in qft-int8:"--method qft --compute int8" qft-f32:"--method qft --compute f32" full-lion:"--method full-lion"; do
    name=${run%%:*}; args=${run#*:}
    [ -f "$OUT/$name/summary.json" ] || "$BIN" train $args --lr 5e-6 --steps 100 --batch-size 2 --train-size 1000 \
      --dev-size 200 --eval-size 0 --max-seq-len 256 --seed 0 --no-export --checkpoint-every 25 --out "$OUT/$name" \
      $(resume "$OUT/$name")
  done
  "$BIN" report "$OUT"/{qft-int8,qft-f32,full-lion} --out "$OUT/qft" --title "QFT: integer vs f32 compute, and FP32 Lion" \
    | tee "$OUT/qft.md"
fi

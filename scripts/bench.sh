#!/usr/bin/env bash
# The README's benchmark: every qtune method and the PyTorch peers on the same model (SmolLM2-135M-Instruct from
# the Q4_1 GGUF), task (BoolQ, seed 0) and batches, one after the other on this machine, then one table with each
# run's ratios to its closest peer. Run it on an otherwise idle machine: the step times are the README's.
# Usage: scripts/bench.sh [OUT] [STEPS]     (default runs/bench-full, 6 steps; about half an hour on 2 cores)
# Writes OUT/<run>/ for every qtune run, OUT/peers/<peer>/ for every peer, OUT/{results.md, results.json,
# loss.png, memory.png}, and copies the report into docs/bench/ (what the README shows).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench-full}
STEPS=${2:-6}
# One fixed configuration: batch 8, ≤ 256 tokens, 100 dev examples before and after (no held-out eval), the
# methods' default learning rates (`qtune train --help`), given to the peers too.
COMMON=(--steps "$STEPS" --batch-size 8 --max-seq-len 256 --seed 0 --train-size 1000 --dev-size 100 --eval-size 0)
cargo build --release --quiet
BIN=target/release/qtune
mkdir -p "$OUT"
# The peers train on exactly the batches qtune trains on.
"$BIN" train --method full-adamw "${COMMON[@]}" --dump-batches "$OUT/batches.jsonl"
scripts/setup_reference.sh
.venv/bin/python scripts/peers_bench.py --batches "$OUT/batches.jsonl" --steps "$STEPS" --out "$OUT/peers" \
  --lr-adamw 1e-5 --lr-lion 1e-6 --lr-lora 1e-4 --lr-mezo 1e-6
"$BIN" bench --out "$OUT" --peers "$OUT/peers" -- "${COMMON[@]}"
mkdir -p docs/bench
cp "$OUT"/results.md "$OUT"/results.json "$OUT"/loss.png "$OUT"/memory.png docs/bench/
echo "wrote docs/bench/{results.md, results.json, loss.png, memory.png}"

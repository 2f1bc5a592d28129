#!/usr/bin/env bash
# The BoolQ runs the README's result tables come from: zero-shot, then each method for the same steps, batch,
# sequence length and data (seed 0: 200 dev and 200 eval examples, the MeZO splits' first rows).
# Usage: scripts/readme_runs.sh [BIN] [OUT]   (BIN defaults to target/release/qtune)
set -euo pipefail
BIN=${1:-target/release/qtune}
OUT=${2:-runs/readme}
COMMON=(--dev-size 200 --eval-size 200 --steps 40 --batch-size 8 --max-seq-len 256 --seed 0)
mkdir -p "$OUT"
run() { # name, args...
  local name=$1; shift
  [ -f "$OUT/$name/summary.json" ] && return
  "$BIN" "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
}
run zero-shot eval --dev-size 200 --eval-size 200 --max-seq-len 256 --seed 0
run full-adamw train --method full-adamw --lr 2e-5 "${COMMON[@]}"
run full-lion train --method full-lion --lr 5e-6 "${COMMON[@]}"
run qft train --method qft --lr 5e-6 "${COMMON[@]}"
# Issue 5: QST against LoRA and QLoRA (one learning rate for the three: the QST and QLoRA papers' 2e-4), then the
# downsample ablation.
run lora train --method lora --lr 2e-4 "${COMMON[@]}"
run qlora train --method qlora --lr 2e-4 "${COMMON[@]}"
run qst train --method qst --lr 2e-4 "${COMMON[@]}"
for ds in lora linear maxpool avgpool; do
  run "qst-$ds" train --method qst --downsample "$ds" --lr 2e-4 "${COMMON[@]}"
done

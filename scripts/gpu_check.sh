#!/usr/bin/env bash
# Issue 30, on a GPU machine: builds nothing (scripts/gpu_prepare.sh built .gpu/ elsewhere). Runs, writing under OUT:
#   gpu.txt     nvidia-smi, and the CUDA libraries the binary found
#   tests.log   tests/gpu.rs: GPU against CPU on the tiny fixture model (evaluation; every GPU method's 3 steps)
#   bench.md    qtune's GPU benchmark on SmolLM2-135M's shapes (random weights), batch 16 × 512 (every method that
#               runs on a GPU: f32 ones, MeZO, QLoRA, QST, QAT, QuZO full and LoRA, QFT), next to the PyTorch
#               peers (torch AdamW, PEFT LoRA, a full-parameter MeZO loop) on the same batches and card: step
#               time, tokens/s, and the device memory in use at its most (the driver's figure for both)
#   ceilings.json  the card's f32 GEMM ceiling (`qtune bench --ceilings`), which bench.md's MFU column divides by
#   runs.tgz    every run's summary.json and log.jsonl
#   bash scripts/gpu_check.sh OUT [STEPS]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/gpu}}
STEPS=${2:-6}
mkdir -p "$OUT"
: > "$OUT/bench.log"
G=$PWD/.gpu
W=/tmp/qtune-gpu
rm -rf $W && mkdir -p $W
[ -f "$G/qtune.xz" ] || { echo "gpu_check: $G/qtune.xz missing: run scripts/gpu_prepare.sh on a build machine and carry .gpu" >&2; exit 2; }
for f in qtune gpu-tests; do
    python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$G/$f.xz" "$W/$f"
    chmod +x "$W/$f"
done
Q=$W/qtune
# The driver's libcuda.so.1 is on the system's path; the rest comes from NVIDIA's wheels (scripts/gpu_libs.py).
LIBS=$(python3 scripts/gpu_libs.py)
export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
{
    nvidia-smi
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldd "$Q" | grep -E 'cuda|cublas|nvrtc|curand'
} > "$OUT/gpu.txt" 2>&1

# 1. GPU against CPU.
# QTUNE_GPU_REQUIRED: here a GPU that cannot be opened fails the tests instead of skipping them.
QTUNE_GPU_REQUIRED=1 QTUNE_BIN=$Q "$W/gpu-tests" --test-threads=1 --nocapture > "$OUT/tests.log" 2>&1
echo "tests: exit $?" | tee -a "$OUT/tests.log"

# 2. SmolLM2-135M's shapes with random weights, and rows of about 500 tokens (the loss on a completion).
"$Q" init --config smollm2-135m --tokenizer "$G/smol-tokenizer" --format hf --out $W/smol > $W/init.log 2>&1 \
    || { cat $W/init.log; exit 1; }
python3 scripts/random_lm_data.py $W/lm.jsonl 400 440
TASK=(--model $W/smol --task lm --data $W/lm.jsonl --train-size 300 --dev-size 0 --eval-size 0 --max-seq-len 512
      --batch-size 16 --steps "$STEPS" --no-eval --no-export --seed 0)
# The card's f32 GEMM ceiling (cuBLAS through candle, 4096³), for the MFU column.
"$Q" bench --ceilings --device cuda > "$OUT/ceilings.json" 2>> "$OUT/bench.log"
# Every method that runs on a GPU (the quantized ones with f32 products over their dequantized matrices).
for m in full-adamw lora mezo "mezo --lora" qlora qst "qat --bits 4" "quzo --bits 8" "quzo --bits 4" "quzo --lora --bits 4" qft; do
    name=$(echo "$m" | tr -d ' -')
    "$Q" train "${TASK[@]}" --method $m --device cuda --out $W/qtune-$name >> "$OUT/bench.log" 2>&1
    echo "qtune $m: exit $?" >> "$OUT/bench.log"
done
"$Q" train "${TASK[@]}" --method full-adamw --dump-batches $W/batches.jsonl >> "$OUT/bench.log" 2>&1
python3 scripts/peers_bench.py --batches $W/batches.jsonl --steps "$STEPS" --model $W/smol --device cuda \
    --only torch-adamw,peft-lora,torch-mezo --out $W/peers >> "$OUT/bench.log" 2>&1
echo "peers: exit $?" >> "$OUT/bench.log"
python3 - $W "$OUT/bench.md" "$OUT/ceilings.json" <<'EOF'
import json, pathlib, sys
w, out = pathlib.Path(sys.argv[1]), sys.argv[2]
try:
    ceiling = json.loads(pathlib.Path(sys.argv[3]).read_text())["f32_gflops"] * 1e9
except Exception:
    ceiling = None
rows = ["| run | step (s) | tokens/s | device memory in use at most (GiB) | MFU (f32 GEMM ceiling) | GPU |",
        "|---|---|---|---|---|---|"]
for d in sorted(d for d in list(w.glob("qtune-*")) + list(w.glob("peers/*")) if d.is_dir()):
    f = d / "summary.json"
    if not f.exists():
        rows.append(f"| {d.name} | failed | | | | |")
        continue
    s = json.loads(f.read_text())
    used = s.get("gpu_used_peak_bytes")
    tps, n, per = s.get("tokens_per_s"), s.get("matmul_params"), s.get("flops_per_param")
    mfu = f"{100 * tps * n * per / ceiling:.1f}%" if ceiling and tps and n and per else ""
    rows.append(f"| {s['method']} | {s.get('step_time_s') or 0:.3f} | {s.get('tokens_per_s') or 0:.0f} | "
                f"{used / 2**30 if used else float('nan'):.2f} | {mfu} | {s.get('gpu', '')} |")
pathlib.Path(out).write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
FILES=$(cd $W && ls -d qtune-*/summary.json qtune-*/log.jsonl peers/*/summary.json peers/*/log.jsonl 2>/dev/null)
[ -n "$FILES" ] && tar czf "$OUT/runs.tgz" -C $W $FILES
echo "gpu_check: results in $OUT"

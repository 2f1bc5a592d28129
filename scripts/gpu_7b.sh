#!/usr/bin/env bash
# Issue 30, on a GPU machine: LLaMA-2-7B's shapes with random weights (qtune init, SmolLM2's tokenizer: 6.88 B
# parameters) and a few steps of each method that runs on a GPU, at the papers' batch 4 × 384: the device memory
# in use at its most (the driver's figure) beside `train --plan`'s prediction of the same run (the device's peak).
# Builds nothing: scripts/gpu_prepare.sh built .gpu/ elsewhere. Writes OUT/7b.md, OUT/7b.log and OUT/7b.tgz.
#   bash scripts/gpu_7b.sh OUT [STEPS] [run ...]     runs: qlora qst quzo-int4 quzo-lora-int4 quzo-int8 qft full-adamw
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/gpu}}
STEPS=${2:-2}
shift $(( $# < 2 ? $# : 2 ))
RUNS=${*:-"qlora qst quzo-int4 quzo-lora-int4 quzo-int8 qft full-adamw"}
mkdir -p "$OUT"
G=$PWD/.gpu
W=/tmp/qtune-gpu7b
mkdir -p $W
[ -f "$G/qtune.xz" ] || { echo "gpu_7b: $G/qtune.xz missing: run scripts/gpu_prepare.sh and carry .gpu" >&2; exit 2; }
[ -x $W/qtune ] || python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    "$G/qtune.xz" $W/qtune
chmod +x $W/qtune
Q=$W/qtune
export LD_LIBRARY_PATH=$(python3 scripts/gpu_libs.py)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
LOG=$OUT/7b.log
: > "$LOG"
# bf16 shards: 13.8 GB on disk, read one tensor at a time.
if [ ! -f $W/l7b/config.json ]; then
    SECONDS=0
    $Q init --config llama-2-7b --tokenizer "$G/smol-tokenizer" --format hf --export-dtype bf16 --out $W/l7b >> "$LOG" 2>&1
    echo "init: exit $?, $SECONDS s" >> "$LOG"
fi
python3 scripts/random_lm_data.py $W/lm.jsonl 64 330
COMMON=(--model $W/l7b --task lm --data $W/lm.jsonl --train-size 32 --dev-size 0 --eval-size 0 --max-seq-len 384
    --batch-size 4 --steps "$STEPS" --no-eval --no-export --seed 0 --device cuda)
for r in $RUNS; do
    case $r in
        qlora) a=(--method qlora) ;;
        qst) a=(--method qst) ;;
        quzo-int4) a=(--method quzo --bits 4) ;;
        quzo-int8) a=(--method quzo --bits 8) ;;
        quzo-lora-int4) a=(--method quzo --lora --bits 4) ;;
        qft) a=(--method qft) ;;
        full-adamw) a=(--method full-adamw) ;;
        *) echo "gpu_7b: unknown run $r" >&2; continue ;;
    esac
    echo "== $r" >> "$LOG"
    $Q train "${COMMON[@]}" "${a[@]}" --out $W/$r --plan $W/$r.plan.json >> "$LOG" 2>&1
    SECONDS=0
    $Q train "${COMMON[@]}" "${a[@]}" --out $W/$r >> "$LOG" 2>&1
    echo "$r: exit $?, $SECONDS s" >> "$LOG"
done
python3 - $W "$OUT/7b.md" <<'PY'
import json, pathlib, sys
w, out = pathlib.Path(sys.argv[1]), sys.argv[2]
rows = ["| run | planned device peak (GiB) | device memory in use at most (GiB) | planner error | step (s) | tokens/s | GPU |",
        "|---|---|---|---|---|---|---|"]
for p in sorted(w.glob("*.plan.json")):
    r = p.name[: -len(".plan.json")]
    planned = json.loads(p.read_text())[0]["peak"] / 2**30
    s = w / r / "summary.json"
    if not s.exists():
        rows.append(f"| {r} | {planned:.2f} | failed or refused | | | | |")
        continue
    s = json.loads(s.read_text())
    used = (s.get("gpu_used_peak_bytes") or 0) / 2**30
    err = f"{100 * (planned - used) / used:+.1f}%" if used else ""
    rows.append(f"| {r} | {planned:.2f} | {used:.2f} | {err} | {s.get('step_time_s') or 0:.2f} | "
                f"{s.get('tokens_per_s') or 0:.0f} | {s.get('gpu', '')} |")
pathlib.Path(out).write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
FILES=$(cd $W && ls -d */summary.json */log.jsonl *.plan.json 2>/dev/null)
[ -n "$FILES" ] && tar czf "$OUT/7b.tgz" -C $W $FILES
echo "gpu_7b: results in $OUT"

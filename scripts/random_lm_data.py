#!/usr/bin/env python3
"""Writes ROWS prompt/completion rows of seeded random common words (PROMPT_WORDS words, then a 12-word completion):
a causal-LM task for timing runs on random-weight models (scripts/gpu_check.sh, scripts/gpu_7b.sh).
Usage: random_lm_data.py OUT ROWS PROMPT_WORDS"""
import json
import random
import sys

out, rows, prompt_words = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(0)
words = "the of and to in is was for on that with as by at from his her they this which an be are or".split()
with open(out, "w") as f:
    for _ in range(rows):
        prompt = " ".join(r.choice(words) for _ in range(prompt_words))
        completion = " " + " ".join(r.choice(words) for _ in range(12))
        f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")

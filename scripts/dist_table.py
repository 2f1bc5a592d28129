#!/usr/bin/env python3
"""The tables of scripts/dist_bytes.sh: bytes each rank sent per step (two ranks, one micro-batch of 1 x 128 tokens
each), against the f32 gradient of the trained parameters, and what the sending costs at 10 and 100 Gbit/s next to
the measured step (two ranks of one core each, and one process with both cores on the same two micro-batches).  LLaMA-2-7B rows: 1 + 31 x (2-layer - 1-layer runs), exact since the bytes are a sum over
tensors; their step times come from scripts/big7b.sh (one process, 2 threads, batch 1 x 64).
Usage: dist_table.py [OUT] [BIG7B]"""
import json
import os
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "runs/dist"
big = sys.argv[2] if len(sys.argv) > 2 else "runs/big7b"
ORDER = ["full-adamw", "full-lion", "qat", "lora", "qlora", "qst", "qft", "mezo", "mezo-lora", "quzo-int8", "quzo-int4",
         "quzo-lora-int4"]
BIG = {"qft": "qft-recompute", "qst": "qst", "qlora": "qlora", "quzo-int4": "quzo-int4", "quzo-int8": "quzo-int8",
       "quzo-lora-int4": "quzo-lora-int4"}


def summary(path):
    p = os.path.join(path, "summary.json")
    return json.load(open(p)) if os.path.exists(p) else None


def human(b):
    for unit, k in [("GB", 1e9), ("MB", 1e6), ("kB", 1e3)]:
        if b >= k:
            return f"{b / k:.2f} {unit}"
    return f"{b:.0f} B"


def wire(b, gbit):
    s = b * 8 / (gbit * 1e9)
    if s < 1e-6:
        return f"{s * 1e9:.2f} ns"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def ratio(b, t):
    return f"{b / (4 * t):.3f}" if b > 64 else "–"


print("SmolLM2-135M, two ranks (one core each):\n")
print("| method | trained params | sent per step per rank | / f32 gradient | step, 2 ranks (s) | step, 1 process "
      "(s) | + at 10 Gbit/s | + at 100 Gbit/s |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for m in ORDER:
    s = summary(os.path.join(out, "smollm2", m))
    if not s:
        print(f"| {m} | not run | | | | | |")
        continue
    b, t = s["sent_bytes_per_step"], s["trainable_params"]
    o = summary(os.path.join(out, "smollm2-one", m))
    alone = f"{o['step_time_s']:.2f}" if o else "–"
    print(f"| {m} | {t:,} | {human(b)} | {ratio(b, t)} | {s['step_time_s']:.2f} | {alone} | {wire(b, 10)} "
          f"| {wire(b, 100)} |")

print("\nLLaMA-2-7B shapes (32 layers, from the 1- and 2-layer runs):\n")
print("| method | trained params (32 layers) | sent per step per rank | / f32 gradient | 7B step (s, big7b.sh) "
      "| + at 10 Gbit/s | + at 100 Gbit/s |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for m in ORDER:
    # Full MeZO and QuZO are not run at 7B shapes: they send 8 bytes a step whatever the model (tests/dist.rs).
    if m in ("mezo", "quzo-int8", "quzo-int4"):
        bs = summary(os.path.join(big, BIG[m])) if m in BIG else None
        step = f"{bs['step_time_s']:.0f}" if bs else "–"
        print(f"| {m} | all | 8 B (not run: the loss pair, whatever the model) | – | {step} | {wire(8, 10)} "
              f"| {wire(8, 100)} |")
        continue
    # Two ranks of FP32 first-order training do not fit 24 GiB at 7B shapes (12-16 B a parameter each, even at two
    # layers): their bytes are computed by the rule the tiny-model test checks and the SmolLM2 runs show,
    # 4 B per trained parameter + 12, for QFT's parameter count (every parameter).
    if m in ("full-adamw", "full-lion", "qat"):
        one = summary(os.path.join(out, "llama7b-L1", "qft"))
        two = summary(os.path.join(out, "llama7b-L2", "qft"))
        if one and two:
            t = one["trainable_params"] + 31 * (two["trainable_params"] - one["trainable_params"])
            b = 4 * t + 12
            print(f"| {m} | {t:,} | {human(b)} (computed) | 1.000 | – | {wire(b, 10)} | {wire(b, 100)} |")
            continue
    one = summary(os.path.join(out, "llama7b-L1", m))
    two = summary(os.path.join(out, "llama7b-L2", m))
    if not one or not two:
        print(f"| {m} | not run | | | | | |")
        continue
    b = one["sent_bytes_per_step"] + 31 * (two["sent_bytes_per_step"] - one["sent_bytes_per_step"])
    t = one["trainable_params"] + 31 * (two["trainable_params"] - one["trainable_params"])
    bs = summary(os.path.join(big, BIG[m])) if m in BIG else None
    step = f"{bs['step_time_s']:.0f}" if bs else "–"
    print(f"| {m} | {t:,} | {human(b)} | {ratio(b, t)} | {step} | {wire(b, 10)} | {wire(b, 100)} |")

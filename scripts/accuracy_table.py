#!/usr/bin/env python3
"""Issue 31's accuracy tables from scripts/accuracy_runs.sh's runs: per task, each run's eval accuracy with its 95%
(Wilson) interval and its change from the zero-shot model of the same precision; then the papers' orderings, each
pair compared example by example by `qtune report` (difference, 95% interval, exact McNemar p); and a loss-curve
plot per task group (`qtune report`'s). Runs not finished yet are listed as such.

    python3 scripts/accuracy_table.py [RUNS] [--qtune BIN] [--plots DIR]
"""
import argparse
import json
import math
import re
import subprocess
import tempfile
from pathlib import Path

ZO = ["mezo", "quzo-int8", "quzo-int4", "qrge1-int4", "qat-int4"]
# Earlier runs kept as evidence: QuZO INT8 with W8A8 forwards (the int8 engine), before `quzo --lora` computed in f32.
SUPERSEDED = ["quzo-int8-a8"]
ZERO_SHOT = ["zero-shot-f32", "zero-shot-int8", "zero-shot-int4", "zero-shot-int8-f32", "zero-shot-int4-f32"]
FO = ["full-adamw", "full-lion", "qft"]
# The zero-shot run each trained run starts from (the same weights at the same precision).
BASE = {"mezo": "zero-shot-f32", "quzo-int8": "zero-shot-int8-f32", "quzo-int4": "zero-shot-int4-f32",
        "qrge1-int4": "zero-shot-int4-f32", "quzo-int8-a8": "zero-shot-int8", "qat-int4": "zero-shot-int4-f32", "full-adamw": "zero-shot-f32",
        "full-lion": "zero-shot-f32", "qft": "zero-shot-f32"}
# The papers' orderings: (a, b, what the paper says of a against b).
CLAIMS = [
    ("quzo-int4", "qat-int4", "QuZO ≥ quantized first-order at INT4"),
    ("quzo-int4", "qrge1-int4", "QuZO (Q-RGE2) ≥ Q-RGE1 at INT4"),
    ("quzo-int8", "mezo", "QuZO INT8 within ~1 point of MeZO"),
    ("qft", "full-lion", "QFT within ~0.5–1 point of FP32 fine-tuning (Lion)"),
    ("qft", "full-adamw", "QFT within ~0.5–1 point of FP32 fine-tuning (AdamW)"),
]


def wilson(p, n, z=1.96):
    if n == 0:
        return float("nan"), float("nan")
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def summary(run):
    f = run / "summary.json"
    return json.loads(f.read_text()) if f.exists() else None


def paired(qtune, a, b):
    """`qtune report a b`'s paired row on the eval split: (difference, interval, p) as printed."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([qtune, "report", str(a), str(b), "--out", out], check=True, capture_output=True)
        md = Path(out, "results.md").read_text()
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 11 and cells[2] == "eval":
            return cells[8], cells[9], cells[10]
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="?", default="runs/accuracy")
    ap.add_argument("--qtune", default="target/release/qtune")
    ap.add_argument("--plots", default=None, help="write each group's loss plot (qtune report) under this folder")
    a = ap.parse_args()
    root = Path(a.runs)
    machine = " ".join((root / "machine.txt").read_text().split()) if (root / "machine.txt").exists() else ""
    print(f"Runs in {root} ({machine}).\n")
    for task in ["boolq", "siqa"]:
        zs = {k: summary(root / f"{task}-{k}") for k in ZERO_SHOT}
        if not any(zs.values()):
            continue
        maj = next((z.get("eval_majority") for z in zs.values() if z and z.get("eval_majority")), None)
        maj = f" (always answering the most frequent label: {100 * maj:.1f})" if isinstance(maj, float) else ""
        print(f"#### {task}{maj}\n")
        print("| run | steps | eval accuracy | 95% interval | zero-shot at its precision | change (points) | 95% interval | McNemar p | step (s) | peak RSS (MiB) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for k, s in zs.items():
            if s:
                n = s["eval_examples"] if "eval_examples" in s else 1000
                lo, hi = wilson(s["eval_accuracy"], n)
                print(f"| {k} | 0 | {100 * s['eval_accuracy']:.1f} | {100 * lo:.1f}–{100 * hi:.1f} | | | | | | "
                      f"{s['peak_rss_bytes'] / 2**20:.0f} |")
        for k in ZO + FO + SUPERSEDED:
            run = root / f"{task}-{k}"
            s = summary(run)
            if s is None and k in SUPERSEDED:
                continue
            if s is None and not run.exists():
                continue
            if s is None:
                steps = sum(1 for _ in open(run / "log.jsonl")) if (run / "log.jsonl").exists() else 0
                print(f"| {k} | {steps} so far | not finished | | | | | | | |")
                continue
            n = 1000
            lo, hi = wilson(s["eval_accuracy"], n)
            base = root / f"{task}-{BASE[k]}"
            pr = paired(a.qtune, run, base) if summary(base) else None
            d, iv, p = pr if pr else ("", "", "")
            zs_acc = summary(base)["eval_accuracy"] if summary(base) else float("nan")
            print(f"| {k} | {s['steps']} | {100 * s['eval_accuracy']:.1f} | {100 * lo:.1f}–{100 * hi:.1f} | "
                  f"{100 * zs_acc:.1f} ({BASE[k]}) | {d} | {iv} | {p} | {s.get('step_time_s') or 0:.2f} | "
                  f"{s['peak_rss_bytes'] / 2**20:.0f} |")
        print()
        print("| claim (paper) | a | b | a − b (points) | 95% interval | McNemar p |")
        print("|---|---|---|---|---|---|")
        for x, y, claim in CLAIMS:
            ra, rb = root / f"{task}-{x}", root / f"{task}-{y}"
            if summary(ra) and summary(rb):
                d, iv, p = paired(a.qtune, ra, rb) or ("", "", "")
                print(f"| {claim} | {x} | {y} | {d} | {iv} | {p} |")
            elif ra.exists() and rb.exists():
                print(f"| {claim} | {x} | {y} | not finished yet | | |")
            else:  # e.g. SIQA's claims groups leave out FP32 AdamW and Q-RGE1 (scripts/accuracy_runs.sh)
                missing = ", ".join(r.name for r in (ra, rb) if not r.exists())
                print(f"| {claim} | {x} | {y} | no run: {missing} | | |")
        print()
        if a.plots:
            for name, group in [("zo", ZO), ("fo", FO)]:
                runs = [str(root / f"{task}-{k}") for k in group if (root / f"{task}-{k}" / "log.jsonl").exists()]
                if runs:
                    out = Path(a.plots) / f"{task}-{name}"
                    subprocess.run([a.qtune, "report", *runs, "--out", str(out), "--title",
                                    f"{task}: {'zeroth-order (LoRA mode) and quantized first-order' if name == 'zo' else 'first-order'}"],
                                   check=True, capture_output=True)
                    print(f"![{task} {name} loss]({out}/loss.png)\n")


if __name__ == "__main__":
    main()

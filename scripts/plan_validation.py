#!/usr/bin/env python3
"""Predicted against measured peak RSS for finished runs: prints a Markdown table.
Usage: scripts/plan_validation.py RUN_DIR[=TRAIN_ARGS]...
Each run is re-planned with `qtune train <its arguments> --plan FILE`, which plans the run's own batches (the
rows' real lengths: padding is never computed) without loading the weights. The arguments are the run's recorded
command line (summary.json `command`); runs written before it was recorded give theirs as RUN_DIR=TRAIN_ARGS."""
import json, shlex, subprocess, sys

BIN = "target/release/qtune"
rows = ["| run | predicted peak | measured peak RSS | error |", "| --- | --- | --- | --- |"]
for spec in sys.argv[1:]:
    run, _, given = spec.partition("=")
    s = json.load(open(f"{run}/summary.json"))
    if given:
        args = shlex.split(given)
    elif "command" in s:
        args = s["command"][2:]  # past `qtune train`
    else:
        sys.exit(f"{run}: summary.json has no command; give the run's train arguments as {run}=ARGS")
    subprocess.run([BIN, "train", *args, "--plan", "/tmp/plan.json"], check=True, capture_output=True)
    p = json.load(open("/tmp/plan.json"))[0]
    pred, meas = p["peak"] / 2**20, s["peak_rss_bytes"] / 2**20
    rows.append(f"| {run.rstrip('/').split('/')[-1]} | {pred:.0f} MiB | {meas:.0f} MiB | {100 * (pred / meas - 1):+.1f}% |")
print("\n".join(rows))

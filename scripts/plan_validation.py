#!/usr/bin/env python3
"""Predicted (`qtune plan`) against measured peak RSS for finished runs: prints a Markdown table.
Usage: scripts/plan_validation.py RUN_DIR... (each with summary.json; the plan uses each run's batch size, sequence
length, method and options as recorded in its command line, given here as RUN_DIR=METHOD_ARGS)."""
import json, subprocess, sys

BIN = "target/release/qtune"
rows = ["| run | predicted peak | measured peak RSS | error |", "| --- | --- | --- | --- |"]
for spec in sys.argv[1:]:
    run, _, margs = spec.partition("=")
    s = json.load(open(f"{run}/summary.json"))
    batch = s.get("batch_size") or 8
    evaluates = s.get("dev_accuracy_before") is not None
    args = [BIN, "plan", "--batch", str(batch), "--seq", str(s["max_seq_len"]), "--eval-batch",
            "16" if evaluates else "0", "--json", "/tmp/plan.json"] + margs.split()
    subprocess.run(args, check=True, capture_output=True)
    p = json.load(open("/tmp/plan.json"))[0]
    pred, meas = p["peak"] / 2**20, s["peak_rss_bytes"] / 2**20
    rows.append(f"| {run.rstrip('/').split('/')[-1]} | {pred:.0f} MiB | {meas:.0f} MiB | {100 * (pred / meas - 1):+.1f}% |")
print("\n".join(rows))

#!/usr/bin/env python3
"""The 7B table of scripts/big7b.sh: per run, the planned peak (train --plan of its own batches), the measured peak
RSS, the planner's error, the model state per parameter, and the step time.  Usage: big7b_table.py [OUT]"""
import json
import os
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "runs/big7b"
print("| method | planned peak (GiB) | measured peak RSS (GiB) | planner error | model state (B/param) | step (s) | tokens/s |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name in sorted(os.listdir(out)):
    if not name.endswith(".plan.json"):
        continue
    run = name[: -len(".plan.json")]
    plan = json.load(open(os.path.join(out, name)))[0]
    s_path = os.path.join(out, run, "summary.json")
    planned = plan["peak"] / 2**30
    if not os.path.exists(s_path):
        print(f"| {run} | {planned:.2f} | refused or not run | | | | |")
        continue
    s = json.load(open(s_path))
    rss = s["peak_rss_bytes"] / 2**30
    print(f"| {run} | {planned:.2f} | {rss:.2f} | {100 * (planned - rss) / rss:+.1f}% | {s['bytes_per_param']:.2f} "
          f"| {s['step_time_s']:.0f} | {s['tokens_per_s']:.2f} |")

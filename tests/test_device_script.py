"""``bench/device.sh``: the script a lent GPU runs (every bench, a small study, and
``nnsteer plan``'s figures against what it measures) parses, and runs end to end at its
tiny CPU sizes: each bench writes its output, and the plan check finds every count equal
to the plan's (or within its bound)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device.sh"
BENCHES = ("bench_generation", "bench_attribution", "bench_extract", "bench_annotator",
           "bench_offsets", "check_plan")


def test_the_device_script_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_device_script_runs_at_tiny_sizes_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(SCRIPT), "--tiny", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in BENCHES:
        assert (tmp_path / f"{name}.txt").read_text().strip(), name
    check = (tmp_path / "check_plan.txt").read_text()
    assert check.rstrip().endswith("all counts agree with the plan")
    assert "generate   forward passes" in check and "DIFFERENT" not in check
    assert "tiny sizes on cpu" in done.stderr

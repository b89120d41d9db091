"""scripts/gpu_check.sh and its Python part, on a machine without a GPU: the shell script
parses and stops with "no CUDA device"; the Python part runs its checks with the CPU standing
in for the device (tiny sizes; the CLI chain is left out here, the workflow tests cover it).
The real GPU run is scripts/gpu_check.sh on a GPU machine (docs/gpu.md)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def test_gpu_check_script_parses_and_stops_without_cuda():
    assert subprocess.run(["bash", "-n", str(REPO / "scripts/gpu_check.sh")]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: run scripts/gpu_check.sh itself")
    p = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh")], capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 2 and "no CUDA device" in p.stdout, p.stdout + p.stderr


@pytest.mark.slow
def test_gpu_check_python_part_runs_on_the_cpu(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "scripts/gpu_check.py"), "--device", "cpu", "--small", "--skip", "chain",
                        "--work-dir", str(tmp_path)], capture_output=True, text=True, env=_env(), timeout=900)
    lines = [l for l in p.stdout.splitlines() if l.startswith("gpu_check: ")]
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    checks = {re.match(r"gpu_check: ([\w-]+): (PASS|FAIL|INFO)", l).group(1) for l in lines}
    assert {"preprocess-agree", "train-60-steps", "sigusr1-resume", "throughput-preprocess", "throughput-train",
            "throughput-embed", "throughput-estep", "peak-memory", "summary"} <= checks, lines
    assert not any(": FAIL" in l for l in lines), lines

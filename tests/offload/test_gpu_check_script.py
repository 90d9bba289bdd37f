"""bench/gpu_check.sh, the one run of every GPU path: it parses, and without a GPU it stops at
its first step with a message instead of running the rest."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"


def test_the_script_parses():
    completed = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_it_stops_at_the_device_check(tmp_path):
    environment = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_DIR=str(tmp_path))
    completed = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env=environment, timeout=120
    )
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "no CUDA device" in completed.stdout
    assert (tmp_path / "device.log").exists()
    assert not (tmp_path / "tests.log").exists()

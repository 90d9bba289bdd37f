"""Peak host RSS stays within offload.max_host_memory_gb for a model whose state is >= 4x that."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_peak_rss_within_budget_for_state_four_times_larger(tmp_path):
    budget_gb = 0.9
    environment = dict(
        os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    )
    completed = subprocess.run(
        [sys.executable, str(HERE / "rss_job.py"), str(tmp_path), str(budget_gb), "80", "512", "2"],
        capture_output=True,
        text=True,
        timeout=280,
        env=environment,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["training_state_bytes"] >= 4 * report["budget_bytes"], report
    assert report["peak_rss_bytes"] <= report["budget_bytes"], report
    # The engine's own per-step measurement (VmHWM) agrees.
    assert all(peak <= report["budget_bytes"] for peak in report["step_peaks"]), report
    assert all(math.isfinite(loss) for loss in report["losses"])
    # The whole parameter + optimizer state went through the store during the step.
    assert report["bytes_written_last_step"] >= 12 * report["num_params"]

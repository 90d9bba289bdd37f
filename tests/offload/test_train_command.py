"""`stalwart train` (run_job on an embedded Ray cluster) with offload.device nvme ends with the
same parameters and AdamW state as with offload none; its durable checkpoint resumes."""

from __future__ import annotations

import numpy as np
import pytest

from stalwart.config import config_from_dict
from stalwart.launch.job import resume_job, run_job
from stalwart.snapshot.persist import latest_step


def _config(tmp_path, name: str, offload: dict, max_steps: int = 4):
    return config_from_dict(
        {
            "name": name,
            "run_dir": str(tmp_path / name),
            "model": {"depth": 1, "context_length": 16},
            "data": {"num_examples": 200},
            # A constant LR, so that a run extended on resume follows the schedule of a longer one.
            "optim": {"warmup_steps": 0, "min_lr_ratio": 1.0, "grad_clip": 0.5},
            "trainer": {"max_steps": max_steps, "batch_size": 4, "num_threads": 1},
            "parallel": {"strategy": "none", "world_size": 1},
            "cluster": {"num_nodes": 1, "cpus_per_worker": 1},
            "snapshot": {"every_steps": 1, "persist_every": 2},
            "metrics": {"progress": "off"},
            "offload": offload,
        }
    )


def _assert_same_state(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert np.array_equal(first[name], second[name]), f"{name} differs"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stalwart_train_offloaded_to_nvme_equals_in_memory_and_resumes(tmp_path):
    nvme = tmp_path / "drive"
    nvme.mkdir()
    offload = {
        "device": "nvme",
        "nvme_path": str(nvme),
        "max_host_memory_gb": 4,
        "optimizer_kernel": "torch",
    }
    quiet = {"log": lambda *_: None}
    in_memory = run_job(_config(tmp_path, "memory", {"device": "none"}), **quiet)
    offloaded = run_job(_config(tmp_path, "offloaded", offload), **quiet)
    assert in_memory["step"] == offloaded["step"] == 4
    _assert_same_state(in_memory["state"][0], offloaded["state"][0])
    # No store directory is left: a worker's shutdown removes its own (a killed worker's would
    # be removed by the next engine that uses the drive).
    assert not list(nvme.iterdir()), sorted(p.name for p in nvme.rglob("*"))

    # Whole-cluster loss after step 4: `stalwart resume` continues from the durable checkpoint.
    run_dir = tmp_path / "offloaded"
    assert latest_step(run_dir) == 4
    resumed = resume_job(run_dir, overrides=["trainer.max_steps=6"], **quiet)
    straight = run_job(_config(tmp_path, "straight", offload, max_steps=6), **quiet)
    assert resumed["step"] == straight["step"] == 6
    _assert_same_state(straight["state"][0], resumed["state"][0])
    assert not list(nvme.iterdir())

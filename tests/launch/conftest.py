"""Helpers for the multi-node tests: small configs on an embedded Ray cluster."""

from __future__ import annotations

import pytest

from stalwart.config import config_from_dict


def small_config(tmp_path, **sections) -> object:
    """A 2-node DDP job with a spare node, snapshots every step, durable tier every 4 steps."""
    tree = {
        "name": "t",
        "run_dir": str(tmp_path / "run"),
        "model": {"depth": 1, "context_length": 16},
        "data": {"num_examples": 400},
        "optim": {"warmup_steps": 2},
        "trainer": {"max_steps": 10, "batch_size": 8},
        "parallel": {"strategy": "ddp", "world_size": 2},
        "cluster": {
            "num_nodes": 2,
            "num_spare_nodes": 1,
            "cpus_per_worker": 1,
            "hang_timeout_s": 20,
        },
        "snapshot": {
            "every_steps": 1,
            "persist_every": 4,
            "erasure": {"group_size": 2, "parity": 1},
        },
        "metrics": {"progress": "off"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            tree.setdefault(section, {}).update(values)
        else:
            tree[section] = values
    return config_from_dict(tree)


@pytest.fixture
def make_config(tmp_path):
    def build(**sections):
        return small_config(tmp_path, **sections)

    return build


@pytest.fixture(scope="session")
def config_at():
    """`config_at(path, **sections)`: a small config whose run directory lives under `path`."""
    return small_config

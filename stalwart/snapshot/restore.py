"""Rebuild a rank's Trainer state for a committed version: from manager memory or the durable tier.

The controller decides which version and which source (see `launch/controller.py`); these
functions do the loading inside the worker. Memory: attach the manager's slot region and load
views over it (no copy until `load_state_dict` writes into the live tensors). Durable: read the
checkpoint, every checksum verified before anything is used.
"""

from __future__ import annotations

from pathlib import Path

import ray

from stalwart.snapshot import shm
from stalwart.snapshot.agent import load_snapshot


def load_from_manager(trainer, manager, rank: int, version: int) -> None:
    region_name, layout_json, checksums = ray.get(manager.slot_for.remote(rank, version))
    region = shm.attach_region(region_name)
    try:
        load_snapshot(trainer, region.buffer, layout_json, checksums)
    finally:
        region.close()


def load_from_durable(trainer, run_dir: str | Path, rank: int, step: int) -> None:
    import json

    from stalwart.snapshot.persist import load_checkpoint

    name = f"rank{rank:05d}"
    checkpoint = load_checkpoint(run_dir, step, names=[name])
    array, layout = checkpoint.shards[name]
    load_snapshot(trainer, memoryview(array), json.dumps(layout))

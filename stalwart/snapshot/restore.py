"""Rebuild a rank's Trainer state for a committed version: from manager memory or the durable tier.

The controller decides which version and which source (see `launch/controller.py`); these
functions do the loading inside the worker. Memory: read the manager's slot region into the
trainer's tensors, each entry verified as it is read. Durable: read the checkpoint, every
checksum verified before anything is used.
"""

from __future__ import annotations

from pathlib import Path

import ray

from stalwart.snapshot import shm
from stalwart.snapshot.agent import load_snapshot, restore_targets
from stalwart.snapshot.state import Layout, read_verified


def load_from_manager(trainer, manager, rank: int, version: int) -> None:
    """Read the version's slot once, with pread rather than a mapping (no page tables to set
    up for a region read once), straight into the trainer's tensors where it names them
    (`Trainer.restore_targets`), every entry verified as it lands; then load the rest."""
    region_name, layout_json, checksums = ray.get(manager.slot_for.remote(rank, version))
    layout = Layout.coerce(layout_json)
    with shm.RegionReader(region_name) as reader:
        state = read_verified(layout, reader.read_into, checksums, restore_targets(trainer, layout))
    trainer.load_state_dict(state)


def load_from_durable(trainer, run_dir: str | Path, rank: int, step: int) -> None:
    import json

    from stalwart.snapshot.persist import load_checkpoint

    name = f"rank{rank:05d}"
    checkpoint = load_checkpoint(run_dir, step, names=[name])
    array, layout = checkpoint.shards[name]
    load_snapshot(trainer, memoryview(array), json.dumps(layout))

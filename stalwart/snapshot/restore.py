"""Rebuild a rank's Trainer state for a committed version: from manager memory or the durable tier.

The controller decides which version and which source (see `launch/controller.py`); these
functions do the loading inside the worker. Memory: read the manager's slot region into the
trainer's tensors, each entry verified as it is read. Durable: read the checkpoint, every
checksum verified before anything is used.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray

from stalwart.snapshot import shm
from stalwart.snapshot.agent import load_snapshot, restore_targets
from stalwart.snapshot.state import Layout, read_verified


def load_from_manager(
    trainer, manager, rank: int, version: int, timings: dict | None = None
) -> None:
    """Read the version's slot once, with pread rather than a mapping (no page tables to set
    up for a region read once), straight into the trainer's tensors where it names them
    (`Trainer.restore_targets`), every entry verified as it lands; then load the rest.
    `timings`, when given, receives the seconds of each part: `locate_s` (asking the manager
    which region holds the version), `read_s` (read + verify) and `load_s`."""
    clock = _Clock(timings)
    region_name, layout_json, checksums = ray.get(manager.slot_for.remote(rank, version))
    layout = Layout.coerce(layout_json)
    clock.mark("locate_s")
    with shm.RegionReader(region_name) as reader:
        state = read_verified(layout, reader.read_into, checksums, restore_targets(trainer, layout))
    clock.mark("read_s")
    trainer.load_state_dict(state)
    clock.mark("load_s")


def load_from_durable(
    trainer, run_dir: str | Path, rank: int, step: int, timings: dict | None = None
) -> None:
    """Read the rank's shard of checkpoint `step`, every checksum verified, and load it.
    `timings` as for `load_from_manager` (`read_s` covers reading and verifying the files)."""
    import json

    from stalwart.snapshot.persist import load_checkpoint

    clock = _Clock(timings)
    name = f"rank{rank:05d}"
    checkpoint = load_checkpoint(run_dir, step, names=[name])
    array, layout = checkpoint.shards[name]
    clock.mark("read_s")
    load_snapshot(trainer, memoryview(array), json.dumps(layout))
    clock.mark("load_s")


class _Clock:
    """Seconds between marks, written into `timings` (a no-op without one)."""

    def __init__(self, timings: dict | None):
        self.timings = timings
        self.last = time.perf_counter()

    def mark(self, key: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[key] = now - self.last
        self.last = now

"""Fault injection and randomized fault drills.

`faults.events` in the config lists what to break and when. Worker-side faults fire inside
the step at the named phase (`kill_worker`: SIGKILL the worker process; `hang_worker`: stop
forever, as a rank stuck in a collective would). Node, manager and fragment faults are
carried out by the controller once the job reaches the step (see `launch/controller.py`);
`stall_manager` makes a live manager answer nothing for `duration_s`, as one starved of CPU
would: it must not be taken for dead.

`run_drill` trains the config once without faults and once with N random faults, and checks
that the final parameters and optimizer state are bit-identical.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import numpy as np

WORKER_FAULTS = ("kill_worker", "hang_worker")


def fault_rank(event: dict, workers_per_node: int) -> int:
    """The rank whose step and phase time a fault: its own rank, or the first rank of its node."""
    if (
        event["kind"] in ("kill_node", "kill_manager", "stall_manager")
        and event.get("node") is not None
    ):
        return event["node"] * workers_per_node
    return event["rank"]


class FaultInjector:
    """Fires the faults of one rank at their step and phase.

    Worker faults act in the worker itself. For a node, manager or fragment fault the rank
    pauses at that point and reports the fault as pending; the controller carries it out (a
    removed node takes the paused worker with it) and then releases the rank.
    """

    def __init__(
        self, events: list[dict], *, rank: int, attempt: int, release_timeout_s: float = 120.0
    ):
        self.events = list(events)
        self.rank = rank
        self.attempt = attempt
        self.pending: dict | None = None
        self._released = threading.Event()
        self.release_timeout_s = release_timeout_s

    def on_phase(self, phase: str, step: int) -> None:
        for event in self.events:
            if event["step"] != step or event["phase"] != phase:
                continue
            if event["kind"] == "kill_worker":
                os.kill(os.getpid(), signal.SIGKILL)
            elif event["kind"] == "hang_worker":
                while True:
                    time.sleep(3600)
            else:
                self._released.clear()
                self.pending = {**event, "at_step": step}
                self._released.wait(self.release_timeout_s)
                self.pending = None

    def release(self) -> None:
        self._released.set()


def random_faults(config, num_faults: int, seed: int) -> list[dict]:
    """N faults spread over the run, of the kinds the cluster shape can absorb."""
    rng = random.Random(seed)
    max_steps = config.trainer.max_steps
    kinds = ["kill_worker"]
    phases = ["forward", "backward", "optimizer"]
    if config.cluster.num_spare_nodes and config.snapshot.erasure.parity:
        kinds.append("kill_node")
    steps = sorted(rng.sample(range(2, max_steps), min(num_faults, max_steps - 2)))
    events = []
    spare_nodes = config.cluster.num_spare_nodes
    for step in steps:
        kind = rng.choice(kinds)
        if kind == "kill_node":
            if spare_nodes == 0:
                kind = "kill_worker"
            else:
                spare_nodes -= 1
        event = {
            "kind": kind,
            "step": step,
            "phase": rng.choice(phases),
            "rank": rng.randrange(config.parallel.world_size),
        }
        if kind == "kill_node":
            event["node"] = rng.randrange(config.cluster.num_nodes)
        events.append(event)
    return events


def states_equal(first: dict, second: dict) -> tuple[bool, str]:
    for rank in first:
        for name, array in first[rank].items():
            other = second[rank].get(name)
            if other is None or array.shape != other.shape or not np.array_equal(array, other):
                return False, f"rank {rank} {name} differs"
    return True, "identical"


def run_drill(config, *, num_faults: int, seed: int, log=print) -> bool:
    from stalwart.config import config_from_dict
    from stalwart.launch.job import run_job

    base = config.to_dict()
    base["faults"] = {"events": []}
    reference = run_job(
        config_from_dict(base), run_dir=config.resolved_run_dir() / "reference", log=log
    )
    drilled = dict(base)
    drilled["faults"] = {"events": random_faults(config, num_faults, seed)}
    log(f"drill: {len(drilled['faults']['events'])} faults: {drilled['faults']['events']}")
    result = run_job(
        config_from_dict(drilled), run_dir=config.resolved_run_dir() / "drill", log=log
    )
    same, detail = states_equal(reference["state"], result["state"])
    log(
        f"drill: {len(result['recoveries'])} recoveries; final state vs uninterrupted run: {detail}"
    )
    return same

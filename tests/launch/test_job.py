"""A real multi-node job on an embedded Ray cluster: it trains, and leaves no process behind."""

from __future__ import annotations

import time

import psutil
import pytest
import ray

from stalwart.launch.cluster import connect
from stalwart.launch.controller import JobController
from stalwart.launch.job import cpus_per_node


def _wait_gone(pids, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [
            pid
            for pid in pids
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
        ]
        if not alive:
            return []
        time.sleep(0.5)
    return alive


@pytest.mark.timeout(400)
def test_two_node_job_trains_and_cleans_up(make_config):
    config = make_config(
        trainer={"max_steps": 40, "batch_size": 8},
        optim={"lr": 3e-3, "warmup_steps": 5},
        cluster={"num_spare_nodes": 0},
    )
    cluster = connect(num_nodes=2, cpus_per_node=cpus_per_node(config))
    controller = JobController(config, cluster, config.resolved_run_dir(), log=lambda *_: None)
    try:
        controller.start()
        pids = [ray.get(w.pid.remote()) for w in controller.workers.values()]
        pids += [ray.get(m.ping.remote())["pid"] for m in controller.managers.values()]
        nodes = {ray.get(w.node_ip.remote()) for w in controller.workers.values()}
        summary = controller.run()
    finally:
        controller.shutdown()
        cluster.shutdown()
    assert nodes == {"127.0.0.1"}
    assert summary["step"] == 40
    losses = [record["loss"] for record in controller.history]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert not _wait_gone(pids), "worker or manager processes survived the shutdown"
    assert (config.resolved_run_dir() / "config.yaml").is_file()


def test_durable_fallback_takes_the_newest_checkpoint_that_verifies(make_config):
    """Beyond memory's reach the controller restarts from the durable tier: a newest checkpoint
    that is incomplete (here a truncated shard; the choice checks manifests and sizes, the
    workers the checksums as they load, see test_recovery) is reported and the next older one
    used; none usable means a restart from scratch. No Ray needed: the choice reads only the
    disk."""
    import numpy as np

    from stalwart.launch.cluster import ClusterHandle
    from stalwart.snapshot.persist import checkpoint_dir, write_checkpoint

    config = make_config()
    run_dir = config.resolved_run_dir()
    buffer = np.arange(256, dtype=np.uint8)
    layout = {"total_bytes": 256, "entries": []}
    for step in (4, 8):
        write_checkpoint(run_dir, step, {"rank00000": (buffer, layout)}, {}, keep=3)
    shard = checkpoint_dir(run_dir, 8) / "rank00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    logs = []
    controller = JobController(config, ClusterHandle(), run_dir, log=logs.append)
    assert controller._durable_fallback("two nodes lost") == (4, "durable", "two nodes lost")
    assert any("durable checkpoint of step 8 is unusable" in line for line in logs), logs
    assert any("truncated" in line for line in logs), logs
    controller.unusable_durable.add(4)  # as a worker that found step 4's data corrupt marks it
    assert controller._durable_fallback("lost")[:2] == (None, "scratch")
    controller.unusable_durable.clear()
    controller.durable_candidates = lambda: [8]  # e.g. only 8 carries an RL pipeline state
    assert controller._durable_fallback("lost")[:2] == (None, "scratch")


def test_a_durable_write_underway_lands_before_the_fallback_chooses(make_config):
    """The fallback first lets the managers finish the checkpoint writes already underway:
    one landing after the choice would prune the chosen checkpoint (keep=1) while the new
    workers load it. A manager that cannot finish is stopped, with its write, before the choice.
    The managers here are stand-in actors with the two calls the fallback makes."""
    import numpy as np

    from stalwart.snapshot.persist import write_checkpoint

    config = make_config()
    run_dir = config.resolved_run_dir()
    shard = {"rank00000": (np.arange(256, dtype=np.uint8), {"total_bytes": 256, "entries": []})}
    write_checkpoint(run_dir, 4, shard, {}, keep=1)

    @ray.remote
    class WritingManager:
        def settle_durable(self, timeout_s):
            time.sleep(0.5)  # the write of step 8, underway when the node went
            write_checkpoint(run_dir, 8, shard, {}, keep=1)  # prunes step 4
            return True

        def reset(self):
            pass

    @ray.remote
    class StuckManager:
        def settle_durable(self, timeout_s):
            return False  # its write is still running when the wait ends

        def reset(self):
            pass

    cluster = connect(num_nodes=1, cpus_per_node=2)
    logs = []
    try:
        controller = JobController(config, cluster, run_dir, log=logs.append)
        stuck = StuckManager.remote()
        controller.managers = {0: WritingManager.remote(), 1: stuck}
        assert controller._durable_fallback("lost") == (8, "durable", "lost")
        with pytest.raises(ray.exceptions.ActorDiedError):
            ray.get(stuck.__ray_ready__.remote(), timeout=10)
        assert any("position 1 did not finish its durable writes" in line for line in logs), logs
    finally:
        cluster.shutdown()


def test_detection_is_timed_from_an_injected_fault_when_its_moment_is_known(make_config):
    """A failure's detection time is the time since the failed ranks last completed a step (an
    upper bound: the fault came some time after it), counted up to the moment that was
    measured, not the end of the classification. A fault this controller carried out itself
    (a node removed, a manager killed) after that step has a known moment, and detection is
    timed from it instead. No Ray needed: the ranks' and managers' answers are stand-ins."""
    from stalwart.launch.cluster import ClusterHandle

    config = make_config()
    controller = JobController(config, ClusterHandle(), config.resolved_run_dir(), log=print)
    controller.node_of = {}
    controller._drain_progress = lambda: {0: 2.0, 1: 2.0}  # both stepped 2 s ago
    controller._call_all = lambda handles, method, *args, **kwargs: {0: 100, 1: 101}
    controller.cluster.alive_nodes = lambda: []

    def slow_call_all(handles, method, *args, **kwargs):
        time.sleep(0.3)  # a classification that waits on the cluster
        return {0: 100, 1: 101}

    controller._call_all = slow_call_all
    failure = controller._classify([1], "rank 1 failed")
    assert failure.detection_s == pytest.approx(2.0, abs=0.05)
    # The classification's own time is counted by the recovery (from `detected_at`).
    assert time.perf_counter() - failure.detected_at >= 0.6

    controller._call_all = lambda handles, method, *args, **kwargs: {0: 100, 1: 101}
    controller.injected_at = time.perf_counter() - 0.5  # after the ranks' last step
    failure = controller._classify([1], "rank 1 failed")
    assert 0.5 <= failure.detection_s < 0.6
    assert controller.injected_at is None  # used once

    controller.injected_at = time.perf_counter() - 5.0  # before it: not this failure's cause
    failure = controller._classify([1], "rank 1 failed")
    assert failure.detection_s == pytest.approx(2.0, abs=0.05)

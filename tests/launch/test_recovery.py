"""Recovery on a real multi-node Ray cluster, checked bit-for-bit against an uninterrupted run.

Every test trains the same small job with faults injected and compares every parameter and
optimizer tensor of every rank with a run that had no fault.
"""

from __future__ import annotations

import pytest

from stalwart.config import config_from_dict
from stalwart.launch.faults import states_equal
from stalwart.launch.job import resume_job, run_job

pytestmark = pytest.mark.timeout(600)


def _quiet(message):
    print(message)  # shown by pytest only when a test fails


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config_at):
    config = config_at(tmp_path_factory.mktemp("reference"))
    return run_job(config, log=_quiet)


# Four ranks on four nodes in one erasure group with parity 2, two spare nodes.
FOUR_NODES = {
    "parallel": {"strategy": "ddp", "world_size": 4},
    "cluster": {"num_nodes": 4, "num_spare_nodes": 2},
    "snapshot": {"erasure": {"group_size": 4, "parity": 2}},
}


def _with_faults(config, events):
    tree = config.to_dict()
    tree["faults"] = {"events": events}
    return config_from_dict(tree)


def _assert_identical(reference, summary):
    same, detail = states_equal(reference["state"], summary["state"])
    assert same, detail
    assert summary["step"] == reference["step"]


def test_regions_in_the_configured_shm_dir_serve_a_recovery(reference, make_config):
    """snapshot.shm_dir reaches every process of the job: the managers create their regions
    there, the agents write and the new worker reads them (a process looking elsewhere would
    find nothing), and the job's end removes them. The directory is a fresh one on the default
    tmpfs: regions on a disk filesystem would be written back to the disk as the job runs."""
    import shutil
    import uuid

    from stalwart.snapshot import shm

    regions = shm.shm_dir() / f"regions-test-{uuid.uuid4().hex[:8]}"
    regions.mkdir()
    try:
        config = _with_faults(
            make_config(snapshot={"shm_dir": str(regions)}),
            [{"kind": "kill_worker", "step": 5, "phase": "forward", "rank": 1}],
        )
        messages = []
        summary = run_job(config, log=messages.append)
        assert any(m.startswith(f"snapshot regions in {regions}") for m in messages), messages
        recoveries = [(r.kind, r.source) for r in summary["recoveries"]]
        assert recoveries == [("process", "memory")], messages
        _assert_identical(reference, summary)
        assert list(regions.iterdir()) == []
    finally:
        shutil.rmtree(regions, ignore_errors=True)


def test_a_checkpoint_a_worker_finds_corrupt_is_skipped_for_an_older_one(
    reference, make_config, monkeypatch
):
    """The durable fallback checks manifests and sizes; each worker verifies the checksums of
    its own shard as it loads. A flipped byte there (here put in right after the choice) marks
    that checkpoint unusable, the recovery takes the next older one, and the run still ends
    bit-identical."""
    from stalwart.launch.controller import JobController
    from stalwart.snapshot.persist import checkpoint_dir

    original = JobController._newest_durable
    corrupted = []

    def newest_then_corrupt(self, below=None):
        step = original(self, below=below)
        if step is not None and not corrupted:
            shard = checkpoint_dir(self.run_dir, step) / "rank00001.safetensors"
            data = bytearray(shard.read_bytes())
            data[-1] ^= 0xFF
            shard.write_bytes(bytes(data))
            corrupted.append(step)
        return step

    monkeypatch.setattr(JobController, "_newest_durable", newest_then_corrupt)
    config = _with_faults(
        make_config(snapshot={"persist_every": 2, "erasure": {"group_size": 2, "parity": 0}}),
        [{"kind": "kill_node", "step": 7, "node": 1}],
    )
    messages = []
    summary = run_job(config, log=messages.append)
    assert corrupted, messages
    bad = corrupted[0]
    assert any(
        f"durable checkpoint of step {bad} is unusable" in m and "xxh3" in m for m in messages
    ), messages
    durable = [r for r in summary["recoveries"] if r.source == "durable"]
    assert len(durable) == 1 and durable[0].restored_version < bad, summary["recoveries"]
    _assert_identical(reference, summary)


def test_a_missing_shm_dir_fails_before_training(make_config):
    from stalwart.launch.controller import JobFailed

    config = make_config(snapshot={"shm_dir": "/no/such/stalwart/regions"})
    with pytest.raises(JobFailed, match=r"snapshot\.shm_dir='/no/such/stalwart/regions'"):
        run_job(config, log=_quiet)
    metrics = config.resolved_run_dir() / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""  # no step was trained


@pytest.mark.parametrize(
    "phase, standby", [("forward", True), ("backward", True), ("optimizer", False)]
)
def test_worker_killed_in_each_phase_recovers_bit_identically(
    reference, make_config, phase, standby
):
    # With standby workers the new group is made of Trainers built before the failure, with
    # no process group, and wrapped when they join; without, of freshly started processes.
    config = _with_faults(
        make_config(cluster={"standby_workers": standby}),
        [{"kind": "kill_worker", "step": 5, "phase": phase, "rank": 1}],
    )
    summary = run_job(config, log=_quiet)
    assert len(summary["recoveries"]) == 1
    recovery = summary["recoveries"][0]
    assert recovery.kind == "process" and recovery.source == "memory"
    assert recovery.lost_steps <= 2
    assert recovery.standby_ranks == (2 if standby else 0)
    _assert_identical(reference, summary)


def test_node_removed_recovers_from_parity_on_the_spare(reference, make_config):
    config = _with_faults(
        make_config(cluster={"standby_workers": True}),
        [{"kind": "kill_node", "step": 4, "node": 1}],
    )
    messages = []
    summary = run_job(config, log=messages.append)
    kinds = [(r.kind, r.source) for r in summary["recoveries"]]
    assert kinds == [("node", "erasure")], kinds
    # The spare's manager was asked to reserve slots of the job's size once the ranks
    # registered. Whether it had them before the loss depends on how soon the loss comes after
    # the standby process started (bench/recovery.py shows the rebuild using them).
    assert any("reserving slots of [" in m for m in messages), "\n".join(messages)
    assert any(m.startswith("position 1: rebuilt") for m in messages), "\n".join(messages)
    # the spare node's standby takes the lost rank, the survivor's node's standby the other;
    # the manager already running on the spare takes the lost position
    assert summary["recoveries"][0].standby_ranks == 2
    assert summary["standby_manager_takeovers"] == 1
    _assert_identical(reference, summary)


def test_a_dead_standby_is_replaced_by_a_fresh_worker(tmp_path, config_at):
    import ray

    from stalwart.launch.cluster import connect
    from stalwart.launch.controller import JobController
    from stalwart.launch.job import cpus_per_node

    config = _with_faults(
        config_at(tmp_path, trainer={"max_steps": 8}, cluster={"standby_workers": True}),
        [{"kind": "kill_worker", "step": 5, "phase": "forward", "rank": 1}],
    )
    cluster = connect(num_nodes=2, num_spare_nodes=1, cpus_per_node=cpus_per_node(config))
    controller = JobController(config, cluster, config.resolved_run_dir(), log=_quiet)
    try:
        controller.start()
        node_1 = controller.node_of[1]
        doomed = controller.standbys[node_1][0]
        ray.kill(doomed, no_restart=True)
        summary = controller.run()
    finally:
        controller.shutdown()
        cluster.shutdown()
    assert summary["step"] == 8
    (recovery,) = summary["recoveries"]
    assert recovery.source == "memory" and recovery.standby_ranks == 1


def test_hung_worker_is_detected_and_recovered(reference, make_config):
    config = _with_faults(
        make_config(cluster={"hang_timeout_s": 8}),
        [{"kind": "hang_worker", "step": 6, "phase": "backward", "rank": 0}],
    )
    summary = run_job(config, log=_quiet)
    assert [r.kind for r in summary["recoveries"]] == ["hang"]
    assert summary["recoveries"][0].detection_s < 8 + 10
    _assert_identical(reference, summary)


def test_corrupt_copy_in_memory_is_detected_and_rebuilt(reference, make_config):
    config = _with_faults(
        make_config(),
        [
            {"kind": "corrupt_fragment", "step": 5, "rank": 0},
            {"kind": "kill_worker", "step": 7, "phase": "forward", "rank": 1},
        ],
    )
    summary = run_job(config, log=_quiet)
    sources = [r.source for r in summary["recoveries"]]
    # The corrupted version may have been superseded before the kill; either way nothing corrupt
    # is ever loaded (loading verifies every checksum) and the result is bit-identical.
    assert sources in (["erasure"], ["memory"]), sources
    _assert_identical(reference, summary)


def test_manager_killed_alone_is_replaced_without_stopping_the_job(tmp_path, config_at):
    """The manager of node 1 dies; its workers keep training, a replacement starts on the same
    node and is filled by the next snapshots: a later worker kill restores from its memory."""
    longer = {"trainer": {"max_steps": 100, "batch_size": 8}}
    clean = run_job(config_at(tmp_path / "clean", **longer), log=_quiet)
    messages = []
    faulted = _with_faults(
        config_at(tmp_path / "faulted", **longer),
        [
            {"kind": "kill_manager", "step": 3, "node": 1},
            {"kind": "kill_worker", "step": 90, "phase": "forward", "rank": 1},
        ],
    )
    summary = run_job(faulted, log=messages.append)
    assert [r["position"] for r in summary["manager_restarts"]] == [1], messages
    recoveries = summary["recoveries"]
    assert [r.kind for r in recoveries] == ["process"], "\n".join(
        [r.summary() for r in recoveries] + messages
    )
    # Restored from memory at a version the replacement manager received after it started.
    assert recoveries[0].source == "memory" and recoveries[0].restored_version > 3, recoveries[
        0
    ].summary()
    _assert_identical(clean, summary)


def test_a_manager_that_stops_answering_for_a_while_is_not_taken_for_dead(tmp_path, config_at):
    """A live manager that answers nothing for 8 s (starved of CPU, page-faulting gigabytes)
    keeps its place and its committed snapshots: the controller waits for Ray's word or a long
    silence before replacing one, and a later worker kill restores from that manager's memory."""
    longer = {"trainer": {"max_steps": 40, "batch_size": 8}}
    clean = run_job(config_at(tmp_path / "clean", **longer), log=_quiet)
    messages = []
    faulted = _with_faults(
        config_at(tmp_path / "faulted", **longer),
        [
            {"kind": "stall_manager", "step": 3, "node": 1, "duration_s": 8},
            {"kind": "kill_worker", "step": 30, "phase": "forward", "rank": 1},
        ],
    )
    summary = run_job(faulted, log=messages.append)
    assert any("stops answering" in m for m in messages), messages
    assert summary["manager_restarts"] == [], messages
    recoveries = summary["recoveries"]
    assert [(r.kind, r.source) for r in recoveries] == [("process", "memory")], messages
    assert recoveries[0].lost_steps <= 2, recoveries[0].summary()
    _assert_identical(clean, summary)


def test_elastic_job_continues_on_the_surviving_node_when_no_spare_is_free(tmp_path, config_at):
    no_spare = {"cluster": {"num_spare_nodes": 0, "elastic": True}}
    clean = run_job(config_at(tmp_path / "clean", **no_spare), log=_quiet)
    messages = []
    faulted = _with_faults(
        config_at(tmp_path / "faulted", **no_spare), [{"kind": "kill_node", "step": 5, "node": 1}]
    )
    summary = run_job(faulted, log=messages.append)
    assert summary["world_size"] == 1 and summary["step"] == clean["step"]
    recovery = summary["recoveries"][0]
    assert recovery.kind == "node" and recovery.source == "memory", recovery.summary()
    assert any("elastic: continuing on 1 rank(s) instead of 2" in m for m in messages), messages
    # Same global batch on one rank: the same trajectory up to the order of the sums.
    import numpy as np

    for name, array in clean["state"][0].items():
        other = summary["state"][0][name]
        if array.dtype.kind == "f":
            assert np.allclose(array, other, rtol=1e-4, atol=1e-5), name


@pytest.mark.slow
def test_resume_after_the_cluster_is_gone_continues_from_the_durable_tier(tmp_path, config_at):
    """`stalwart resume` checks the newest checkpoint's manifest and sizes and starts from it;
    each worker checks its own shard's data as it loads. A shard that fails there (a copy of
    the run with one flipped byte) sends the job to the next older checkpoint, and the resumed
    run still equals a straight one."""
    import shutil

    from stalwart.launch.controller import JobFailed
    from stalwart.snapshot.persist import checkpoint_dir, list_checkpoints

    # A constant learning rate makes the schedule independent of max_steps, so an 8-step run
    # resumed to 12 steps must equal a straight 12-step run.
    constant = {"warmup_steps": 0, "min_lr_ratio": 1.0}
    straight = run_job(
        config_at(tmp_path / "a", optim=constant, trainer={"max_steps": 12, "batch_size": 8}),
        log=_quiet,
    )
    first = config_at(tmp_path / "b", optim=constant, trainer={"max_steps": 8, "batch_size": 8})
    run_job(first, log=_quiet)
    # A copy of the stopped run whose newest checkpoint has one flipped byte in a shard's data:
    # its manifest and sizes are fine, so only the worker that loads that shard can tell.
    corrupt_run = tmp_path / "c"
    shutil.copytree(first.resolved_run_dir(), corrupt_run)
    shard = checkpoint_dir(corrupt_run, 8) / "rank00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    messages = []
    resumed = resume_job(
        first.resolved_run_dir(), overrides=["trainer.max_steps=12"], log=messages.append
    )
    assert any("durable checkpoint of step 8" in m for m in messages), messages
    _assert_identical(straight, resumed)

    messages = []
    resumed = resume_job(corrupt_run, overrides=["trainer.max_steps=12"], log=messages.append)
    assert any(
        "durable checkpoint of step 8 is unusable" in m and "restoring step 4" in m
        for m in messages
    ), messages
    _assert_identical(straight, resumed)

    # With every checkpoint corrupt, a resume fails instead of quietly starting over.
    for step in list_checkpoints(corrupt_run):
        for shard in checkpoint_dir(corrupt_run, step).glob("*.safetensors"):
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0xFF
            shard.write_bytes(bytes(data))
    with pytest.raises(JobFailed, match="no older complete one is left"):
        resume_job(corrupt_run, overrides=["trainer.max_steps=16"], log=_quiet)


def test_fsdp_worker_kill_recovers_bit_identically(tmp_path, config_at):
    fsdp = {"strategy": "fsdp", "world_size": 2}
    clean = run_job(config_at(tmp_path / "clean", parallel=fsdp), log=_quiet)
    faulted = _with_faults(
        config_at(tmp_path / "faulted", parallel=fsdp),
        [{"kind": "kill_worker", "step": 6, "phase": "backward", "rank": 0}],
    )
    summary = run_job(faulted, log=_quiet)
    assert [r.source for r in summary["recoveries"]] == ["memory"]
    _assert_identical(clean, summary)


@pytest.mark.slow
def test_two_losses_in_a_parity_two_group_recover_from_memory(tmp_path, config_at):
    clean = run_job(config_at(tmp_path / "clean", **FOUR_NODES), log=_quiet)
    faulted = _with_faults(
        config_at(tmp_path / "faulted", **FOUR_NODES),
        [{"kind": "kill_node", "step": 5, "node": 1}, {"kind": "kill_node", "step": 5, "node": 3}],
    )
    summary = run_job(faulted, log=_quiet)
    assert all(r.source == "erasure" for r in summary["recoveries"]), [
        r.summary() for r in summary["recoveries"]
    ]
    _assert_identical(clean, summary)


@pytest.mark.slow
def test_a_node_lost_during_the_recovery_is_assessed_again(tmp_path, config_at, monkeypatch):
    """A multi-node fault can still unfold while the controller recovers: here a second node
    dies while the first one's state is rebuilt. The recovery counts it lost too, assesses
    again and rebuilds both from parity (group of four, parity 2), instead of restarting a
    group on a dead node or giving up on memory."""
    import time

    import ray

    from stalwart.launch.controller import JobController

    clean = run_job(config_at(tmp_path / "clean", **FOUR_NODES), log=_quiet)
    rebuild = JobController._rebuild
    removed = []

    def rebuild_while_a_second_node_dies(self, version, lost, detail):
        if not removed:
            position = 3
            removed.append(position)
            self.cluster.remove_node(self.node_of[position])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    ray.get(self.managers[position].ping.remote(), timeout=1)
                except Exception:
                    break
                time.sleep(0.2)
        return rebuild(self, version, lost, detail)

    monkeypatch.setattr(JobController, "_rebuild", rebuild_while_a_second_node_dies)
    messages = []
    faulted = _with_faults(
        config_at(tmp_path / "faulted", **FOUR_NODES),
        [{"kind": "kill_node", "step": 5, "node": 1}],
    )
    summary = run_job(faulted, log=messages.append)
    assert removed == [3]
    assert [r.source for r in summary["recoveries"]] == ["erasure"], messages
    assert any("failed during the recovery: assessing again" in m for m in messages), messages
    assert "1, 3" in summary["recoveries"][0].detail
    _assert_identical(clean, summary)


@pytest.mark.slow
def test_a_node_lost_while_the_new_group_starts_is_recovered_again(
    tmp_path, config_at, monkeypatch
):
    """The next failure can come before the recovery is over: a node dies while the new
    worker group starts on it. The controller classifies that as a node loss and recovers
    again (parity rebuild on the second spare), and the run still ends bit-identical."""
    from stalwart.launch.controller import JobController

    clean = run_job(config_at(tmp_path / "clean", **FOUR_NODES), log=_quiet)
    start_workers = JobController._start_workers
    removed = []

    def start_while_a_node_dies(self, **kwargs):
        if self.attempt >= 1 and not removed:
            removed.append(3)
            self.cluster.remove_node(self.node_of[3])
        return start_workers(self, **kwargs)

    monkeypatch.setattr(JobController, "_start_workers", start_while_a_node_dies)
    messages = []
    faulted = _with_faults(
        config_at(tmp_path / "faulted", **FOUR_NODES),
        [{"kind": "kill_node", "step": 5, "node": 1}],
    )
    summary = run_job(faulted, log=messages.append)
    print("\n".join(messages))
    assert removed == [3]
    assert any("recovering again" in m for m in messages), messages
    assert [(r.kind, r.source) for r in summary["recoveries"]] == [("node", "erasure")], messages
    _assert_identical(clean, summary)


def test_an_error_during_the_recovery_with_nothing_dead_is_raised(make_config, monkeypatch):
    """The retry of a failed recovery is for faults still unfolding; when nothing died, the
    error is the job's own and reaches the user instead of being retried away."""
    import ray

    from stalwart.launch.controller import JobController

    start_workers = JobController._start_workers

    def start_fails_in_the_recovery(self, **kwargs):
        if self.attempt >= 1:
            raise ray.exceptions.GetTimeoutError("setup of the new group timed out")
        return start_workers(self, **kwargs)

    monkeypatch.setattr(JobController, "_start_workers", start_fails_in_the_recovery)
    config = _with_faults(
        make_config(), [{"kind": "kill_worker", "step": 3, "phase": "forward", "rank": 1}]
    )
    with pytest.raises(ray.exceptions.GetTimeoutError, match="setup of the new group"):
        run_job(config, log=_quiet)


@pytest.mark.slow
def test_losses_beyond_parity_fall_back_to_the_durable_tier_and_report_lost_steps(
    tmp_path, config_at
):
    three_nodes = {
        "parallel": {"strategy": "ddp", "world_size": 3},
        "cluster": {"num_nodes": 3, "num_spare_nodes": 2},
        "trainer": {"max_steps": 10, "batch_size": 9},
        "snapshot": {"persist_every": 3, "erasure": {"group_size": 3, "parity": 1}},
    }
    clean = run_job(config_at(tmp_path / "clean", **three_nodes), log=_quiet)
    messages = []
    faulted = _with_faults(
        config_at(tmp_path / "faulted", **three_nodes),
        [{"kind": "kill_node", "step": 8, "node": 0}, {"kind": "kill_node", "step": 8, "node": 2}],
    )
    summary = run_job(faulted, log=messages.append)
    durable = [r for r in summary["recoveries"] if r.source == "durable"]
    assert durable, messages
    # The managers write checkpoints in the background: step 6's is complete when the nodes die
    # unless the machine is slow, and an incomplete one is never used (step 3's is, then).
    restored = durable[0].restored_version
    assert restored in (3, 6) and durable[0].lost_steps >= 8 - 1 - restored, durable[0].summary()
    assert any(f"falling back to the durable checkpoint of step {restored}" in m for m in messages)
    _assert_identical(clean, summary)


@pytest.mark.slow
def test_randomized_drill_of_twenty_faults_ends_bit_identical(tmp_path, config_at):
    from stalwart.launch.faults import run_drill

    config = config_at(
        tmp_path,
        trainer={"max_steps": 60, "batch_size": 8},
        cluster={"num_spare_nodes": 3},
    )
    messages = []
    assert run_drill(config, num_faults=20, seed=3, log=messages.append), messages[-5:]
    assert any("20 faults" in m for m in messages)

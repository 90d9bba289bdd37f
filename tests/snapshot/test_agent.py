"""The in-trainer snapshot agent on a real Trainer: resume bit-identical, CheckFreq rule, failures."""

import sys
import threading
import uuid

import pytest
import torch

from stalwart.config import load_config
from stalwart.snapshot import shm
from stalwart.snapshot.agent import SnapshotAgent, SnapshotError, load_snapshot
from stalwart.snapshot.state import SnapshotCorruptError, flatten, unflatten, verify
from stalwart.trainer.loop import Trainer

TINY = [
    "model.depth=1",
    "model.context_length=16",
    "trainer.batch_size=4",
    "data.num_examples=200",
    "parallel.strategy=none",
]


class FakeManager:
    """What the node's SnapshotManager does for one rank, in process: two slots, verify on publish."""

    def __init__(self, job_id: str, gate: threading.Event | None = None, fail: str | None = None):
        self.job_id = job_id
        self.gate = gate  # acquire blocks until it is set (a slow manager)
        self.fail = fail
        self.regions: list[shm.Region] = []
        self.slot_versions = [None, None]
        self.committed: int | None = None
        self.published: dict[int, tuple[int, str, list[int]]] = {}
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def register(self, rank: int, total_bytes: int) -> list[str]:
        self.calls.append("register")
        for region in self.regions:
            region.close()
            region.unlink()
        self.regions = [
            shm.create_region(
                shm.region_name(self.job_id, f"r{rank}", f"s{slot}", total_bytes), total_bytes
            )
            for slot in range(2)
        ]
        return [region.name for region in self.regions]

    def acquire(self, rank: int, version: int) -> int:
        self.calls.append("acquire")
        if self.gate is not None:
            self.gate.wait()
        if self.fail == "acquire":
            raise RuntimeError("manager lost its memory")
        committed_slot = (
            self.slot_versions.index(self.committed) if self.committed is not None else 1
        )
        slot = 1 - committed_slot
        self.slot_versions[slot] = version
        return slot

    def publish(self, rank, version, slot, layout_json, checksums) -> None:
        self.calls.append("publish")
        if self.fail == "publish":
            raise RuntimeError("encoder crashed")
        verify(layout_json, self.regions[slot].buffer, checksums)
        with self.lock:
            self.published[version] = (slot, layout_json, list(checksums))
            self.committed = version

    def record(self, version: int) -> tuple[str, str, list[int]]:
        slot, layout_json, checksums = self.published[version]
        return self.regions[slot].name, layout_json, checksums

    def slot_for(self, rank: int, version: int) -> tuple[str, str, list[int]]:
        return self.record(version)


@pytest.fixture
def job_id():
    job = f"agenttest{uuid.uuid4().hex[:10]}"
    yield job
    shm.remove_regions(shm.job_prefix(job))


def make_trainer(tmp_path, device: str = "cpu") -> Trainer:
    return Trainer(load_config(overrides=[*TINY, f"trainer.device={device}"]), run_dir=tmp_path)


def cloned_state(trainer: Trainer):
    tensors, skeleton = flatten(trainer.state_dict())
    return [(name, tensor.detach().clone()) for name, tensor in tensors], skeleton


def assert_tensors_equal(left, right) -> None:
    assert [name for name, _ in left] == [name for name, _ in right]
    for (name, a), (_, b) in zip(left, right):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_resume_from_snapshot_continues_bit_identical(tmp_path, job_id, device):
    """CUDA: D2H copies on a side stream into the page-locked region; CPU: the thread copy."""
    snapshot_step, more_steps = 3, 4
    manager = FakeManager(job_id)
    first = make_trainer(tmp_path, device)
    agent = SnapshotAgent(first, manager, rank=0, every_steps=3, num_threads=2)
    for _ in range(snapshot_step):
        first.train_step()
    reference_at_snapshot = cloned_state(first)
    continuation_losses = [first.train_step()["loss"] for _ in range(more_steps)]
    agent.flush()
    final_first = cloned_state(first)

    # Steps 3 and 6 were snapshotted into alternating slots: version 3 is still intact.
    assert sorted(manager.published) == [3, 6]
    assert manager.published[3][0] != manager.published[6][0]
    assert agent.num_snapshots == 2
    assert agent.last_blocking_s > 0 and agent.total_blocking_s >= agent.last_blocking_s
    assert manager.calls.count("register") == 1

    region_name, layout_json, checksums = manager.record(snapshot_step)
    second = make_trainer(tmp_path, device)
    assert not torch.equal(
        dict(second.named_local_parameters())["blocks.0.attn.wq.weight"],
        dict(first.named_local_parameters())["blocks.0.attn.wq.weight"],
    )
    region = shm.attach_region(region_name)
    # A standby's trainer maps its optimizer-state memory ahead of the restore, which fills it.
    assert second.reserve_restore_memory() > 0
    reserved = {t.data_ptr() for pool in second._reserved_state.values() for t in pool}
    load_snapshot(second, region.buffer, layout_json, checksums)
    moments = [
        value
        for state in second.optimizer.state.values()
        for key, value in state.items()
        if key in ("exp_avg", "exp_avg_sq")
    ]
    assert moments and all(m.data_ptr() in reserved for m in moments)
    assert second._reserved_state == {}
    restored = cloned_state(second)
    assert restored[1] == reference_at_snapshot[1]  # JSON parts: step, schedule, sampler, RNG
    assert_tensors_equal(restored[0], reference_at_snapshot[0])

    resumed_losses = [second.train_step()["loss"] for _ in range(more_steps)]
    assert resumed_losses == continuation_losses
    final_second = cloned_state(second)
    assert final_second[1] == final_first[1]
    assert_tensors_equal(final_second[0], final_first[0])
    # Restoring into a trainer with optimizer state copies into its live tensors, verified in
    # the same pass (`Trainer.restore_targets`).
    assert any(name.startswith("optim/") for name in first.restore_targets())
    load_snapshot(first, region.buffer, layout_json, checksums)
    assert_tensors_equal(cloned_state(first)[0], reference_at_snapshot[0])
    agent.close()
    region.close()
    assert first.after_step_hooks == [] and first.before_optimizer_hooks == []


def test_optimizer_waits_for_the_copy_which_holds_step_n(tmp_path, job_id):
    """CheckFreq: step N+1 may not update parameters until snapshot N is copied."""
    delay_s = 0.3
    gate = threading.Event()
    manager = FakeManager(job_id, gate=gate)
    trainer = make_trainer(tmp_path)
    agent = SnapshotAgent(trainer, manager, rank=0, every_steps=1)

    def open_gate_later(step: int) -> None:
        if step == 2:  # runs right before the agent's own hook: the manager answers delay_s later
            threading.Timer(delay_s, gate.set).start()

    trainer.before_optimizer_hooks.insert(0, open_gate_later)
    trainer.train_step()
    at_step_one = cloned_state(trainer)
    trainer.train_step()  # its optimizer step had to wait for the slow acquire + copy of step 1
    assert agent.last_wait_s >= delay_s * 0.9
    assert agent.last_blocking_s >= agent.last_wait_s
    agent.flush()
    region_name, layout_json, _ = manager.record(1)
    snapshot = unflatten(layout_json, None, manager.regions[manager.published[1][0]].buffer)
    tensors, skeleton = flatten(snapshot)
    assert skeleton == at_step_one[1]
    assert_tensors_equal(tensors, at_step_one[0])
    metrics = agent.metrics()
    assert metrics["snapshot/num_snapshots"] == 2.0
    assert metrics["snapshot/last_bytes"] > 0
    agent.close()


def test_pause_waits_for_the_copy_and_resume_snapshots_again(tmp_path, job_id):
    gate = threading.Event()
    manager = FakeManager(job_id, gate=gate)
    trainer = make_trainer(tmp_path)
    agent = SnapshotAgent(trainer, manager, rank=0, every_steps=1)
    trainer.train_step()
    at_step_one = cloned_state(trainer)
    threading.Timer(0.2, gate.set).start()
    agent.pause()  # the copy of step 1 must finish before anything can change the parameters
    assert agent.last_wait_s >= 0.15
    agent.flush()
    assert sorted(manager.published) == [1]
    trainer.train_step()  # paused: no snapshot of step 2
    agent.flush()
    assert sorted(manager.published) == [1]
    agent.resume()
    agent.resume()  # idempotent: still one snapshot per step
    trainer.train_step()
    agent.wait_for_copy()
    agent.flush()
    assert sorted(manager.published) == [1, 3]
    assert agent.num_snapshots == 2
    slot = manager.published[1][0]
    assert slot != manager.published[3][0]  # double buffering kept step 1 intact meanwhile
    tensors, _ = flatten(unflatten(manager.published[1][1], None, manager.regions[slot].buffer))
    assert_tensors_equal(tensors, at_step_one[0])
    agent.close()


@pytest.mark.parametrize("fail", ["acquire", "publish"])
def test_background_failure_surfaces_on_the_next_wait(tmp_path, job_id, fail):
    manager = FakeManager(job_id, fail=fail)
    trainer = make_trainer(tmp_path)
    agent = SnapshotAgent(trainer, manager, rank=0, every_steps=1)
    trainer.train_step()
    message = "manager lost its memory" if fail == "acquire" else "encoder crashed"
    with pytest.raises(SnapshotError, match=rf"step 1 .*{message}"):
        trainer.train_step()
        agent.flush()
    assert agent.num_snapshots == 0
    agent.close()


def test_corrupted_slot_is_refused_on_load(tmp_path, job_id):
    manager = FakeManager(job_id)
    trainer = make_trainer(tmp_path)
    agent = SnapshotAgent(trainer, manager, rank=0, every_steps=1)
    trainer.train_step()
    agent.flush()
    slot, layout_json, checksums = manager.published[1]
    manager.regions[slot].array[-100] ^= 0xFF  # inside the last non-empty entry
    with pytest.raises(SnapshotCorruptError, match="fails its checksum"):
        load_snapshot(make_trainer(tmp_path), manager.regions[slot].buffer, layout_json, checksums)
    agent.close()


def test_bad_arguments_are_rejected(tmp_path, job_id):
    trainer = make_trainer(tmp_path)
    with pytest.raises(ValueError, match="every_steps"):
        SnapshotAgent(trainer, FakeManager(job_id), rank=0, every_steps=0)
    with pytest.raises(ValueError, match="num_threads"):
        SnapshotAgent(trainer, FakeManager(job_id), rank=0, every_steps=1, num_threads=0)


def test_ray_actor_manager(tmp_path, job_id):
    ray = pytest.importorskip("ray")
    ray.init(
        address="local",  # never join a cluster someone else started on this host
        num_cpus=1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    try:
        # This test module is not importable inside Ray workers: ship the class by value.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        manager = ray.remote(FakeManager).remote(job_id)
        trainer = make_trainer(tmp_path)
        agent = SnapshotAgent(trainer, manager, rank=0, every_steps=2)
        for _ in range(2):
            trainer.train_step()
        expected = cloned_state(trainer)
        agent.flush()
        region_name, layout_json, checksums = ray.get(manager.record.remote(2))
        region = shm.attach_region(region_name)  # owned by the actor's process
        fresh = make_trainer(tmp_path)
        load_snapshot(fresh, region.buffer, layout_json, checksums)
        restored = cloned_state(fresh)
        assert restored[1] == expected[1]
        assert_tensors_equal(restored[0], expected[0])
        # The restore path of a recovery reads the slot with pread into the trainer's tensors:
        # a fresh trainer (its AdamW moments allocated for the restore) and a trained one.
        from stalwart.snapshot.restore import load_from_manager

        trainer.train_step()
        for target in (make_trainer(tmp_path), trainer):
            load_from_manager(target, manager, 0, 2)
            restored = cloned_state(target)
            assert restored[1] == expected[1]
            assert_tensors_equal(restored[0], expected[0])
        agent.close()
        region.close()
    finally:
        ray.shutdown()


def test_set_manager_names_the_first_version_sure_to_reach_the_replacement(tmp_path, job_id):
    """Every version captured after `set_manager` goes to the new manager, and the returned
    floor is exactly the next one; the controller abandons older versions elsewhere."""
    old, new = FakeManager(job_id + "a"), FakeManager(job_id + "b")
    trainer = make_trainer(tmp_path)
    agent = SnapshotAgent(trainer, old, rank=0, every_steps=2)
    for _ in range(3):
        trainer.train_step()  # version 2 is captured, version 3 is not (every_steps 2)
    agent.flush()
    assert agent.set_manager(new) == 3
    trainer.train_step()
    agent.flush()
    assert list(old.published) == [2] and list(new.published) == [4]
    assert agent.set_manager(old) == 5
    agent.close()
    shm.remove_regions(shm.job_prefix(job_id + "a"))
    shm.remove_regions(shm.job_prefix(job_id + "b"))


def test_reserved_restore_memory_is_released_when_no_restore_comes(tmp_path):
    """A standby that starts from scratch instead trains exactly like a fresh trainer."""
    plain, standby = make_trainer(tmp_path / "a"), make_trainer(tmp_path / "b")
    asked = []
    assert standby.reserve_restore_memory(fits=lambda n: asked.append(n) or False) == 0
    assert standby._reserved_state == {}  # no room: nothing reserved
    parameters = sum(p.nbytes for p in standby.model.parameters())
    assert asked == [2 * parameters]  # AdamW's two moments per parameter
    assert standby.reserve_restore_memory() == 2 * parameters
    losses = [(plain.train_step()["loss"], standby.train_step()["loss"]) for _ in range(3)]
    assert standby._reserved_state == {}
    assert all(a == b for a, b in losses)
    assert_tensors_equal(cloned_state(standby)[0], cloned_state(plain)[0])

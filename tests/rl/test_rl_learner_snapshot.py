"""The RL learner snapshots through the training machinery: a SnapshotAgent hooked into it
copies its state into a SnapshotManager, and a learner rebuilt from the manager's memory
continues bit for bit. In process (plain manager object), no Ray."""

import time

import pytest
import torch
from test_rl_pipeline import tiny_config

from stalwart.snapshot import shm
from stalwart.snapshot.agent import SnapshotAgent, load_snapshot
from stalwart.snapshot.manager import SnapshotManager
from stalwart.trainer.optim import build_optimizer
from stalwart.trainer.rl.learner import RLLearner
from stalwart.trainer.rl.rollout import RolloutWorker, build_policy, train_problems


def _groups(config, learner, seed):
    worker = RolloutWorker(config)
    worker.load_weights(learner.weights())
    problems = train_problems(config)[4 * seed : 4 * seed + 4]
    tasks = [
        {"problem_id": i, "prompt": p.prompt, "answer": p.answer} for i, p in enumerate(problems)
    ]
    groups = worker.rollout(tasks, seed=seed)
    worker.close()
    return groups


def test_materialised_optimizer_state_steps_exactly_like_a_fresh_optimizer():
    config = tiny_config()
    learner = RLLearner(config)
    fresh_model = build_policy(config)
    fresh_optimizer = build_optimizer(fresh_model, config.optim)
    for group in fresh_optimizer.param_groups:
        group["lr"] = learner.optimizer.param_groups[0]["lr"]
    # Materialising left the parameters alone and the moments at zero.
    for (name, a), b in zip(learner.model.named_parameters(), fresh_model.parameters()):
        assert torch.equal(a, b), name
    assert all(
        torch.count_nonzero(value) == 0
        for entries in learner.optimizer.state.values()
        for value in entries.values()
    )
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):
        for a, b in zip(learner.model.parameters(), fresh_model.parameters()):
            gradient = torch.randn(a.shape, generator=generator)
            a.grad, b.grad = gradient.clone(), gradient.clone()
        learner.optimizer.step()
        fresh_optimizer.step()
    for (name, a), b in zip(learner.model.named_parameters(), fresh_model.parameters()):
        assert torch.equal(a, b), name


def test_learner_restored_from_manager_memory_continues_bit_identically(tmp_path):
    config = tiny_config()
    job_id = "rltest-agent"
    manager = SnapshotManager(
        job_id=job_id,
        position=0,
        positions=[0],
        ranks=[0],
        group_size=4,
        parity=1,
        run_dir=str(tmp_path),
        wait_timeout_s=30,
    )
    try:
        learner = RLLearner(config)
        learner.warmup(5)
        agent = SnapshotAgent(learner, manager, rank=0, every_steps=1)
        agent.snapshot(learner.version)  # version 0, before any RL step
        batches = [_groups(config, learner, seed) for seed in range(3)]
        learner.step(batches[0])
        learner.step(batches[1])  # snapshots versions 1 and 2 through the hooks
        agent.flush()
        deadline = time.monotonic() + 10
        while manager.committed != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert manager.committed == 2
        assert agent.num_snapshots == 3 and agent.total_blocking_s >= 0

        # A second learner (a replacement) loads version 2 from the manager's shared memory.
        region_name, layout_json, checksums = manager.slot_for(0, 2)
        twin = RLLearner(config)
        region = shm.attach_region(region_name)
        try:
            load_snapshot(twin, region.buffer, layout_json, checksums)
        finally:
            region.close()
        assert twin.version == learner.version == 2
        assert twin.num_sft_steps == 5
        learner.step(batches[2])
        twin.step(batches[2])
        for (name, a), b in zip(
            learner.model.state_dict().items(), twin.model.state_dict().values()
        ):
            assert torch.equal(a, b), name
        for a, b in zip(learner.optimizer.state.values(), twin.optimizer.state.values()):
            assert all(torch.equal(a[key], b[key]) for key in a)
        agent.close()
    finally:
        manager.shutdown()
        shm.remove_regions(f"stalwart-{job_id}-")


def test_corrupt_snapshot_is_refused_on_restore(tmp_path):
    from stalwart.snapshot.state import SnapshotCorruptError

    config = tiny_config()
    manager = SnapshotManager(
        job_id="rltest-corrupt",
        position=0,
        positions=[0],
        ranks=[0],
        group_size=4,
        parity=1,
        run_dir=str(tmp_path),
        wait_timeout_s=30,
    )
    try:
        learner = RLLearner(config)
        with SnapshotAgent(learner, manager, rank=0, every_steps=1) as agent:
            agent.snapshot(0)
        deadline = time.monotonic() + 10
        while manager.committed != 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        manager.corrupt(0, 0, offset=100)
        region_name, layout_json, checksums = manager.slot_for(0, 0)
        region = shm.attach_region(region_name)
        try:
            with pytest.raises(SnapshotCorruptError):
                load_snapshot(RLLearner(config), region.buffer, layout_json, checksums)
        finally:
            region.close()
    finally:
        manager.shutdown()
        shm.remove_regions("stalwart-rltest-corrupt-")

"""The async pipeline: staleness gate, prompt pool, learner state, and Ray runs with k = 0
(exactly on-policy), k > 0 (bounded staleness) and killed learner / rollout actors."""

import os

import numpy as np
import pytest
import ray
import torch

from stalwart.config import config_from_dict
from stalwart.data.arithmetic import Problem
from stalwart.trainer.rl.learner import RLLearner
from stalwart.trainer.rl.pipeline import PromptPool, StalenessGate
from stalwart.trainer.rl.rollout import RolloutWorker, train_problems


def tiny_config(**rl):
    steps = rl.pop("steps", 6)
    return config_from_dict(
        {
            "model": {"depth": 1, "context_length": 32},
            "data": {"max_operand": 9, "num_operands": 3, "ops": "+", "num_examples": 400},
            "optim": {"lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.0},
            "trainer": {"max_steps": steps},
            "rl": {
                "max_new_tokens": 5,
                "prompts_per_step": 4,
                "num_samples": 4,
                "rollout_chunk_prompts": 2,
                "eval_prompts": 16,
                "eval_every": 3,
                "warmup_sft_steps": 20,
                **rl,
            },
        }
    )


# ---------------------------------------------------------------------------------------------
# Pure bookkeeping


def test_gate_with_k0_only_generates_for_the_current_version():
    gate = StalenessGate(max_staleness=0, groups_per_step=4, num_steps=10)
    assert gate.chunk_size(next_step=0, pending_groups=0, published_version=0, limit=3) == 3
    assert gate.chunk_size(0, 3, 0, 3) == 1  # a chunk never straddles two batches
    assert gate.chunk_size(0, 4, 0, 3) == 0  # the batch for step 0 is complete: wait
    # While step 3 runs (next_step 4) the newest weights are version 3: nothing may start.
    assert gate.chunk_size(4, 0, 3, 3) == 0
    assert gate.chunk_size(10, 0, 10, 3) == 0  # no more steps


def test_gate_with_k2_runs_ahead_by_at_most_two_versions():
    gate = StalenessGate(max_staleness=2, groups_per_step=4, num_steps=100)
    assert gate.chunk_size(4, 0, 3, 4) == 4  # consumed by step 4: staleness 1
    assert gate.chunk_size(4, 4, 3, 4) == 4  # step 5: staleness 2
    assert gate.chunk_size(4, 8, 3, 4) == 0  # step 6 would be 3 versions stale


def test_prompt_pool_retires_prompts_it_solves():
    problems = [Problem(f"{i}+0=", str(i)) for i in range(6)]
    pool = PromptPool(problems, seed=0, retire_pass_rate=0.9, min_samples_to_retire=4)
    first = pool.take(3)
    assert len({t["problem_id"] for t in first}) == 3
    solved = first[0]["problem_id"]
    pool.record(solved, np.ones(4))
    pool.record(first[1]["problem_id"], np.array([1, 1, 1, 0]))
    assert pool.retired == {solved}
    drawn = [t["problem_id"] for t in pool.take(60)]
    assert solved not in drawn and set(drawn) == set(range(6)) - {solved}


def test_learner_state_round_trip_continues_bit_identically():
    config = tiny_config()
    learner = RLLearner(config)
    learner.warmup(5)
    worker = RolloutWorker(config)
    worker.load_weights(learner.weights())
    tasks = [
        {"problem_id": i, "prompt": p.prompt, "answer": p.answer}
        for i, p in enumerate(train_problems(config)[:4])
    ]
    groups = worker.rollout(tasks, seed=0)
    learner.step(groups)
    saved = learner.state()
    twin = RLLearner(config, saved)
    assert twin.version == learner.version == 1
    learner.step(groups)
    twin.step(groups)
    for (name, a), b in zip(learner.model.state_dict().items(), twin.model.state_dict().values()):
        assert torch.equal(a, b), name
    worker.close()


# ---------------------------------------------------------------------------------------------
# On Ray


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
    )
    yield
    ray.shutdown()


def quiet(message):
    pass


def test_k0_is_exactly_on_policy(ray_instance):
    from stalwart.launch.rl_driver import run_pipeline

    record = run_pipeline(
        tiny_config(max_staleness=0, num_rollout_workers=2), evaluate=False, log=quiet
    )
    assert record["num_learner_steps"] == 6
    assert [step - version for step, version in record["staleness"]] == [0] * 24
    for metrics in record["steps"]:
        # Same weights generated and scored the batch: the ratio is 1 up to rounding.
        if "ratio_mean" in metrics:
            assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
            assert metrics["kl_generator_learner"] < 1e-6


def test_k2_bounds_staleness_and_overlaps_generation(ray_instance):
    from stalwart.launch.rl_driver import run_pipeline

    record = run_pipeline(
        tiny_config(max_staleness=2, steps=10, recipe="scalerl"), evaluate=False, log=quiet
    )
    staleness = [step - version for step, version in record["staleness"]]
    assert len(staleness) == 40
    assert max(staleness) <= 2
    assert max(staleness) >= 1  # generation did run ahead of the learner
    assert record["max_staleness_seen"] == max(staleness)


def test_sigkilled_learner_recovers_from_manager_memory_bit_identically(ray_instance):
    from stalwart.launch.rl_driver import run_pipeline
    from stalwart.snapshot import shm

    config = tiny_config(max_staleness=0)
    config.cluster.standby_workers = True  # a learner process waits, model built
    clean = run_pipeline(config, evaluate=False, log=quiet)
    faulty = run_pipeline(config, kill_learner_at_steps=(3,), evaluate=False, log=print)
    (recovery,) = faulty["recoveries"]
    print("learner recovery:", recovery)
    assert recovery["kind"] == "learner" and recovery["source"] == "memory"
    assert recovery["failure"] == "process" and recovery["ranks"] == [0]
    assert recovery["standby_ranks"] == 1  # the standby took over
    # The process was SIGKILLed by pid and another one took over.
    (dead_pid,) = recovery["killed_pids"]
    assert recovery["new_pids"] and dead_pid not in recovery["new_pids"]
    with pytest.raises(ProcessLookupError):
        os.kill(dead_pid, 0)
    # Snapshots are taken every step: the manager held version 3 (or 2, if the kill beat the
    # publish of 3), and the driver handed the replacement the batches from there on.
    assert recovery["step"] == 3 and recovery["restored_version"] in (2, 3)
    assert recovery["replayed_steps"] == 4 - recovery["restored_version"]
    assert 0 < recovery["restore_s"] < recovery["restart_s"] < recovery["caught_up_s"]
    assert recovery["detect_s"] > 0 and recovery["total_s"] > recovery["caught_up_s"]
    assert faulty["num_learner_steps"] == 6
    assert [int(m["version"]) for m in faulty["steps"]] == [1, 2, 3, 4, 5, 6]
    assert faulty["snapshot_committed_version"] is not None
    assert faulty["final_weights_xxh64"] == clean["final_weights_xxh64"]
    assert not shm.list_regions(f"stalwart-{faulty['job_id']}")  # managers' memory released


def test_learner_without_snapshots_fails_clearly(ray_instance):
    from stalwart.launch.rl_driver import run_pipeline

    config = tiny_config(max_staleness=0)
    config.snapshot.enabled = False
    with pytest.raises(RuntimeError, match="snapshot.enabled is false"):
        run_pipeline(config, kill_learner_at_steps=(2,), evaluate=False, log=quiet)


def test_learner_gives_up_after_max_recoveries(ray_instance):
    from stalwart.launch.controller import JobFailed
    from stalwart.launch.rl_driver import run_pipeline

    config = tiny_config(max_staleness=0)
    config.cluster.max_recoveries = 0
    with pytest.raises(JobFailed, match="gave up after 0 recoveries"):
        run_pipeline(config, kill_learner_at_steps=(2,), evaluate=False, log=quiet)


def test_killed_rollout_actor_is_replaced_and_its_prompts_requeued(ray_instance):
    from stalwart.launch.rl_driver import run_pipeline

    record = run_pipeline(
        tiny_config(max_staleness=1, num_rollout_workers=2, steps=6),
        kill_rollout_at_steps=(2,),
        evaluate=True,
        log=quiet,
    )
    (recovery,) = record["recoveries"]
    assert recovery["kind"] == "rollout" and recovery["requeued"]
    # The lost prompts were generated again and trained on.
    assert set(recovery["requeued"]) <= set(record["consumed_problem_ids"])
    assert record["num_learner_steps"] == 6
    assert max(step - version for step, version in record["staleness"]) <= 1
    assert [e["version"] for e in record["evals"]] == [0, 3, 6]

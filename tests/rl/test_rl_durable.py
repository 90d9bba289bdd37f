"""The RL learner's durable tier: `stalwart rl resume` after a stop, the fallback when the
learner's node (learner and snapshot manager) is lost, and a snapshot manager that dies
alone. With ``rl.max_staleness: 0`` the pipeline is deterministic, so every path must end
on the same weights as an uninterrupted run."""

import json

import numpy as np
import pytest

from stalwart.config import config_from_dict
from stalwart.data.arithmetic import Problem
from stalwart.trainer.rl.pipeline import PromptPool

STEPS = 8


def config_for(run_dir, *, steps=STEPS, faults=(), **rl):
    return config_from_dict(
        {
            "run_dir": str(run_dir),
            "model": {"depth": 1, "context_length": 32},
            "data": {"max_operand": 9, "num_operands": 3, "ops": "+", "num_examples": 400},
            "optim": {"lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.0},
            "trainer": {"max_steps": steps},
            "snapshot": {"every_steps": 1, "persist_every": 2, "keep": 5},
            "faults": {"events": list(faults)},
            "rl": {
                "max_staleness": 0,
                "max_new_tokens": 5,
                "prompts_per_step": 4,
                "num_samples": 4,
                "rollout_chunk_prompts": 2,
                "eval_prompts": 16,
                "eval_every": 3,
                "warmup_sft_steps": 20,
                "no_positive_resampling": True,
                "positive_pass_rate": 0.5,
                **rl,
            },
        }
    )


def quiet(message):
    pass


def test_prompt_pool_state_round_trips_through_json():
    problems = [Problem(f"{i}+0=", str(i)) for i in range(10)]
    pool = PromptPool(problems, seed=3, retire_pass_rate=0.5, min_samples_to_retire=2)
    for task in pool.take(7):
        pool.record(task["problem_id"], np.array([1.0, task["problem_id"] % 2]))
    assert pool.retired
    copy = PromptPool(problems, seed=3, retire_pass_rate=0.5, min_samples_to_retire=2)
    copy.load_state_dict(json.loads(json.dumps(pool.state_dict())))
    assert copy.retired == pool.retired and copy.num_seen == pool.num_seen
    assert [t["problem_id"] for t in copy.take(25)] == [t["problem_id"] for t in pool.take(25)]
    with pytest.raises(ValueError, match="data.num_examples"):
        PromptPool(problems[:4], seed=3).load_state_dict(pool.state_dict())


@pytest.fixture(scope="module")
def cluster():
    from stalwart.launch.cluster import connect

    handle = connect(num_nodes=2, cpus_per_node=2)
    yield handle
    handle.shutdown()


def test_held_out_evaluation_skips_weights_lost_with_their_node(cluster, tmp_path, capsys):
    """Evaluation runs after the loop from kept weight references; one whose object died with
    its owner (a lost node's process) is skipped and said so, the rest are scored."""
    import ray

    from stalwart.launch.rl_driver import RolloutActor, evaluate_checkpoints
    from stalwart.trainer.rl.learner import RLLearner

    config = config_for(tmp_path)
    weights = RLLearner(config).weights().as_tuple()

    @ray.remote(num_cpus=0)
    class Owner:
        def put(self, value):
            return [ray.put(value)]  # in a list: the reference stays this actor's

    owner = Owner.remote()
    (lost,) = ray.get(owner.put.remote(weights))
    ray.kill(owner)
    actor = RolloutActor.remote(config.to_dict(), 0)
    try:
        results = evaluate_checkpoints(config, [actor], {0: ray.put(weights), 3: lost})
    finally:
        ray.kill(actor)
    assert [result["version"] for result in results] == [0]
    assert "version 3 skipped: its weights were lost" in capsys.readouterr().out


@pytest.fixture(scope="module")
def clean(cluster, tmp_path_factory):
    from stalwart.launch.rl_driver import run_pipeline

    return run_pipeline(config_for(tmp_path_factory.mktemp("clean")), evaluate=False, log=quiet)


def test_fault_injection_is_checked_before_the_run(cluster, tmp_path):
    from stalwart.launch.rl_driver import run_pipeline

    hang = [{"kind": "hang_worker", "step": 2}]
    with pytest.raises(ValueError, match="hang_worker.*cannot be injected"):
        run_pipeline(config_for(tmp_path, faults=hang), evaluate=False, log=quiet)
    node = [{"kind": "kill_node", "step": 2}]
    with pytest.raises(ValueError, match="kill_node removes a node of an embedded cluster"):
        run_pipeline(config_for(tmp_path, faults=node), evaluate=False, log=quiet)


def test_stopped_run_resumes_from_its_durable_checkpoint_bit_identically(
    cluster, clean, tmp_path, capsys
):
    from stalwart.config import save_config
    from stalwart.launch.cli import main
    from stalwart.launch.rl_driver import run_pipeline
    from stalwart.snapshot.persist import list_checkpoints

    config = config_for(tmp_path, steps=4)
    save_config(config, tmp_path)
    first = run_pipeline(config, evaluate=False, log=quiet)
    assert first["num_learner_steps"] == 4
    assert list_checkpoints(tmp_path) == [0, 2, 4]
    assert sorted(p.name for p in (tmp_path / "rl_state").iterdir()) == [
        "step_0.json",
        "step_2.json",
        "step_4.json",
    ]
    # The whole job is gone; a longer run continues from step 4 with the saved config.
    assert main(["rl", "resume", str(tmp_path), f"trainer.max_steps={STEPS}"]) == 0
    assert "from the durable checkpoint of step 4" in capsys.readouterr().out
    summary = json.loads((tmp_path / "rl_summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["num_learner_steps"] == STEPS - 4
    assert summary["final_weights_xxh64"] == clean["final_weights_xxh64"]
    metrics = [json.loads(line) for line in open(tmp_path / "rl_metrics.jsonl")]
    assert [m["step"] for m in metrics] == list(range(4, STEPS))

    # A corrupt newest checkpoint is detected (checksums) and the next older one used: here
    # the job stopped before step 8's checkpoint, and step 6's is corrupt.
    import shutil

    from stalwart.snapshot.persist import checkpoint_dir

    shutil.rmtree(checkpoint_dir(tmp_path, STEPS))
    (shard,) = checkpoint_dir(tmp_path, STEPS - 2).glob("*.safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["rl", "resume", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"durable checkpoint of step {STEPS - 2} is unusable" in out, out
    summary = json.loads((tmp_path / "rl_summary.json").read_text())
    assert summary["resumed_from"] == STEPS - 4 and summary["num_learner_steps"] == 4
    assert summary["final_weights_xxh64"] == clean["final_weights_xxh64"]

    # Without the pipeline state of the newer checkpoints, the resume starts from step 2.
    for step in (4, 6, STEPS):
        (tmp_path / "rl_state" / f"step_{step}.json").unlink()
    from stalwart.launch.rl_driver import resume_step_of

    assert resume_step_of(tmp_path) == 2
    (tmp_path / "rl_state" / "step_2.json").unlink()
    (tmp_path / "rl_state" / "step_0.json").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="snapshot.persist_every"):
        resume_step_of(tmp_path)


def test_resume_refuses_a_directory_without_rl_state(tmp_path):
    from stalwart.launch.job import resume_job
    from stalwart.launch.rl_driver import resume_step_of

    with pytest.raises(FileNotFoundError, match="snapshot.persist_every"):
        resume_step_of(tmp_path)
    (tmp_path / "config.yaml").write_text("name: x\n")
    (tmp_path / "rl_state").mkdir()
    with pytest.raises(ValueError, match="stalwart rl resume"):
        resume_job(tmp_path)


def test_resume_of_a_finished_run_asks_for_more_steps(tmp_path):
    from stalwart.config import save_config
    from stalwart.launch.cli import main

    save_config(config_for(tmp_path, steps=4), tmp_path)
    (tmp_path / "checkpoints" / "step_4").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_4" / "manifest.json").write_text("{}")
    (tmp_path / "rl_state").mkdir()
    (tmp_path / "rl_state" / "step_4.json").write_text("{}")
    with pytest.raises(ValueError, match="trainer.max_steps=8"):
        main(["rl", "resume", str(tmp_path)])


def test_manager_killed_alone_is_replaced_and_refilled(cluster, clean, tmp_path):
    from stalwart.launch.rl_driver import run_pipeline

    # The replacement manager's process takes a few steps to start: the learner dies well after.
    faults = [{"kind": "kill_manager", "step": 1}, {"kind": "kill_worker", "step": 7}]
    record = run_pipeline(config_for(tmp_path, faults=faults), evaluate=False, log=print)
    (restart,) = record["manager_restarts"]
    assert restart["position"] == 0
    (learner,) = record["recoveries"]
    # The learner died after the new manager had committed versions: restored from its memory.
    assert learner["kind"] == "learner" and learner["source"] == "memory"
    assert learner["restored_version"] >= 3 and learner["step"] == 7
    assert record["num_learner_steps"] == STEPS
    assert record["final_weights_xxh64"] == clean["final_weights_xxh64"]


def test_learner_node_loss_falls_back_to_the_durable_tier(cluster, clean, tmp_path):
    from stalwart.launch.rl_driver import run_pipeline

    # cluster.num_nodes is 1: the fixture's second node is the spare the learner moves to.
    config = config_for(tmp_path, faults=[{"kind": "kill_node", "step": 5}])
    record = run_pipeline(config, evaluate=True, log=print, cluster=cluster)
    recoveries = [r for r in record["recoveries"] if r["kind"] == "learner"]
    (recovery,) = recoveries
    print("learner node loss:", recovery)
    assert recovery["source"] == "durable"
    # persist_every 2: the newest complete checkpoint is step 4 (or 2 if 4's write was cut).
    assert recovery["restored_version"] in (2, 4)
    assert recovery["steps_lost"] == 5 - recovery["restored_version"]
    assert recovery["caught_up_s"] > 0
    assert [m["step"] for m in record["steps"]] == list(range(STEPS))
    assert record["final_weights_xxh64"] == clean["final_weights_xxh64"]
    # Held-out evaluation ran for every version whose weights survived the node.
    assert record["evals"] and record["evals"][-1]["version"] == STEPS
    assert len(cluster.alive_nodes()) == 1

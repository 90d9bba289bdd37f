"""End to end on CPU: supervised warm-up, then ScaleRL RL raises held-out pass@1 by at least 15
points, while the learner is SIGKILLed mid-run and recovers from its snapshot manager's memory."""

from pathlib import Path

import pytest
import ray

from stalwart.config import load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rl_arithmetic.yaml"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scalerl_raises_held_out_pass_at_1_despite_a_killed_learner(tmp_path):
    from stalwart.launch.rl_driver import run_pipeline, write_record

    config = load_config(EXAMPLE, [f"run_dir={tmp_path}"])
    assert config.rl.recipe == "scalerl" and config.rl.loss == "cispo"
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
    )
    try:
        record = run_pipeline(config, kill_learner_at_steps=(120,), log=print)
    finally:
        ray.shutdown()
    write_record(record, tmp_path)
    first, last = record["evals"][0], record["evals"][-1]
    print([(e["version"], round(e["pass1"], 3)) for e in record["evals"]])
    assert first["version"] == 0 and last["version"] == config.trainer.max_steps
    assert first["pass1"] > 0.1  # the supervised start already solves some problems
    assert last["pass1"] - first["pass1"] >= 0.15
    (recovery,) = record["recoveries"]
    print("learner recovery:", recovery)
    assert recovery["kind"] == "learner" and recovery["source"] == "memory"
    assert recovery["restored_version"] <= recovery["step"] <= 120
    assert record["max_staleness_seen"] <= config.rl.max_staleness
    assert (tmp_path / "rl_evals.jsonl").is_file()

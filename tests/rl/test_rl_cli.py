"""`stalwart rl`, `stalwart rl analyze` and `stalwart rl fit` entry points."""

import argparse
import json

import numpy as np
import pytest
import yaml

from stalwart.launch.rl_driver import add_rl_arguments, run_rl
from stalwart.trainer.rl.analysis import (
    add_analyze_arguments,
    add_fit_arguments,
    run_analyze,
    run_fit,
    sigmoid_curve,
)


def parse(add, argv):
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def write_evals(path, versions, pass1, counts):
    with open(path, "w") as handle:
        for version, value, correct in zip(versions, pass1, counts):
            record = {
                "version": version,
                "pass1": value,
                "num_samples": 4,
                "correct_counts": correct,
                "token_entropy": 0.5,
                "answer_entropy": 0.7,
            }
            handle.write(json.dumps(record) + "\n")


def test_fit_recovers_the_curve_and_writes_a_png(tmp_path, capsys):
    versions = list(range(0, 420, 20))
    pass1 = [float(v) for v in sigmoid_curve(np.maximum(versions, 1), 0.2, 0.8, 2.0, 120.0)]
    evals = tmp_path / "rl_evals.jsonl"
    write_evals(evals, versions, pass1, [[0]] * len(versions))
    png = tmp_path / "fit.png"
    assert run_fit(parse(add_fit_arguments, [str(evals), "--png", str(png), "--skip", "20"])) == 0
    fit = json.loads(capsys.readouterr().out.splitlines()[0])
    assert fit["a"] == pytest.approx(0.8, abs=0.01)
    assert fit["b"] == pytest.approx(2.0, rel=0.1)
    assert png.stat().st_size > 1000


def test_analyze_prints_pass_at_k_and_support(tmp_path, capsys):
    evals = tmp_path / "rl_evals.jsonl"
    write_evals(evals, [0, 10], [0.25, 0.5], [[1, 0, 4, 2], [4, 1, 0, 4]])
    assert run_analyze(parse(add_analyze_arguments, [str(evals)])) == 0
    out = capsys.readouterr().out.splitlines()
    support = json.loads(out[-1])
    assert (support["preserved"], support["expanded"], support["shrunk"]) == (2, 1, 1)


def write_run(tmp_path, **sections) -> str:
    """A tiny RL run YAML (1-layer GPT, two-operand sums) with `sections` merged in."""
    config = {
        "name": "tiny",
        "run_dir": str(tmp_path / "run"),
        "model": {"depth": 1, "context_length": 32},
        "data": {"max_operand": 9, "num_operands": 2, "ops": "+", "num_examples": 90},
        "rl": {
            "max_new_tokens": 4,
            "prompts_per_step": 2,
            "num_samples": 2,
            "rollout_chunk_prompts": 1,
            "eval_prompts": 4,
        },
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.timeout(300)
def test_rl_command_runs_a_tiny_config(tmp_path, capsys):
    # The learner asks for 3 CPUs: the embedded Ray must offer them (or the rank never starts).
    path = write_run(
        tmp_path,
        trainer={"max_steps": 3},
        cluster={"cpus_per_worker": 3},
        rl={"recipe": "scalerl", "eval_every": 3},
    )
    args = parse(add_rl_arguments, [path, "rl.max_staleness=1"])
    assert run_rl(args) == 0
    assert "held-out pass@1" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "rl_summary.json").read_text())
    assert summary["num_learner_steps"] == 3 and summary["max_staleness_seen"] <= 1
    assert len((tmp_path / "run" / "rl_evals.jsonl").read_text().splitlines()) == 2


@pytest.mark.timeout(300)
def test_rl_command_on_simulated_nodes_survives_the_learner_node(tmp_path, capsys):
    """A spare node gives `stalwart rl` an embedded multi-node cluster: removing the learner's
    node moves it to the spare, from the durable tier (one node: no parity)."""
    path = write_run(
        tmp_path,
        trainer={"max_steps": 5},
        cluster={"num_nodes": 1, "num_spare_nodes": 1},
        snapshot={"persist_every": 2},
        faults={"events": [{"kind": "kill_node", "step": 3}]},
        rl={"eval_every": 5},
    )
    assert run_rl(parse(add_rl_arguments, [path])) == 0
    assert "falling back to the durable checkpoint" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "rl_summary.json").read_text())
    # (a rollout actor that lived on the removed node may be replaced too)
    (recovery,) = [r for r in summary["recoveries"] if r["kind"] == "learner"]
    # checkpoint 2, or 0 if a slow machine had not finished writing 2 when the node died
    assert recovery["source"] == "durable" and recovery["restored_version"] in (0, 2)
    assert summary["final_version"] == 5

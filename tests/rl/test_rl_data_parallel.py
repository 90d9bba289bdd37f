"""A data-parallel RL learner: each rank trains on its share of the groups, with the loss
divided by the whole batch's count, and the summed gradients equal the whole batch's."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from test_rl_learner_snapshot import _groups
from test_rl_pipeline import tiny_config

from stalwart.trainer.rl.learner import RLLearner
from stalwart.trainer.rl.losses import (
    AGGREGATIONS,
    LossSettings,
    aggregate,
    aggregation_denominator,
    policy_loss,
)


def _batch(seed=0, num_groups=5, samples=3, width=6):
    generator = torch.Generator().manual_seed(seed)
    rows = num_groups * samples
    group_ids = torch.arange(num_groups).repeat_interleave(samples)
    mask = torch.rand(rows, width, generator=generator) < 0.7
    mask[:, 0] = True  # every sample has a token
    return {
        "per_token": torch.randn(rows, width, generator=generator),
        "logprobs": -torch.rand(rows, width, generator=generator),
        "old": -torch.rand(rows, width, generator=generator),
        "advantages": torch.randn(rows, generator=generator),
        "mask": mask,
        "group_ids": group_ids,
    }


def _denominator(mode, batch):
    return aggregation_denominator(batch["mask"], batch["group_ids"], mode)


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_shares_of_the_batch_sum_to_the_whole(mode, world_size):
    batch = _batch()
    whole = aggregate(batch["per_token"], batch["mask"], batch["group_ids"], mode)
    denominator = _denominator(mode, batch)
    total = 0.0
    for rank in range(world_size):
        rows = batch["group_ids"] % world_size == rank
        total += aggregate(
            batch["per_token"][rows],
            batch["mask"][rows],
            batch["group_ids"][rows],
            mode,
            denominator,
        )
    torch.testing.assert_close(total, whole, rtol=1e-6, atol=1e-7)
    # Without the whole batch's denominator a share is normalised by itself: not the same sum.
    own = sum(
        aggregate(
            batch["per_token"][batch["group_ids"] % world_size == r],
            batch["mask"][batch["group_ids"] % world_size == r],
            batch["group_ids"][batch["group_ids"] % world_size == r],
            mode,
        )
        for r in range(world_size)
    )
    assert not torch.allclose(own, whole)


@pytest.mark.parametrize("loss", ["grpo", "dapo", "cispo"])
@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_gradients_of_the_shares_sum_to_the_whole_batch_gradient(loss, mode):
    batch = _batch(seed=1)
    settings = LossSettings(name=loss, aggregation=mode)

    def gradient(rows, denominator):
        logprobs = batch["logprobs"].clone().requires_grad_(True)
        output = policy_loss(
            logprobs[rows],
            batch["old"][rows],
            batch["advantages"][rows],
            batch["mask"][rows],
            batch["group_ids"][rows],
            settings,
            denominator,
        )
        output.loss.backward()
        return logprobs.grad

    everything = torch.ones_like(batch["group_ids"], dtype=torch.bool)
    whole = gradient(everything, None)
    denominator = _denominator(mode, batch)
    summed = sum(gradient(batch["group_ids"] % 2 == rank, denominator) for rank in range(2))
    torch.testing.assert_close(summed, whole, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Two real ranks (gloo, two processes) against one


RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[5])
    from test_rl_data_parallel import run_steps
    from test_rl_pipeline import tiny_config
    from stalwart.trainer.parallel import exit_process

    rank, rendezvous, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    overrides = json.loads(sys.argv[4])
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2
    )
    parameters, metrics = run_steps(tiny_config(**overrides), rank=rank, world_size=2)
    np.savez(out, **parameters)
    with open(out + ".json", "w") as handle:
        json.dump(metrics, handle)
    dist.destroy_process_group()
    exit_process(0)
    """
)


def run_steps(config, rank=0, world_size=1):
    """Warm up, then two RL steps on batches generated from the warmed-up weights (generated
    first: sampling from weights that differ in the last bit could pick other tokens)."""
    learner = RLLearner(config, rank=rank, world_size=world_size)
    learner.warmup(5)
    batches = [_groups(config, learner, seed) for seed in range(2)]
    metrics = [learner.step(groups) for groups in batches]
    parameters = {name: p.detach().numpy().copy() for name, p in learner.model.named_parameters()}
    return parameters, metrics


@pytest.mark.parametrize(
    "overrides",
    [
        {"loss": "cispo", "aggregation": "prompt", "advantage_norm": "batch"},
        {"loss": "grpo"},
    ],
)
def test_two_rank_learner_matches_one_rank(tmp_path, overrides):
    here = os.path.dirname(__file__)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(rank),
                str(tmp_path / "rendezvous"),
                str(tmp_path / f"rank{rank}.npz"),
                json.dumps(overrides),
                here,
            ],
            env=env,
        )
        for rank in range(2)
    ]
    try:
        codes = [process.wait(timeout=240) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert codes == [0, 0]
    reference, reference_metrics = run_steps(tiny_config(**overrides))
    ranks = [np.load(tmp_path / f"rank{rank}.npz") for rank in range(2)]
    for name, expected in reference.items():
        # The ranks step in lockstep on summed gradients: identical to each other.
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
        # And the same step as one rank on the whole batch, up to the order of sums.
        np.testing.assert_allclose(ranks[0][name], expected, rtol=1e-4, atol=2e-6, err_msg=name)
    metrics = json.loads((tmp_path / "rank0.npz.json").read_text())
    for step, expected in zip(metrics, reference_metrics):
        assert step["learner_ranks"] == 2.0
        assert step["num_tokens"] == expected["num_tokens"]
        assert step["loss"] == pytest.approx(expected["loss"], rel=1e-4, abs=1e-6)
        assert step["clip_fraction"] == pytest.approx(expected["clip_fraction"], abs=1e-6)

"""The planner's model and choices, and the engine running the plan it prints."""

import logging

import pytest
import torch
from offload_helpers import batches, lm_loss, offload_config, optim_config, tiny_gpt

from stalwart.offload.engine import OffloadEngine
from stalwart.offload.planner import Machine, UnitCost, plan_offload

MACHINE = Machine(
    compute_flops_per_s=100e9,
    host_copy_bytes_per_s=10e9,
    nvme_read_bytes_per_s=2e9,
    nvme_write_bytes_per_s=1e9,
)


def _units(num_blocks=8, block_params=10_000_000, checkpoint_bytes=1 << 20):
    units = [UnitCost(0, "embed", 1_000_000, 4_000_000, 4_000_000, False)]
    for i in range(num_blocks):
        units.append(
            UnitCost(
                i + 1,
                f"block{i}",
                block_params,
                4 * block_params,
                4 * block_params,
                True,
                checkpoint_bytes,
            )
        )
    units.append(UnitCost(num_blocks + 1, "head", 1_000_000, 4_000_000, 4_000_000, False))
    return units


def _plan(units, **overrides):
    options = dict(
        tokens_per_step=1024,
        num_microbatches=1,
        clipping=True,
        pool_budget_bytes=2 << 30,
        activation_allowance_bytes=1 << 30,
        max_buffer_count=6,
    )
    options.update(overrides)
    return plan_offload(units, MACHINE, **options)


def test_io_accounting_matches_the_bytes_per_parameter_model():
    units = _units()
    plan = _plan(units)
    num_params = sum(u.num_params for u in units)
    # fp32: parameters read twice + exp_avg/exp_avg_sq once = 16 B/param read;
    # parameters, exp_avg, exp_avg_sq and the gradient written = 16 B/param written.
    assert plan.read_bytes == 16 * num_params
    assert plan.written_bytes == 16 * num_params
    assert plan.nvme_s == pytest.approx(16 * num_params / 2e9 + 16 * num_params / 1e9)
    assert plan.lower_bound_s == max(plan.compute_s, plan.nvme_s, plan.host_s)
    assert plan.predicted_step_s >= plan.lower_bound_s


def test_prefetching_beats_no_prefetching_and_respects_the_pool():
    plan = _plan(_units())
    assert plan.prefetch_depth >= 1
    assert plan.candidates[0] > plan.candidates[plan.prefetch_depth]
    tight = _plan(_units(), pool_budget_bytes=3 * 40_000_000 * 2)
    assert max(tight.candidates) < max(plan.candidates)


def test_checkpoints_swap_earliest_blocks_first_only_when_memory_is_short():
    roomy = _plan(_units())
    assert set(roomy.activation_targets.values()) == {"keep"}
    short = _plan(_units(checkpoint_bytes=100 << 20), activation_allowance_bytes=600 << 20)
    swapped = [
        index for index, target in sorted(short.activation_targets.items()) if target == "nvme"
    ]
    assert swapped and swapped == list(range(1, len(swapped) + 1))
    kept = sum(100 << 20 for target in short.activation_targets.values() if target == "keep")
    assert kept <= 300 << 20
    assert short.read_bytes > roomy.read_bytes  # the swaps are paid for in NVMe traffic


def test_engine_plans_after_the_profiling_step_and_reports_prediction(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="stalwart.offload.engine")
    engine = OffloadEngine(
        tiny_gpt(depth=3), offload_config(tmp_path), optim_config(), loss_fn=lm_loss
    )
    steps = batches(2, num_micro=1, vocab=259)
    first = engine.train_step(steps[0], 1e-2)
    assert "predicted_step_s" not in first and engine.plan is not None
    assert "offload plan: prefetch depth" in caplog.text
    second = engine.train_step(steps[1], 1e-2)
    assert second["predicted_step_s"] > 0 and second["lower_bound_s"] <= second["predicted_step_s"]
    assert "offload step: measured" in caplog.text
    engine.close()


def test_swapped_checkpoints_give_identical_training(tmp_path):
    """Checkpoints written to NVMe and read back give the same parameters as kept ones."""
    results = []
    for target in ("keep", "nvme"):
        directory = tmp_path / target
        directory.mkdir()
        engine = OffloadEngine(
            tiny_gpt(depth=3),
            offload_config(directory, activation_swap=target),
            optim_config(),
            loss_fn=lm_loss,
            optimizer_kernel="torch",
        )
        for micro_batches in batches(2, num_micro=2, vocab=259):
            metrics = engine.train_step(micro_batches, 1e-2)
        results.append((engine.gather_parameters(), metrics.get("activation_bytes_swapped", 0)))
        engine.close()
    (kept, kept_swapped), (swapped, swapped_bytes) = results
    assert kept_swapped == 0 and swapped_bytes > 0
    for name in kept:
        assert torch.equal(kept[name], swapped[name]), name

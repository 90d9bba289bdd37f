"""Training through the offload engine equals the same steps in memory."""

import math

import pytest
import torch
from offload_helpers import (
    batches,
    lm_loss,
    named_parameters,
    offload_config,
    optim_config,
    reference_train,
    tiny_gpt,
    tiny_llama,
)

from stalwart.offload.engine import OffloadEngine


def _train_offloaded(model, tmp_path, steps, optim, lrs, **engine_options):
    config_options = engine_options.pop("config", {})
    engine = OffloadEngine(
        model,
        offload_config(tmp_path, **config_options),
        optim,
        loss_fn=lm_loss,
        run_dir=tmp_path,
        **engine_options,
    )
    history = [engine.train_step(micro_batches, lr) for micro_batches, lr in zip(steps, lrs)]
    params = engine.gather_parameters()
    return engine, history, params


def _assert_identical(expected: dict, actual: dict):
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs"


@pytest.mark.parametrize(
    "grad_clip, num_micro",
    [(0.0, 2), (1.0, 2), (0.05, 2), (0.05, 3)],
    ids=["no-clip", "clip-1", "clip-every-step", "clip-every-step-3-micro"],
)
def test_gpt_bit_identical_to_in_memory_adamw(tmp_path, grad_clip, num_micro):
    optim = optim_config(grad_clip=grad_clip)
    steps = batches(3, num_micro=num_micro, vocab=259)
    lrs = [1e-2, 5e-3, 2e-3]
    reference = tiny_gpt()
    expected_history = reference_train(reference, steps, optim, lrs)
    engine, history, params = _train_offloaded(
        tiny_gpt(), tmp_path, steps, optim, lrs, optimizer_kernel="torch"
    )
    _assert_identical(named_parameters(reference), params)
    for ours, theirs in zip(history, expected_history):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-6)
        assert not ours["skipped"]
        clipped = grad_clip > 0 and theirs["grad_norm"] > grad_clip
        assert ours["clipped"] == clipped
        assert ours["redone"] == (clipped and not ours["deferred"])
    if grad_clip == 0.05:
        # The first clipped step is redone; later ones defer the optimizer instead.
        assert history[0]["redone"] and all(step["deferred"] for step in history[1:])
    # Parameters and AdamW state were read and written from NVMe every step.
    assert all(step["bytes_read"] > 0 and step["bytes_written"] > 0 for step in history)
    engine.close()


def test_hf_llama_bit_identical_to_in_memory_adamw(tmp_path):
    optim = optim_config(grad_clip=1.0)
    steps = batches(3, num_micro=1, vocab=96)
    lrs = [1e-2, 1e-2, 1e-2]
    reference = tiny_llama()
    reference_train(reference, steps, optim, lrs)
    engine, _, params = _train_offloaded(
        tiny_llama(), tmp_path, steps, optim, lrs, optimizer_kernel="torch"
    )
    assert engine.describe()["num_blocks"] == 3
    _assert_identical(named_parameters(reference), params)
    engine.close()


def test_host_device_equals_in_memory(tmp_path):
    optim = optim_config(grad_clip=1.0)
    steps = batches(2, num_micro=1, vocab=259)
    lrs = [1e-2, 1e-2]
    reference = tiny_gpt(tie_embeddings=True)
    reference_train(reference, steps, optim, lrs)
    engine, _, params = _train_offloaded(
        tiny_gpt(tie_embeddings=True),
        tmp_path,
        steps,
        optim,
        lrs,
        optimizer_kernel="torch",
        config={"device": "cpu"},
    )
    # Tied embeddings form the persistent unit (one tensor used by two modules).
    assert any(unit.persistent and unit.name == "<persistent>" for unit in engine.units)
    _assert_identical(named_parameters(reference), params)
    engine.close()


def test_deepspeed_kernel_within_float_tolerance(tmp_path):
    optim = optim_config(grad_clip=1.0)
    steps = batches(3, num_micro=1, vocab=259)
    lrs = [1e-2, 1e-2, 1e-2]
    reference = tiny_gpt()
    reference_train(reference, steps, optim, lrs)
    engine, _, params = _train_offloaded(
        tiny_gpt(), tmp_path, steps, optim, lrs, optimizer_kernel="auto"
    )
    expected = named_parameters(reference)
    # DeepSpeed's AVX kernel orders the AdamW arithmetic differently: float32 rounding apart.
    for name in expected:
        torch.testing.assert_close(params[name], expected[name], rtol=1e-4, atol=1e-6)
    engine.close()


def test_non_finite_gradients_skip_the_step(tmp_path):
    optim = optim_config(grad_clip=1.0)
    model = tiny_gpt()
    before = named_parameters(model)
    poisoned = {"on": True}

    def loss_fn(outputs, targets):
        loss = lm_loss(outputs, targets)
        return loss * math.inf if poisoned["on"] else loss

    engine = OffloadEngine(
        model, offload_config(tmp_path), optim, loss_fn=loss_fn, run_dir=tmp_path
    )
    steps = batches(2, num_micro=1, vocab=259)
    skipped = engine.train_step(steps[0], 1e-2)
    assert skipped["skipped"] and engine.step_count == 0
    _assert_identical(before, engine.gather_parameters())
    poisoned["on"] = False
    good = engine.train_step(steps[1], 1e-2)
    assert not good["skipped"] and engine.step_count == 1
    assert not torch.equal(
        before["blocks.0.attn.wq.weight"], engine.gather_parameters()["blocks.0.attn.wq.weight"]
    )
    engine.close()

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
    reference_train_mixed,
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


def _bf16_engine(model, nvme_dir, optim):
    return OffloadEngine(
        model,
        offload_config(nvme_dir),
        optim,
        loss_fn=lm_loss,
        precision="bf16",
        optimizer_kernel="torch",
        aio_backend="threadpool",
    )


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


def test_dropout_is_recomputed_with_the_forward_random_numbers(tmp_path):
    """Blocks run without saving activations and recompute their forward in backward: the
    recomputation must draw the same dropout masks as the forward did (the block's RNG state
    is saved and restored), and the draws after it must not shift. GPU twin:
    test_engine_cuda.py (the device's generator)."""
    optim = optim_config(grad_clip=1.0)
    steps = batches(3, num_micro=2, vocab=96)
    lrs = [1e-2, 1e-2, 1e-2]
    reference = tiny_llama(attention_dropout=0.3)
    torch.manual_seed(1234)
    reference_train(reference, steps, optim, lrs)
    torch.manual_seed(1234)
    engine, _, params = _train_offloaded(
        tiny_llama(attention_dropout=0.3), tmp_path, steps, optim, lrs, optimizer_kernel="torch"
    )
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


@pytest.mark.parametrize(
    "grad_clip, num_micro",
    [(0.0, 2), (0.05, 1), (0.05, 2)],
    ids=["no-clip-2-micro", "clip-every-step", "clip-every-step-2-micro"],
)
def test_bf16_working_parameters_bit_identical_to_in_memory_mixed_precision(
    tmp_path, grad_clip, num_micro
):
    """bf16 forward/backward, fp32 master + AdamW state on NVMe: the same bits as the same
    mixed-precision math in memory (masters and bf16 working copies)."""
    optim = optim_config(grad_clip=grad_clip)
    steps = batches(3, num_micro=num_micro, vocab=259)
    lrs = [1e-2, 5e-3, 2e-3]
    reference = tiny_gpt()
    masters = reference_train_mixed(reference, steps, optim, lrs)
    engine, history, params = _train_offloaded(
        tiny_gpt(),
        tmp_path,
        steps,
        optim,
        lrs,
        optimizer_kernel="torch",
        precision="bf16",
        aio_backend="threadpool",
    )
    assert all(p.dtype == torch.float32 for p in params.values())
    _assert_identical(masters, params)
    working = engine.gather_parameters(working_copies=True)
    assert all(p.dtype == torch.bfloat16 for p in working.values())
    _assert_identical(named_parameters(reference), working)
    if grad_clip:
        assert history[0]["redone"] and all(step["deferred"] for step in history[1:])
    engine.close()


def test_bf16_hf_llama_bit_identical_to_in_memory_mixed_precision(tmp_path):
    optim = optim_config(grad_clip=1.0)
    steps = batches(2, num_micro=1, vocab=96)
    lrs = [1e-2, 1e-2]
    reference = tiny_llama()
    masters = reference_train_mixed(reference, steps, optim, lrs)
    engine, _, params = _train_offloaded(
        tiny_llama(),
        tmp_path,
        steps,
        optim,
        lrs,
        optimizer_kernel="torch",
        precision="bf16",
        aio_backend="threadpool",
    )
    _assert_identical(masters, params)
    _assert_identical(named_parameters(reference), engine.gather_parameters(working_copies=True))
    engine.close()


def test_bf16_moves_two_byte_parameters_through_forward_and_backward(tmp_path):
    """Per step without clipping: parameters are read as bf16 twice, master + AdamW state read
    once and written once with the new bf16 copy: 2+2+12 B read, 12+2 B written per parameter
    (plus alignment), where fp32 training reads 4+4+8 and writes 4+8."""
    optim = optim_config(grad_clip=0.0)
    steps = batches(1, num_micro=1, vocab=259)
    moved = {}
    for precision in ("fp32", "bf16"):
        (tmp_path / precision).mkdir()
        engine, history, _ = _train_offloaded(
            tiny_gpt(depth=2, width=256),
            tmp_path / precision,
            steps,
            optim,
            [1e-2],
            optimizer_kernel="torch",
            precision=precision,
            aio_backend="threadpool",
        )
        num_params = sum(slot.numel for unit in engine.units for slot in unit.slots)
        moved[precision] = (
            history[0]["bytes_read"] / num_params,
            history[0]["bytes_written"] / num_params,
        )
        engine.close()
    assert moved["fp32"][0] == pytest.approx(16, rel=0.05)
    assert moved["fp32"][1] == pytest.approx(12, rel=0.05)
    assert moved["bf16"][0] == pytest.approx(16, rel=0.05)
    assert moved["bf16"][1] == pytest.approx(14, rel=0.05)


def test_bf16_checkpoint_round_trip_and_precision_mismatch(tmp_path):
    optim = optim_config(grad_clip=1.0)
    steps = batches(2, num_micro=1, vocab=259)
    for name in "abc":
        (tmp_path / name).mkdir()
    engine, _, params = _train_offloaded(
        tiny_gpt(),
        tmp_path / "a",
        steps,
        optim,
        [1e-2, 1e-2],
        precision="bf16",
        optimizer_kernel="torch",
        aio_backend="threadpool",
    )
    shards = engine.checkpoint_shards()
    restored = _bf16_engine(tiny_gpt(seed=1), tmp_path / "b", optim)
    restored.load_checkpoint_shards(shards)
    _assert_identical(params, restored.gather_parameters())
    _assert_identical(
        engine.gather_parameters(working_copies=True),
        restored.gather_parameters(working_copies=True),
    )
    fp32 = OffloadEngine(
        tiny_gpt(),
        offload_config(tmp_path / "c"),
        optim,
        loss_fn=lm_loss,
        optimizer_kernel="torch",
        aio_backend="threadpool",
    )
    with pytest.raises(ValueError, match="precision 'bf16'"):
        fp32.load_checkpoint_shards(shards)
    for item in (engine, restored, fp32):
        item.close()


def test_bf16_deferred_step_stores_two_byte_gradients(tmp_path):
    """After a clipped step the next one defers AdamW until the norm is known: it writes the
    gradients during backward and sweeps master + state afterwards. With bf16 working parameters
    and one micro-batch the gradients are stored in 2 bytes (exactly what autograd produced):
    2+2 (working copies) + 12 (master, AdamW) + 2 (gradient) B read, 14 + 2 B written."""
    optim = optim_config(grad_clip=1e-3)
    steps = batches(2, num_micro=1, vocab=259)
    engine, history, _ = _train_offloaded(
        tiny_gpt(depth=2, width=256),
        tmp_path,
        steps,
        optim,
        [1e-2, 1e-2],
        optimizer_kernel="torch",
        precision="bf16",
        aio_backend="threadpool",
    )
    assert history[1]["deferred"] and history[1]["clipped"]
    num_params = sum(slot.numel for unit in engine.units for slot in unit.slots)
    assert history[1]["bytes_read"] / num_params == pytest.approx(18, rel=0.05)
    assert history[1]["bytes_written"] / num_params == pytest.approx(16, rel=0.05)
    engine.close()


def test_clipped_update_is_applied_by_the_next_forward_without_reading_parameters(tmp_path):
    """A clipped (or deferred) step's optimizer update waits for the next forward, which gets
    the new bf16 parameters from the update itself: that step reads 2 (backward) + 12 (master,
    exp_avg, exp_avg_sq) + 2 (bf16 gradients) B per parameter, not 2 more for the forward.
    Between steps the pending update is invisible to nothing: evaluation, gathering and
    checkpoints all see the whole last step."""
    optim = optim_config(grad_clip=0.05)  # every step clips
    steps = batches(3, num_micro=1, vocab=259)
    lrs = [1e-2, 5e-3, 2e-3]
    for name in "ab":
        (tmp_path / name).mkdir()
    engine = _bf16_engine(tiny_gpt(depth=2, width=256), tmp_path / "a", optim)
    num_params = sum(slot.numel for unit in engine.units for slot in unit.slots)
    history = []
    for micro_batches, lr in zip(steps, lrs):
        history.append(engine.train_step(micro_batches, lr))
        pending = [unit for unit in engine.units if unit.pending_update is not None]
        assert pending, "a clipped step leaves its update for the next forward"
    assert all(step["clipped"] for step in history) and history[2]["deferred"]
    assert history[2]["bytes_read"] / num_params == pytest.approx(16, rel=0.05)
    assert history[2]["bytes_written"] / num_params == pytest.approx(16, rel=0.05)

    # Evaluation applies the pending update unit by unit, exactly as the next step would.
    inputs = steps[0][0][0]
    reference = tiny_gpt(depth=2, width=256)
    mixed = reference_train_mixed(reference, steps, optim, lrs)
    evaluated = engine.run_forward(inputs)
    with torch.no_grad():
        expected = reference(inputs)
    assert torch.equal(evaluated, expected)
    _assert_identical(mixed, engine.gather_parameters())
    assert not [unit for unit in engine.units if unit.pending_update is not None]

    # A checkpoint taken right after a clipped step holds that step.
    engine.train_step(steps[0], 1e-3)
    restored = _bf16_engine(tiny_gpt(depth=2, width=256, seed=1), tmp_path / "b", optim)
    restored.load_checkpoint_shards(engine.checkpoint_shards())
    _assert_identical(engine.gather_parameters(), restored.gather_parameters())
    assert restored.param_steps == engine.param_steps
    engine.close()
    restored.close()


def test_modules_outside_the_blocks_stream_once_the_first_step_saw_them_run(tmp_path):
    """Embedding, final norm and LM head are resident through the first step, which records
    whether their own forward runs; from then on they are fetched and released like blocks.
    Tied weights stay resident (two units use them)."""
    optim = optim_config(grad_clip=1.0)
    steps = batches(3, num_micro=2, vocab=259)
    lrs = [1e-2, 5e-3, 2e-3]
    for tied in (False, True):
        reference = tiny_gpt(tie_embeddings=tied)
        reference_train(reference, steps, optim, lrs)
        directory = tmp_path / str(tied)
        directory.mkdir()
        engine = OffloadEngine(
            tiny_gpt(tie_embeddings=tied),
            offload_config(directory),
            optim,
            loss_fn=lm_loss,
            optimizer_kernel="torch",
        )
        resident = {unit.name: unit.persistent for unit in engine.units}
        assert resident["norm"] and resident.get("token_embedding", True)  # until the first step
        for micro_batches, lr in zip(steps, lrs):
            engine.train_step(micro_batches, lr)
            assert all(unit.p_buffer is None for unit in engine.units if not unit.persistent)
        resident = {unit.name: unit.persistent for unit in engine.units}
        assert not resident["norm"]
        assert resident.get("token_embedding", False) is False
        if tied:
            assert resident["<persistent>"] and "lm_head" not in resident
        else:
            assert not resident["lm_head"]
        _assert_identical(named_parameters(reference), engine.gather_parameters())
        engine.close()


# ---------------------------------------------------------------------------------------------
# layers larger than offload.sub_group_size: the optimizer state is updated in slices


@pytest.mark.parametrize(
    "precision, grad_clip, num_micro",
    [("fp32", 0.0, 2), ("fp32", 0.05, 1), ("bf16", 0.05, 2), ("bf16", 1.0, 1)],
    ids=["fp32-no-clip-2-micro", "fp32-clip-every-step", "bf16-clip-2-micro", "bf16-clip-1"],
)
def test_sliced_optimizer_state_is_bit_identical_to_in_memory(
    tmp_path, precision, grad_clip, num_micro
):
    """With a 1024-element sub-group every layer's state goes through 4 KiB slices whose edges
    cut through its tensors, on both update paths (during the backward, and in the next forward
    after a clipped step): the same bits as AdamW in memory."""
    optim = optim_config(grad_clip=grad_clip)
    steps = batches(3, num_micro=num_micro, vocab=259)
    lrs = [1e-2, 5e-3, 2e-3]
    reference = tiny_gpt()
    if precision == "bf16":
        expected = reference_train_mixed(reference, steps, optim, lrs)
    else:
        reference_train(reference, steps, optim, lrs)
        expected = named_parameters(reference)
    engine, history, params = _train_offloaded(
        tiny_gpt(),
        tmp_path,
        steps,
        optim,
        lrs,
        optimizer_kernel="torch",
        precision=precision,
        aio_backend="threadpool",
        config={"sub_group_size": 1024},
    )
    sliced = [unit for unit in engine.units if unit.slice_bytes]
    assert sliced and all(unit.state_bytes > 2 * unit.slice_bytes for unit in sliced)
    assert any(
        slot.state_offset % unit.slice_bytes + slot.numel * 4 > unit.slice_bytes
        for unit in sliced
        for slot in unit.trainable
    ), "no tensor crosses a slice edge"
    _assert_identical(expected, params)
    if precision == "bf16":
        _assert_identical(
            named_parameters(reference), engine.gather_parameters(working_copies=True)
        )
    if grad_clip == 0.05:
        assert history[0]["redone"] and all(step["deferred"] for step in history[1:])
    engine.close()


def test_sliced_deepspeed_kernel_equals_the_whole_update(tmp_path):
    """DeepSpeed's kernel differs from torch's by rounding; sliced and whole it is the same."""
    optim = optim_config(grad_clip=1.0)
    steps = batches(3, num_micro=1, vocab=259)
    lrs = [1e-2, 1e-2, 1e-2]
    results = {}
    for name, sub_group_size in (("whole", 1 << 23), ("sliced", 1024)):
        (tmp_path / name).mkdir()
        engine, _, results[name] = _train_offloaded(
            tiny_gpt(),
            tmp_path / name,
            steps,
            optim,
            lrs,
            optimizer_kernel="auto",
            precision="bf16",
            config={"sub_group_size": sub_group_size},
        )
        assert any(unit.slice_bytes for unit in engine.units) == (name == "sliced")
        state = engine.optimizer_state()
        results[name + "-state"] = {
            f"{key}/{entry}": value
            for key, entries in state.items()
            for entry, value in entries.items()
        }
        engine.close()
    _assert_identical(results["whole"], results["sliced"])
    _assert_identical(results["whole-state"], results["sliced-state"])


def test_slicing_shrinks_the_smallest_pool_to_parameters_and_gradients(tmp_path):
    """The step's smallest pool holds two units in flight. Whole, a unit brings all of its
    optimizer state (18 B per parameter with a bf16 working copy); sliced, its parameters,
    its fp32 gradient and two slices (6 B per parameter plus the slices)."""
    pools = {}
    for name, sub_group_size in (("whole", 1 << 23), ("sliced", 4096)):
        (tmp_path / name).mkdir()
        engine = OffloadEngine(
            tiny_gpt(width=256),
            offload_config(tmp_path / name, sub_group_size=sub_group_size),
            optim_config(),
            loss_fn=lm_loss,
            precision="bf16",
            optimizer_kernel="torch",
            aio_backend="threadpool",
        )
        largest = max(engine.units, key=lambda unit: unit.working_set_bytes)
        params = sum(slot.numel for slot in largest.slots)
        pools[name] = (engine.min_pool_bytes, largest.working_set_bytes / params)
        engine.close()
    assert pools["whole"][1] == pytest.approx(18, rel=0.02)
    assert pools["sliced"][1] == pytest.approx(6, rel=0.15)
    assert pools["sliced"][0] < pools["whole"][0] / 2.5


@pytest.mark.parametrize(
    "precision, grad_clip, num_micro",
    [
        ("fp32", 0.0, 1),
        ("fp32", 0.0, 2),
        ("fp32", 1.0, 1),
        ("fp32", 0.05, 2),
        ("bf16", 0.0, 1),
        ("bf16", 0.05, 1),
    ],
    ids=[
        "fp32-no-clip",
        "fp32-no-clip-2-micro",
        "fp32-clip-1",
        "fp32-clip-every-step-2-micro",
        "bf16-no-clip",
        "bf16-clip-every-step",
    ],
)
def test_copies_to_and_from_the_compute_memory_are_never_stale(
    tmp_path, precision, grad_clip, num_micro
):
    """CPU twin of the GPU's copy streams (test_engine_cuda.py): the model computes on copies
    of the host buffers, made as soon as a unit's read is done, the way parameters are staged
    to a GPU; the last micro-batch's gradients reach their pool buffers through copies too.
    Every copy runs on a thread of its own, 2 ms late. A copy made before an update lands, one
    kept after it, a buffer reused before its copy has run, or gradients read before theirs has
    landed gives different bits. The cases cover the speculative update, clipped steps redone
    and deferred (updates applied by the next forward) and accumulation over micro-batches."""
    from stalwart.offload.device import StagedCopies

    optim = optim_config(grad_clip=grad_clip)
    steps = batches(3, num_micro=num_micro, vocab=259)
    lrs = [1e-2, 5e-3, 2e-3]
    reference = tiny_gpt(depth=4)
    if precision == "bf16":
        expected = reference_train_mixed(reference, steps, optim, lrs)
    else:
        reference_train(reference, steps, optim, lrs)
        expected = named_parameters(reference)
    engine = OffloadEngine(
        tiny_gpt(depth=4),
        offload_config(tmp_path),
        optim,
        loss_fn=lm_loss,
        optimizer_kernel="torch",
        precision=precision,
        prefetch_depth=2,
    )
    engine.transfers = StagedCopies(torch.device("cpu"), delay_s=0.002)
    history = [engine.train_step(micro, lr) for micro, lr in zip(steps, lrs)]
    assert sum(step["staged_ahead"] for step in history) > 0
    if grad_clip:
        assert all(step["deferred"] for step in history[1:])
    # Evaluation applies the last step's pending updates through the same copies.
    inputs = steps[0][0][0]
    with torch.no_grad():
        expected_logits = reference(inputs)
    assert torch.equal(engine.run_forward(inputs), expected_logits)
    _assert_identical(expected, engine.gather_parameters())
    engine.close()

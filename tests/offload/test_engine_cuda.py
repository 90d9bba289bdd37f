"""The CUDA path (parameters copied to the device per layer, gradients back to the host).

CPU twin: test_engine.py (same engine code with the host as the compute device).
"""

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


def _cuda_steps(num_steps: int, num_micro: int, vocab: int):
    return [
        [(x.cuda(), y.cuda()) for x, y in micro]
        for micro in batches(num_steps, num_micro=num_micro, vocab=vocab)
    ]


def _cuda_engine(model, tmp_path, optim, **options):
    config = offload_config(tmp_path, max_device_memory_gb=1.0, **options.pop("config", {}))
    return OffloadEngine(model, config, optim, loss_fn=lm_loss, optimizer_kernel="torch", **options)


def _assert_close(params: dict, expected: dict, rtol=1e-4, atol=1e-5):
    """GPU kernels reduce in a different order than the CPU ones: float32 rounding apart."""
    for name, value in expected.items():
        torch.testing.assert_close(params[name], value.detach().cpu(), rtol=rtol, atol=atol)


@pytest.mark.gpu
def test_gpt_on_cuda_matches_in_memory(tmp_path):
    optim = optim_config(grad_clip=1.0)
    steps = _cuda_steps(3, num_micro=2, vocab=259)
    lrs = [1e-2, 5e-3, 2e-3]
    reference = tiny_gpt().cuda()
    reference_train(reference, steps, optim, lrs)
    engine = _cuda_engine(tiny_gpt(), tmp_path, optim)
    assert engine.compute_device.type == "cuda"
    for micro_batches, lr in zip(steps, lrs):
        engine.train_step(micro_batches, lr)
    _assert_close(engine.gather_parameters(), named_parameters(reference))
    engine.close()


@pytest.mark.gpu
def test_bf16_on_cuda_matches_in_memory_mixed_precision(tmp_path):
    """CPU twin: test_engine.py::test_bf16_working_parameters_bit_identical_to_in_memory_mixed_precision."""
    from offload_helpers import reference_train_mixed

    optim = optim_config(grad_clip=1.0)
    steps = _cuda_steps(3, num_micro=1, vocab=259)
    lrs = [1e-2, 5e-3, 2e-3]
    reference = tiny_gpt().cuda()
    masters = reference_train_mixed(reference, steps, optim, lrs)
    engine = _cuda_engine(tiny_gpt(), tmp_path, optim, precision="bf16")
    for micro_batches, lr in zip(steps, lrs):
        engine.train_step(micro_batches, lr)
    # Same bf16 GEMMs on the same device; AdamW runs on the host here and on CUDA in the
    # reference: float32 rounding apart in the masters.
    _assert_close(engine.gather_parameters(), masters, rtol=1e-3, atol=1e-4)
    engine.close()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "grad_clip, num_micro", [(1.0, 1), (0.05, 1), (0.05, 2)], ids=["clip-1", "clip", "clip-2-micro"]
)
def test_parameters_and_gradients_cross_on_copy_streams(tmp_path, grad_clip, num_micro):
    """CPU twin: test_engine.py::test_copies_to_and_from_the_compute_memory_are_never_stale.
    Pinned buffers and a small pool (buffers reused within a step): parameters are copied on
    their own stream before use, gradients come back on another, a buffer is never reused
    before its copy has run and no gradient is read before its copy has landed; speculative,
    clipped-and-deferred and accumulated steps."""
    from stalwart.offload.device import StagedCopies

    optim = optim_config(grad_clip=grad_clip)
    steps = _cuda_steps(4, num_micro=num_micro, vocab=259)
    lrs = [1e-2, 5e-3, 2e-3, 1e-3]
    reference = tiny_gpt(depth=6).cuda()
    reference_train(reference, steps, optim, lrs)
    engine = _cuda_engine(
        tiny_gpt(depth=6),
        tmp_path,
        optim,
        config={"pin_memory": True, "buffer_count": 2},
        prefetch_depth=2,
    )
    assert isinstance(engine.transfers, StagedCopies)
    assert engine.transfers.stream != torch.cuda.current_stream()
    assert engine.transfers.gradient_stream != torch.cuda.current_stream()
    history = [engine.train_step(micro, lr) for micro, lr in zip(steps, lrs)]
    assert sum(step["staged_ahead"] for step in history) > 0
    _assert_close(engine.gather_parameters(), named_parameters(reference))
    engine.close()


@pytest.mark.gpu
def test_dropout_on_cuda_is_recomputed_with_the_forward_random_numbers(tmp_path):
    """CPU twin: test_engine.py::test_dropout_is_recomputed_with_the_forward_random_numbers.
    On a GPU dropout draws from the device's generator, saved and restored per block. Without
    its state the recomputed masks differ: errors of the order of the update itself (1e-2),
    far above these tolerances."""
    optim = optim_config(grad_clip=1.0)
    steps = _cuda_steps(3, num_micro=2, vocab=96)
    lrs = [1e-2, 1e-2, 1e-2]
    reference = tiny_llama(attention_dropout=0.3).cuda()
    torch.manual_seed(1234)
    reference_train(reference, steps, optim, lrs)
    torch.manual_seed(1234)
    engine = _cuda_engine(tiny_llama(attention_dropout=0.3), tmp_path, optim)
    for micro_batches, lr in zip(steps, lrs):
        engine.train_step(micro_batches, lr)
    _assert_close(engine.gather_parameters(), named_parameters(reference))
    engine.close()

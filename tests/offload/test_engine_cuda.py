"""The CUDA path (parameters copied to the device per layer, gradients back to the host).

CPU twin: test_engine.py (same engine code with the host as the compute device).
"""

import pytest
import torch
from offload_helpers import (
    batches,
    lm_loss,
    offload_config,
    optim_config,
    reference_train,
    tiny_gpt,
)

from stalwart.offload.engine import OffloadEngine


@pytest.mark.gpu
def test_gpt_on_cuda_matches_in_memory(tmp_path):
    optim = optim_config(grad_clip=1.0)
    steps = [
        [(x.cuda(), y.cuda()) for x, y in micro] for micro in batches(3, num_micro=2, vocab=259)
    ]
    lrs = [1e-2, 5e-3, 2e-3]
    reference = tiny_gpt().cuda()
    reference_train(reference, steps, optim, lrs)
    engine = OffloadEngine(
        tiny_gpt(),
        offload_config(tmp_path, max_device_memory_gb=1.0),
        optim,
        loss_fn=lm_loss,
        optimizer_kernel="torch",
    )
    assert engine.compute_device.type == "cuda"
    for micro_batches, lr in zip(steps, lrs):
        engine.train_step(micro_batches, lr)
    params = engine.gather_parameters()
    # GPU kernels reduce in a different order than the CPU ones: float32 rounding apart.
    for name, expected in reference.named_parameters():
        torch.testing.assert_close(params[name], expected.detach().cpu(), rtol=1e-4, atol=1e-5)
    engine.close()


@pytest.mark.gpu
def test_bf16_on_cuda_matches_in_memory_mixed_precision(tmp_path):
    """CPU twin: test_engine.py::test_bf16_working_parameters_bit_identical_to_in_memory_mixed_precision."""
    from offload_helpers import reference_train_mixed

    optim = optim_config(grad_clip=1.0)
    steps = [
        [(x.cuda(), y.cuda()) for x, y in micro] for micro in batches(3, num_micro=1, vocab=259)
    ]
    lrs = [1e-2, 5e-3, 2e-3]
    reference = tiny_gpt().cuda()
    masters = reference_train_mixed(reference, steps, optim, lrs)
    engine = OffloadEngine(
        tiny_gpt(),
        offload_config(tmp_path, max_device_memory_gb=1.0),
        optim,
        loss_fn=lm_loss,
        optimizer_kernel="torch",
        precision="bf16",
    )
    for micro_batches, lr in zip(steps, lrs):
        engine.train_step(micro_batches, lr)
    params = engine.gather_parameters()
    # Same bf16 GEMMs on the same device; AdamW runs on the host here and on CUDA in the
    # reference: float32 rounding apart in the masters.
    for name, expected in masters.items():
        torch.testing.assert_close(params[name], expected.cpu(), rtol=1e-3, atol=1e-4)
    engine.close()

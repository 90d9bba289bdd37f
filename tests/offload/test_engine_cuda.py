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

"""Activation checkpointing per block, with the checkpoints kept, or swapped to host or NVMe.

Each transformer block runs its forward without saving anything but its input (the
checkpoint); its backward re-runs the forward with the block's parameters fetched again and
back-propagates through it. Besides saving memory this is what makes releasing parameters
after the forward safe: nothing saved in the forward can point into a released buffer.

Where the checkpoint lives is decided per block by the planner:
- `keep`: stays where it was computed (device memory on GPU, host memory on CPU);
- `host`: copied to host memory (GPU only; on CPU it is the same as `keep`);
- `nvme`: written to a scratch file and read back, one block ahead, during backward.
The RNG state is saved per block so the recomputed forward draws the same random numbers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from stalwart.offload.aio import AioBackend, OpenFile, align_up

SWAP_TARGETS = ("keep", "host", "nvme")
_CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "layer_past", "kv_cache")


class ActivationSwapper:
    """Scratch space for block checkpoints on NVMe: one slot per block, grown as needed."""

    def __init__(self, aio: AioBackend, directory: str, pool):
        self.aio = aio
        self.pool = pool
        self.path = os.path.join(directory, "activations.bin")
        self.file = OpenFile(self.path)
        self.slot_bytes = 0
        self.num_slots = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self._lock = threading.Lock()

    def ensure(self, num_slots: int, slot_bytes: int) -> None:
        slot_bytes = align_up(slot_bytes)
        if slot_bytes > self.slot_bytes or num_slots > self.num_slots:
            self.slot_bytes = max(slot_bytes, self.slot_bytes)
            self.num_slots = max(num_slots, self.num_slots)
            os.ftruncate(self.file.fd, self.slot_bytes * self.num_slots)

    def write(self, slot: int, tensor: torch.Tensor) -> Future:
        num_bytes = tensor.numel() * tensor.element_size()
        buffer = self.pool.acquire(num_bytes)
        buffer.tensor[:num_bytes].copy_(tensor.detach().reshape(-1).view(torch.uint8))
        with self._lock:
            self.bytes_written += align_up(num_bytes)
        future = self.aio.write(
            self.file, slot * self.slot_bytes, buffer.tensor[: align_up(num_bytes)]
        )
        future.add_done_callback(lambda _f: buffer.release())
        return future

    def read(self, slot: int, num_bytes: int):
        buffer = self.pool.acquire(num_bytes)
        with self._lock:
            self.bytes_read += align_up(num_bytes)
        return self.aio.read(
            self.file, slot * self.slot_bytes, buffer.tensor[: align_up(num_bytes)]
        ), buffer

    def close(self) -> None:
        self.file.close()
        if os.path.exists(self.path):
            os.remove(self.path)


class StashedCheckpoint:
    """A block input held in memory or on NVMe until the block's backward needs it."""

    def __init__(
        self, tensor: torch.Tensor, target: str, slot: int, swapper: ActivationSwapper | None
    ):
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        self.num_bytes = tensor.numel() * tensor.element_size()
        self.slot = slot
        self.target = target
        self._tensor: torch.Tensor | None = None
        self._write: Future | None = None
        self._read = None
        self.swapper = swapper
        if target == "nvme" and swapper is not None:
            self._write = swapper.write(slot, tensor)
        elif target == "host" and tensor.device.type != "cpu":
            self._tensor = tensor.detach().to("cpu", non_blocking=False)
        else:
            self._tensor = tensor.detach()

    def prefetch(self) -> None:
        if self._tensor is None and self._read is None and self.swapper is not None:
            self._write.result()
            self._read = self.swapper.read(self.slot, self.num_bytes)

    def restore(self) -> torch.Tensor:
        if self._tensor is None:
            self.prefetch()
            future, buffer = self._read
            future.result()
            restored = buffer.tensor[: self.num_bytes].view(self.dtype).view(self.shape).clone()
            buffer.release()
            self._read = None
            return restored.to(self.device)
        return self._tensor.to(self.device)


class BlockCheckpoint(torch.autograd.Function):
    """Forward without saving activations; backward recomputes the block (reentrant style)."""

    @staticmethod
    def forward(ctx, runner: CheckpointedCall, hidden: torch.Tensor, _graph_anchor: torch.Tensor):
        # `_graph_anchor` requires grad so the block's parameters get gradients even when the
        # hidden state does not (a frozen embedding below it).
        ctx.runner = runner
        runner.rng_state = torch.get_rng_state()
        # On a GPU, dropout draws from the device's generator: save it too.
        runner.device_rng_state = (
            torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        )
        with torch.no_grad():
            output = runner.run(hidden)
        runner.stash = runner.make_stash(hidden)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        runner: CheckpointedCall = ctx.runner
        hidden = runner.stash.restore().detach().requires_grad_(True)
        runner.stash = None
        runner.before_recompute()
        started = time.perf_counter()
        devices = [hidden.device] if runner.device_rng_state is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(runner.rng_state)
            if runner.device_rng_state is not None:
                torch.cuda.set_rng_state(runner.device_rng_state, hidden.device)
            output = runner.run(hidden, recompute=True)
        torch.autograd.backward(output, grad_output)
        runner.backward_s = time.perf_counter() - started
        runner.after_backward()
        return None, hidden.grad, None


class CheckpointedCall:
    """One call of one block: its extra arguments, stash and hooks into the engine."""

    def __init__(
        self,
        forward: Callable,
        args: tuple,
        kwargs: dict,
        make_stash: Callable[[torch.Tensor], StashedCheckpoint],
        before_recompute: Callable[[], None],
        after_backward: Callable[[], None],
    ):
        self.forward = forward
        self.args = args
        self.kwargs = kwargs
        self.make_stash = make_stash
        self.before_recompute = before_recompute
        self.after_backward = after_backward
        self.rng_state = None
        self.device_rng_state = None
        self.stash: StashedCheckpoint | None = None
        self.backward_s: float | None = None  # recomputation + backward, parameters resident

    def run(self, hidden: torch.Tensor, recompute: bool = False):
        kwargs = self.kwargs
        if recompute:
            # A KV cache passed in training is appended to by the forward; doing it again in the
            # recomputation would double the keys. Training starts from an empty cache, so the
            # recomputed attention without it is the same.
            kwargs = {k: (None if k in _CACHE_KEYS else v) for k, v in kwargs.items()}
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
        output = self.forward(hidden, *self.args, **kwargs)
        if isinstance(output, tuple):
            # Blocks that return (hidden, extras...): only the hidden state carries gradient.
            self.extras = output[1:]
            return output[0]
        self.extras = None
        return output


def can_checkpoint(hidden, args: tuple, kwargs: dict) -> bool:
    """Reentrant checkpointing passes gradient to the first argument only; check that suffices."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        return False
    others = list(args) + list(kwargs.values())
    for value in others:
        items = value if isinstance(value, tuple | list) else (value,)
        if any(isinstance(item, torch.Tensor) and item.requires_grad for item in items):
            return False
    return True

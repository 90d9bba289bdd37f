"""Between a unit's host buffers and the memory the model computes in.

On a host-only machine the model computes on the host buffers themselves (`HostViews`):
nothing is copied. On a GPU (`StagedCopies`) parameters and gradients cross on copy streams of
their own, so the copies overlap the compute:

- **parameters, host -> device**: copied one or more units ahead of use (the engine stages a
  unit as soon as its NVMe read is done). The compute stream waits for the copy's event before
  it uses them (`attach`), and the device tensors are recorded on the compute stream, so the
  caching allocator does not hand their memory out again before the compute that reads them
  has run.
- **gradients, device -> host**: copied straight into the unit's pool buffer after the compute
  that produced them (`gradients_to_host`); the optimizer thread waits for the copy's event
  (`wait`) before it reads them, while the backward of the layers below goes on.
- Host buffers are pinned (the pool registers them), which makes both copies asynchronous to
  the host: before a parameter buffer is reused or changed (released to the pool, handed to
  the optimizer, read into again) `drop` waits for its copy, and nothing reads a gradient
  buffer before `wait` returns.

`StagedCopies` on the host (`torch.device("cpu")`) is the GPU's twin for tests on a machine
without one: copies instead of views, made by a thread of its own after `delay_s`, with
futures for events. A copy made from a buffer that changes before it runs, a stale copy, or a
read of a gradient before its copy has landed then gives different numbers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class HostViews:
    """The model computes on the host buffers: parameters are views of them."""

    copies = False

    def stage(self, key: int, views: Sequence[torch.Tensor]) -> bool:
        return False

    def attach(self, key: int, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(views)

    def drop(self, key: int) -> None:
        pass

    def staged(self, key: int) -> bool:
        return False

    @staticmethod
    def wait(event) -> None:
        assert event is None, "host compute copies nothing"

    def close(self) -> None:
        pass


class StagedCopies:
    """Copies of units' parameters in the compute device's memory, made ahead of use, and of
    their gradients in host buffers, made as the backward goes on."""

    copies = True

    def __init__(self, device: torch.device, *, delay_s: float = 0.0):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda:
            self.stream = torch.cuda.Stream(self.device)  # host -> device
            self.gradient_stream = torch.cuda.Stream(self.device)  # device -> host
            self._worker = None
        else:
            self.stream = self.gradient_stream = None
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="stalwart-copies")
        self.delay_s = delay_s
        # key -> (device tensors, the copy's event: a CUDA event, or a future on the host)
        self._staged: dict[int, tuple[list[torch.Tensor], object]] = {}

    def staged(self, key: int) -> bool:
        return key in self._staged

    def stage(self, key: int, views: Sequence[torch.Tensor]) -> bool:
        """Start copying `views` (host tensors of unit `key`) to the device; False if already
        staged. The host buffer must not change until `drop(key)`."""
        if key in self._staged:
            return False
        if not self.is_cuda:
            copies = [torch.empty_like(view) for view in views]
            self._staged[key] = (copies, self._later(_copy_all, copies, list(views)))
            return True
        with torch.cuda.stream(self.stream):
            copies = [view.to(self.device, non_blocking=True) for view in views]
            event = torch.cuda.Event()
            event.record(self.stream)
        self._staged[key] = (copies, event)
        return True

    def attach(self, key: int, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The device tensors of unit `key`, ready for the compute stream (staged now if they
        were not staged ahead)."""
        self.stage(key, views)
        copies, event = self._staged[key]
        if self.is_cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for tensor in copies:
                tensor.record_stream(compute)
        else:
            event.result()  # host compute: the host itself waits
        return copies

    def drop(self, key: int) -> None:
        """Forget unit `key`'s copies and wait until its host buffer is no longer being read."""
        entry = self._staged.pop(key, None)
        if entry is not None:
            self.wait(entry[1])

    def gradients_to_host(
        self, gradients: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
    ) -> object:
        """Copy device `gradients` into host `targets` (views of a pinned buffer, same shapes,
        converted to their dtype) after the compute that produced them; returns the event to
        `wait` on before the targets are read."""
        if not self.is_cuda:
            return self._later(_copy_all, list(targets), list(gradients))
        compute = torch.cuda.current_stream(self.device)
        self.gradient_stream.wait_stream(compute)
        with torch.cuda.stream(self.gradient_stream):
            for target, gradient in zip(targets, gradients):
                target.copy_(gradient, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.gradient_stream)
        for gradient in gradients:
            gradient.record_stream(self.gradient_stream)
        return event

    @staticmethod
    def wait(event) -> None:
        """The host waits for a copy (a CUDA event or, on the host, a future)."""
        if event is None:
            return
        if isinstance(event, Future):
            event.result()
        else:
            event.synchronize()

    def _later(self, function, *args) -> Future:
        def run():
            if self.delay_s:
                time.sleep(self.delay_s)
            function(*args)

        return self._worker.submit(run)

    def close(self) -> None:
        for key in list(self._staged):
            self.drop(key)
        if self._worker is not None:
            self._worker.shutdown(wait=True)


@torch.no_grad()
def _copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    for target, source in zip(targets, sources):
        target.copy_(source)


def parameter_transfers(device: torch.device) -> HostViews | StagedCopies:
    """`HostViews` for host compute, `StagedCopies` (copy streams) for a GPU."""
    return StagedCopies(device) if torch.device(device).type == "cuda" else HostViews()

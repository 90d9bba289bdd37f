"""A unit's parameters, from their host buffer to the memory the model computes in.

On a host-only machine the model computes on the host buffer itself (`HostViews`): nothing is
copied. On a GPU (`StagedCopies`) each unit's parameters are copied host -> device on a copy
stream of their own, one or more units ahead of use (the engine stages a unit as soon as its
NVMe read is done), so the copy of the next layer overlaps the compute of this one:

- the compute stream waits for the copy's event before it uses the parameters (`attach`), and
  the device tensors are recorded on the compute stream, so the caching allocator does not hand
  their memory out again before the compute that reads them has run;
- the host buffer is pinned (the pool registers it), so the copy is asynchronous to the host:
  before the buffer is reused or changed (released to the pool, handed to the optimizer, read
  into again), `drop` waits for the copy to finish on the host side. Without that wait, an NVMe
  read or the optimizer could overwrite a buffer whose copy has not run yet.

`StagedCopies` on the host (`torch.device("cpu")`) copies synchronously. The engine never uses
it there for speed; it exists so that the staging bookkeeping (which copy belongs to which
version of a unit's parameters) can be tested on a machine without a GPU: with copies instead of
views, a stale copy gives different numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

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


class StagedCopies:
    """Copies of a unit's parameters in the compute device's memory, made ahead of use."""

    copies = True

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        # key -> (device tensors, the copy's event or None on the host)
        self._staged: dict[int, tuple[list[torch.Tensor], object]] = {}

    def staged(self, key: int) -> bool:
        return key in self._staged

    def stage(self, key: int, views: Sequence[torch.Tensor]) -> bool:
        """Start copying `views` (host tensors of unit `key`) to the device; False if already
        staged. The host buffer must not change until `drop(key)`."""
        if key in self._staged:
            return False
        if not self.is_cuda:
            self._staged[key] = ([view.clone() for view in views], None)
            return True
        # The copy must not start before the compute stream is done with anything it was
        # given earlier that this copy's allocations could reuse: the allocator takes care of
        # that through record_stream (see attach); the copy stream itself only reads the host.
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
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for tensor in copies:
                tensor.record_stream(compute)
        return copies

    def drop(self, key: int) -> None:
        """Forget unit `key`'s copies and wait until its host buffer is no longer being read."""
        entry = self._staged.pop(key, None)
        if entry is not None and entry[1] is not None:
            entry[1].synchronize()


def parameter_transfers(device: torch.device) -> HostViews | StagedCopies:
    """`HostViews` for host compute, `StagedCopies` (a copy stream) for a GPU."""
    return StagedCopies(device) if torch.device(device).type == "cuda" else HostViews()

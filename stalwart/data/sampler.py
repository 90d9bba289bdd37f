"""Deterministic, resumable sampling of global batches, and the batch iterator built on it.

The sampler describes one global sequence of sample indices: epoch 0's permutation, then
epoch 1's, and so on, each drawn from (seed, epoch) alone. A step consumes one *global* batch
from that sequence and every rank keeps the same cursor; a rank only chooses which contiguous
slice of the global batch it loads. Hence:

- the cursor (`state_dict()`: epoch and position, plain ints) is identical on every rank, and
  one rank's copy is enough to resume all of them;
- resuming with a different number of ranks continues the same global sequence: the union of
  the new ranks' slices is exactly the global batch the old ranks would have read;
- `drop_last=True` skips the tail of an epoch too short for a whole global batch, so a batch
  never mixes epochs; `drop_last=False` fills that batch from the start of the next epoch,
  so no sample is ever skipped and every batch still has the full size.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

_STATE_VERSION = 1


class ResumableSampler:
    def __init__(
        self, num_samples: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True
    ):
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"data.seed must be a non-negative int, got {seed!r}")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # samples of the current epoch already handed out
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    # -- the global sequence -----------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All sample indices of `epoch`, in the order they are handed out."""
        if self._order_epoch == epoch and self._order is not None:
            return self._order
        dtype = np.int32 if self.num_samples < 2**31 else np.int64
        if self.shuffle:
            # PCG64 seeded from (seed, epoch): any epoch can be regenerated without its
            # predecessors, which is what makes a resume O(1).
            generator = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            order = generator.permutation(self.num_samples).astype(dtype, copy=False)
        else:
            order = np.arange(self.num_samples, dtype=dtype)
        self._order_epoch, self._order = epoch, order
        return order

    def next_global_batch(self, global_batch_size: int) -> np.ndarray:
        """The next `global_batch_size` indices of the global sequence; advances the cursor."""
        if not isinstance(global_batch_size, int) or global_batch_size < 1:
            raise ValueError(f"global batch size must be a positive int, got {global_batch_size!r}")
        if self.drop_last and global_batch_size > self.num_samples:
            raise ValueError(
                f"global batch of {global_batch_size} samples is larger than the dataset "
                f"({self.num_samples} samples) with drop_last=True: no batch could ever be "
                "formed; lower trainer.batch_size, add data, or shorten model.context_length"
            )
        if self.drop_last and self.position + global_batch_size > self.num_samples:
            self.epoch, self.position = self.epoch + 1, 0
        pieces = []
        needed = global_batch_size
        while needed:
            order = self.epoch_order(self.epoch)
            take = min(needed, self.num_samples - self.position)
            pieces.append(order[self.position : self.position + take])
            self.position += take
            needed -= take
            if self.position == self.num_samples:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0].copy()

    def next_indices(self, global_batch_size: int, rank: int, world_size: int) -> list[int]:
        """This rank's contiguous slice of the next global batch; advances the shared cursor."""
        return self._rank_slice(self, global_batch_size, rank, world_size)

    def peek_indices(
        self, global_batch_size: int, rank: int, world_size: int, ahead: int = 1
    ) -> list[int]:
        """What `next_indices` will return `ahead` calls from now, without moving the cursor
        (for prefetching)."""
        if ahead < 1:
            raise ValueError(f"ahead must be >= 1, got {ahead}")
        lookahead = copy.copy(self)  # shares the cached permutation, which is never mutated
        for _ in range(ahead - 1):
            lookahead.next_global_batch(global_batch_size)
        return self._rank_slice(lookahead, global_batch_size, rank, world_size)

    @staticmethod
    def _rank_slice(
        sampler: ResumableSampler, global_batch_size: int, rank: int, world_size: int
    ) -> list[int]:
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
        if global_batch_size % world_size:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by world size "
                f"{world_size}; make trainer.batch_size a multiple of the number of ranks"
            )
        per_rank = global_batch_size // world_size
        batch = sampler.next_global_batch(global_batch_size)
        return batch[rank * per_rank : (rank + 1) * per_rank].tolist()

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "epoch": int(self.epoch),
            "position": int(self.position),
            "seed": int(self.seed),
            "num_samples": int(self.num_samples),
            "shuffle": bool(self.shuffle),
            "drop_last": bool(self.drop_last),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"epoch", "position", "seed", "num_samples"} - set(state)
        if missing:
            raise ValueError(f"sampler state lacks {sorted(missing)}: not a sampler state_dict")
        # Resuming on different data or another seed would silently train on another sequence.
        for field in ("seed", "num_samples", "shuffle", "drop_last"):
            if field in state and state[field] != getattr(self, field):
                raise ValueError(
                    f"sampler state was saved with {field}={state[field]!r} but this sampler has "
                    f"{field}={getattr(self, field)!r}: resume with the same data and data.seed"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_samples:
            raise ValueError(
                f"sampler state epoch={epoch}, position={position} is out of range for "
                f"{self.num_samples} samples"
            )
        self.epoch, self.position = epoch, position

    def __repr__(self) -> str:
        return (
            f"ResumableSampler(num_samples={self.num_samples}, seed={self.seed}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, epoch={self.epoch}, "
            f"position={self.position})"
        )


def _load_windows(dataset, indices: list[int]) -> torch.Tensor:
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    return torch.stack([dataset[index] for index in indices])


def batches(
    dataset,
    sampler: ResumableSampler,
    batch_size_per_rank: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    num_batches: int | None = None,
    prefetch: bool = False,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield this rank's `(inputs, targets)`, each [batch_size_per_rank, context_length] int64.

    Endless unless `num_batches` is given. The sampler advances by one global batch each time
    a batch is handed out, so `sampler.state_dict()` taken after consuming N batches resumes
    at batch N + 1. `dataset` needs `get_batch(indices)` (or `__getitem__`) returning windows
    of `context_length + 1` tokens.

    `prefetch=True` reads the next batch on a background thread while the caller computes.
    It peeks at the sampler instead of advancing it, so the resume guarantee is unchanged; if
    the sampler is moved by someone else meanwhile (a state load), the peeked batch is
    discarded. The dataset must not be read by others while this iterator is alive.
    """
    if not isinstance(batch_size_per_rank, int) or batch_size_per_rank < 1:
        raise ValueError(f"batch_size_per_rank must be a positive int, got {batch_size_per_rank!r}")
    if pin_memory and not torch.cuda.is_available():
        raise ValueError("batches(pin_memory=True) needs a CUDA device; pass pin_memory=False")
    global_batch_size = batch_size_per_rank * world_size
    executor = ThreadPoolExecutor(1, thread_name_prefix="stalwart-prefetch") if prefetch else None
    pending = None  # (indices, future) of the batch being read ahead
    produced = 0
    try:
        while num_batches is None or produced < num_batches:
            indices = sampler.next_indices(global_batch_size, rank, world_size)
            windows = None
            if pending is not None:
                peeked, future = pending
                pending = None
                loaded = future.result()  # always wait: the dataset is not thread-safe
                if peeked == indices:
                    windows = loaded
            if windows is None:
                windows = _load_windows(dataset, indices)
            produced += 1
            if executor is not None and (num_batches is None or produced < num_batches):
                upcoming = sampler.peek_indices(global_batch_size, rank, world_size)
                pending = (upcoming, executor.submit(_load_windows, dataset, upcoming))
            inputs = windows[:, :-1].contiguous()
            targets = windows[:, 1:].contiguous()
            if pin_memory:
                inputs, targets = inputs.pin_memory(), targets.pin_memory()
            yield inputs, targets
    finally:
        if pending is not None:
            pending[1].result()
        if executor is not None:
            executor.shutdown(wait=True)

"""Weights and learner state as one flat byte buffer plus JSON layout: how RL state travels.

Rollout actors receive the policy as a `Packed` (one `ray.put`, many zero-copy gets of a numpy
buffer); the driver keeps the learner's last state as a `Packed` outside the learner process,
so a replacement learner restores from it. The layout is `stalwart.snapshot.state`'s, the same
one the snapshot manager stores, so these buffers drop into the snapshot machinery unchanged.
Nothing here unpickles: the buffer is raw bytes, the metadata JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stalwart.snapshot.state import Layout, copy_into, layout_tree, unflatten


@dataclass
class Packed:
    version: int
    layout_json: str
    buffer: np.ndarray  # 1-D uint8

    @property
    def num_bytes(self) -> int:
        return int(self.buffer.nbytes)

    def as_tuple(self) -> tuple[int, str, np.ndarray]:
        """Plain (int, str, ndarray) for transport: Ray ships the array out of band."""
        return self.version, self.layout_json, self.buffer

    @classmethod
    def from_tuple(cls, value: tuple[int, str, np.ndarray]) -> Packed:
        version, layout_json, buffer = value
        return cls(int(version), str(layout_json), buffer)


def pack(tree: Any, version: int) -> Packed:
    """Copy a state tree (tensors + JSON leaves) into a fresh flat buffer."""
    tensors, layout = layout_tree(tree, extra={"version": int(version)})
    buffer = np.empty(layout.total_bytes, dtype=np.uint8)
    copy_into(tensors, layout, buffer)
    return Packed(int(version), layout.to_json(), buffer)


def unpack(packed: Packed) -> Any:
    """The state tree, with tensors copied out of the (possibly read-only) buffer."""
    return unflatten(Layout.from_json(packed.layout_json), None, packed.buffer, materialize=True)


def pack_model(model: torch.nn.Module, version: int) -> Packed:
    return pack({name: t.detach() for name, t in model.state_dict().items()}, version)


def load_model(model: torch.nn.Module, packed: Packed) -> None:
    model.load_state_dict(unpack(packed), strict=True)

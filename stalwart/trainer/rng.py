"""Every random number generator a rank uses, captured and restored exactly.

python's `random`, numpy's legacy global generator, torch's CPU generator and every CUDA
device's generator. States are tensors or JSON values (no pickle), so they travel in snapshots.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.uint32).view(np.int32).copy()),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gauss": float(cached_gauss),
        },
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = {
            str(i): torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())
        }
    return state


def load_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    numpy_state = state["numpy"]
    keys = numpy_state["keys"].numpy().view(np.uint32)
    np.random.set_state(
        (
            numpy_state["kind"],
            keys,
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gauss"],
        )
    )
    torch.set_rng_state(state["torch_cpu"].to(torch.uint8).clone())
    for index, cuda_state in state.get("torch_cuda", {}).items():
        if torch.cuda.is_available() and int(index) < torch.cuda.device_count():
            torch.cuda.set_rng_state(cuda_state.to(torch.uint8).clone(), int(index))

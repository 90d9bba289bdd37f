"""Shared test set-up: GPU tests skip without CUDA; every test runs with a fresh seed."""

import os

import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionstart(session):
    # A build killed mid-way leaves torch's extension lock behind; every later load of that
    # DeepSpeed op (ours or DeepSpeed's own, in the baselines) would wait on it forever.
    from stalwart.offload.ops import clear_stale_locks

    clear_stale_locks()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

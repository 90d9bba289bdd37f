"""Data parallelism applied from outside the model: DDP or FSDP2 (`fully_shard`).

gloo on CPU, NCCL on GPU. The model code never sees any of this. Also the process-group
set-up and teardown a worker needs, with the helpers that read and write parameters and
optimizer state as *local* tensors (an FSDP2 rank owns a shard; DDP ranks own a replica).
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn


def pick_backend(requested: str, device: torch.device) -> str:
    if requested != "auto":
        if requested == "nccl" and device.type != "cuda":
            raise ValueError(
                "parallel.backend 'nccl' needs CUDA devices; use 'gloo' or 'auto' on CPU"
            )
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def serve_store(host: str, timeout_s: float) -> dist.TCPStore:
    """A rendezvous store on a port the OS picks (port 0), for rank 0 to hold.

    Probing for a free port and binding it later races with every other process on the host;
    binding port 0 cannot. `store.port` is what the other ranks connect to.
    """
    return dist.TCPStore(
        host,
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A client of the store rank 0 serves at host:port."""
    return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def init_process_group(
    *,
    backend: str,
    master_addr: str,
    master_port: int,
    rank: int,
    world_size: int,
    timeout_s: float,
    store: dist.Store | None = None,
) -> None:
    """Join a fresh process group (a new rendezvous for every (re-)formation).

    With `store` (rank 0's from `serve_store`, the others' from `connect_store`) the group
    forms over it; without, every rank uses the tcp:// init method on master_addr:master_port.
    """
    if master_addr in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    else:
        dist.init_process_group(
            backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int = 0) -> None:
    """End a process that ran gloo collectives without finalizing the interpreter.

    torch keeps the default gloo group reachable after `destroy_process_group` (function
    defaults of `torch.distributed.nn.functional` bound after init, the DeviceMesh cache), so
    the group's worker threads outlive it. When one of them drops a finished collective's
    tensors while the interpreter is finalizing, it cannot take the GIL, unwinds through a
    noexcept destructor and aborts the process ("terminate called without an active
    exception", SIGABRT) after all its work is done: a spawned rank that returned normally
    then reads as crashed. Everything the process wrote is flushed first.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def parallelize(
    model: nn.Module,
    strategy: str,
    device: torch.device,
    *,
    fixed_buckets: bool = True,
    init_sync: bool = True,
) -> nn.Module:
    """Wrap the model for the chosen strategy; with one process (or 'none') it is returned as is.

    `fixed_buckets` (config `parallel.fixed_buckets`): DDP normally puts every gradient into one
    bucket for the first step and then rebuilds its buckets in the order gradients became ready.
    A worker group restarted from a snapshot would reduce its first step in the one-bucket
    layout while the original run used the rebuilt one; with three or more ranks the ring
    all-reduce then adds the same numbers in a different order and the run drifts by rounding.
    With fixed buckets the layout is the constructor's (reverse parameter order, first bucket
    1 MiB, then 25 MiB) for every step of every incarnation, so recovery stays bit-identical at
    any world size. DDP only skips the rebuild when it searches for unused parameters, so this
    costs one traversal of the autograd graph per step (and DDP logs a one-time notice that no
    unused parameter was found). Two ranks need none of this: a sum of two numbers has one
    order, so with two ranks DDP runs as it comes.

    `init_sync=False` skips DDP's broadcast of rank 0's parameters at construction (the whole
    model over the process group) for a caller that sets every rank's parameters to the same
    bytes itself right after (a standby worker restoring a snapshot).
    """
    if strategy == "none" or not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(
            model,
            device_ids=device_ids,
            find_unused_parameters=fixed_buckets and dist.get_world_size() > 2,
            init_sync=init_sync,
        )
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        blocks = getattr(model, "blocks", None)
        if blocks is not None:
            for block in blocks:
                fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"parallel.strategy {strategy!r} is not one of none, ddp, fsdp")


def unwrap(model: nn.Module) -> nn.Module:
    return (
        model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    )


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded) tensor this rank holds."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value

"""DDP and FSDP2 on CPU (gloo, 2 processes): reruns are bit-identical, seeds matter, replicas
agree, shards reassemble, and data parallelism computes what one process computes.

Each run spawns two fresh processes that train every variant in turn and write what they hold
(safetensors + JSON); a second run does the same, and the tests compare the files.
"""

import datetime
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from stalwart.config import load_config
from stalwart.trainer import parallel
from stalwart.trainer.loop import Trainer

WORLD_SIZE = 2
NUM_STEPS = 6
BASE = [
    "model.depth=1",
    "model.context_length=16",
    "data.num_examples=1000",
    "trainer.batch_size=8",
    "trainer.max_steps=20",
    "trainer.num_threads=1",
    "optim.warmup_steps=2",
]
VARIANTS = {
    "ddp": ["parallel.strategy=ddp"],
    "ddp-seed1": ["parallel.strategy=ddp", "trainer.seed=1"],
    "ddp-accum2": ["parallel.strategy=ddp", "trainer.grad_accum_steps=2"],
    "fsdp": ["parallel.strategy=fsdp"],
    "fsdp-seed1": ["parallel.strategy=fsdp", "trainer.seed=1"],
    "fsdp-accum2": ["parallel.strategy=fsdp", "trainer.grad_accum_steps=2"],
}


def join_group(rank: int, rendezvous: str) -> None:
    """A file rendezvous: a probed free TCP port can be taken by another process before the
    store binds it, and a rank that then talks to that process aborts."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        backend="gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )


def _full_parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter whole (a collective under FSDP: all ranks must call it)."""
    full = {}
    for name, tensor in parallel.unwrap(trainer.model).state_dict().items():
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        full[name] = tensor.detach().clone()
    return full


def _worker(rank: int, rendezvous: str, run_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    join_group(rank, rendezvous)
    try:
        for variant, overrides in VARIANTS.items():
            config = load_config(None, [*BASE, f"parallel.world_size={WORLD_SIZE}", *overrides])
            trainer = Trainer(config, rank=rank, world_size=WORLD_SIZE, run_dir=run_dir)
            metrics = [trainer.train_step() for _ in range(NUM_STEPS)]
            local = {
                name: tensor.contiguous().clone()
                for name, tensor in trainer.named_local_parameters()
            }
            save_file(local, f"{out_dir}/{variant}-rank{rank}.safetensors")
            full = _full_parameters(trainer)
            if rank == 0:
                save_file(full, f"{out_dir}/{variant}-full.safetensors")
            Path(f"{out_dir}/{variant}-rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        parallel.destroy_process_group()
    parallel.exit_process(0)


class Run:
    """What one two-process run left behind."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def local(self, variant: str, rank: int) -> dict[str, torch.Tensor]:
        return load_file(self.out_dir / f"{variant}-rank{rank}.safetensors")

    def full(self, variant: str) -> dict[str, torch.Tensor]:
        return load_file(self.out_dir / f"{variant}-full.safetensors")

    def metrics(self, variant: str, rank: int, key: str) -> list[float]:
        steps = json.loads((self.out_dir / f"{variant}-rank{rank}.json").read_text())
        return [step[key] for step in steps]

    def losses(self, variant: str, rank: int) -> list[float]:
        return self.metrics(variant, rank, "loss")


def spawn_run(run_dir: Path, out_dir: Path) -> Run:
    out_dir.mkdir()
    rendezvous = str(out_dir / "rendezvous")
    mp.spawn(_worker, args=(rendezvous, str(run_dir), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return Run(out_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Run, Run]:
    root = tmp_path_factory.mktemp("parallel")
    return spawn_run(root / "run", root / "first"), spawn_run(root / "run", root / "second")


def assert_bit_identical(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs"


def differs(first: dict, second: dict) -> bool:
    return any(not torch.equal(first[name], second[name]) for name in first)


# ---------------------------------------------------------------------------------------------
# DDP


def test_ddp_reruns_are_bit_identical(runs):
    first, second = runs
    for rank in range(WORLD_SIZE):
        assert_bit_identical(first.local("ddp", rank), second.local("ddp", rank))
        assert first.losses("ddp", rank) == second.losses("ddp", rank)


def test_ddp_replicas_agree_although_ranks_read_different_data(runs):
    first, _ = runs
    assert_bit_identical(first.local("ddp", 0), first.local("ddp", 1))
    # The reported loss is the all-reduced mean, the same number on every rank.
    assert first.losses("ddp", 0) == first.losses("ddp", 1)


def test_ddp_different_seed_differs(runs):
    first, _ = runs
    assert differs(first.local("ddp", 0), first.local("ddp-seed1", 0))


def test_ddp_with_grad_accumulation_trains_and_stays_deterministic(runs):
    first, second = runs
    for rank in range(WORLD_SIZE):
        assert_bit_identical(first.local("ddp-accum2", rank), second.local("ddp-accum2", rank))
    assert_bit_identical(first.local("ddp-accum2", 0), first.local("ddp-accum2", 1))
    losses = first.losses("ddp-accum2", 0)
    assert losses[-1] < losses[0] - 0.5, losses


def test_ddp_matches_a_single_process_on_the_same_global_batch(runs, tmp_path):
    """Averaged gradients of two half batches = the gradient of the whole batch (up to rounding)."""
    first, _ = runs
    config = load_config(None, [*BASE, "parallel.strategy=none"])
    single = Trainer(config, run_dir=tmp_path)
    single_metrics = [single.train_step() for _ in range(NUM_STEPS)]
    assert [m["loss"] for m in single_metrics] == pytest.approx(first.losses("ddp", 0), rel=1e-5)
    # Adam and clipping hide a gradient scale error in the weights; the norm does not.
    grad_norms = [m["grad_norm"] for m in single_metrics]
    assert grad_norms == pytest.approx(first.metrics("ddp", 0, "grad_norm"), rel=1e-4)
    single_parameters = dict(single.named_local_parameters())
    for name, tensor in first.local("ddp", 0).items():
        torch.testing.assert_close(tensor, single_parameters[name], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# FSDP2


def test_fsdp_reruns_are_bit_identical_per_shard_and_whole(runs):
    first, second = runs
    for rank in range(WORLD_SIZE):
        assert_bit_identical(first.local("fsdp", rank), second.local("fsdp", rank))
        assert first.losses("fsdp", rank) == second.losses("fsdp", rank)
    assert_bit_identical(first.full("fsdp"), second.full("fsdp"))


def test_fsdp_ranks_hold_disjoint_shards_of_the_whole(runs):
    first, _ = runs
    full = first.full("fsdp")
    shards = [first.local("fsdp", rank) for rank in range(WORLD_SIZE)]
    for name, whole in full.items():
        pieces = [shard[name] for shard in shards]
        assert sum(piece.shape[0] for piece in pieces) == whole.shape[0], name
        assert torch.equal(torch.cat(pieces), whole), name  # dim-0 shards, in rank order


def test_fsdp_different_seed_differs(runs):
    first, _ = runs
    assert differs(first.full("fsdp"), first.full("fsdp-seed1"))


def test_fsdp_and_ddp_compute_the_same_training(runs):
    first, _ = runs
    assert first.losses("fsdp", 0) == pytest.approx(first.losses("ddp", 0), rel=1e-5)
    fsdp_norms = first.metrics("fsdp", 0, "grad_norm")
    assert fsdp_norms == pytest.approx(first.metrics("ddp", 0, "grad_norm"), rel=1e-4)
    ddp = first.full("ddp")
    for name, tensor in first.full("fsdp").items():
        torch.testing.assert_close(tensor, ddp[name], atol=1e-5, rtol=0)


def test_fsdp_with_grad_accumulation_trains_and_matches_ddp(runs):
    first, second = runs
    for rank in range(WORLD_SIZE):
        assert_bit_identical(first.local("fsdp-accum2", rank), second.local("fsdp-accum2", rank))
    losses = first.losses("fsdp-accum2", 0)
    assert losses[-1] < losses[0] - 0.5, losses
    assert losses == pytest.approx(first.losses("ddp-accum2", 0), rel=1e-5)
    ddp = first.full("ddp-accum2")
    for name, tensor in first.full("fsdp-accum2").items():
        torch.testing.assert_close(tensor, ddp[name], atol=1e-5, rtol=0)

"""`stalwart train` with offload.device cpu|nvme: the Trainer delegates its step to the offload
engine and ends with the same bits as the in-memory Trainer; its state round-trips exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from stalwart.config import load_config
from stalwart.trainer.loop import Trainer

SMALL = [
    "model.depth=2",
    "model.context_length=16",
    "data.num_examples=400",
    "trainer.batch_size=4",
    "trainer.grad_accum_steps=2",
    "trainer.max_steps=10",
    "trainer.num_threads=1",
    "optim.warmup_steps=2",
    "optim.grad_clip=0.5",
    "parallel.strategy=none",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("offload-trainer-run")


def offload_overrides(nvme: Path, device: str = "nvme") -> list[str]:
    nvme.mkdir(exist_ok=True)
    return [
        f"offload.device={device}",
        f"offload.nvme_path={nvme}",
        "offload.max_host_memory_gb=4",
        "offload.optimizer_kernel=torch",
    ]


def make_trainer(run_dir: Path, *overrides: str) -> Trainer:
    return Trainer(load_config(None, [*SMALL, *overrides]), run_dir=run_dir)


def state_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = trainer.state_dict()
    tensors = {f"model/{name}": t.clone() for name, t in state["model"].items()}
    for name, entries in state["optim"].items():
        for key, value in entries.items():
            tensors[f"optim/{name}/{key}"] = value.detach().to("cpu").clone()
    return tensors


def assert_bit_identical(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == second[name].dtype, name
        assert torch.equal(first[name], second[name]), f"{name} differs"


@pytest.mark.parametrize("device", ["nvme", "cpu"])
def test_offloaded_trainer_equals_in_memory_trainer(run_dir, tmp_path, device):
    in_memory = make_trainer(run_dir)
    offloaded = make_trainer(run_dir, *offload_overrides(tmp_path / "nvme", device))
    assert offloaded.offload is not None
    expected = [in_memory.train_step() for _ in range(3)]
    measured = [offloaded.train_step() for _ in range(3)]
    # Clipping is active (grad_clip 0.5), so the speculative and deferred paths both ran.
    assert any(step["grad_norm"] > 0.5 for step in expected)
    for ours, theirs in zip(measured, expected):
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-6)
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        assert ours["lr"] == theirs["lr"]
    assert_bit_identical(state_tensors(in_memory), state_tensors(offloaded))
    assert offloaded.evaluate()["eval_loss"] == pytest.approx(
        in_memory.evaluate()["eval_loss"], rel=1e-6
    )
    offloaded.offload.close()


def test_offloaded_trainer_resumes_bit_identically(run_dir, tmp_path):
    straight = make_trainer(run_dir, *offload_overrides(tmp_path / "a"))
    for _ in range(3):
        straight.train_step()
    interrupted = make_trainer(run_dir, *offload_overrides(tmp_path / "b"))
    for _ in range(2):
        interrupted.train_step()
    saved = copy.deepcopy(interrupted.state_dict())
    interrupted.offload.close()
    resumed = make_trainer(run_dir, *offload_overrides(tmp_path / "c"))
    resumed.load_state_dict(saved)
    resumed.train_step()
    assert resumed.step == straight.step == 3
    assert_bit_identical(state_tensors(straight), state_tensors(resumed))
    for trainer in (straight, resumed):
        trainer.offload.close()


def test_bf16_offloaded_trainer_keeps_fp32_masters(run_dir, tmp_path):
    trainer = make_trainer(run_dir, *offload_overrides(tmp_path / "nvme"), "trainer.precision=bf16")
    before = state_tensors(trainer)
    metrics = [trainer.train_step() for _ in range(2)]
    after = state_tensors(trainer)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert all(t.dtype == torch.float32 for n, t in after.items() if n.startswith("model/"))
    changed = [n for n in before if n.startswith("model/") and not torch.equal(before[n], after[n])]
    assert changed
    working = trainer.offload.gather_parameters(working_copies=True)
    masters = trainer.offload.gather_parameters()
    for name, copy_ in working.items():
        assert copy_.dtype == torch.bfloat16
        assert torch.equal(copy_, masters[name].to(torch.bfloat16))
    trainer.offload.close()


def test_offload_with_several_ranks_or_a_quant_recipe_is_refused(run_dir, tmp_path):
    overrides = offload_overrides(tmp_path / "nvme")
    with pytest.raises(ValueError, match="world_size"):
        Trainer(load_config(None, [*SMALL, *overrides]), run_dir=run_dir, world_size=2)
    with pytest.raises(ValueError, match="quant.recipe"):
        make_trainer(run_dir, *overrides, "quant.recipe=mxfp8")

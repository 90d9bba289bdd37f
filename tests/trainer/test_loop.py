"""The Trainer in one process: determinism, learning, precision, hooks and exact resume."""

import copy
import math
import random
from pathlib import Path

import pytest
import torch

from stalwart.config import load_config
from stalwart.trainer.loop import Trainer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

SMALL = [
    "model.depth=1",
    "model.context_length=16",
    "data.num_examples=1000",
    "trainer.batch_size=8",
    "trainer.max_steps=20",
    "trainer.num_threads=1",
    "optim.warmup_steps=2",
    "parallel.strategy=none",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One run directory per module: the generated corpus is written once and reused."""
    return tmp_path_factory.mktemp("trainer-run")


def make_trainer(run_dir: Path, *overrides: str) -> Trainer:
    return Trainer(load_config(None, [*SMALL, *overrides]), run_dir=run_dir)


def parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in trainer.named_local_parameters()}


def train(trainer: Trainer, num_steps: int) -> list[dict[str, float]]:
    return [trainer.train_step() for _ in range(num_steps)]


def assert_bit_identical(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs"


def snapshot(state):
    """A deep copy of a state dict, as an in-memory snapshot would hold it."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: snapshot(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(snapshot(value) for value in state)
    return copy.copy(state)


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_bit_identical_parameters(run_dir):
    first, second = make_trainer(run_dir), make_trainer(run_dir)
    initial = parameters(first)
    first_losses = [m["loss"] for m in train(first, 6)]
    second_losses = [m["loss"] for m in train(second, 6)]
    assert first_losses == second_losses
    assert_bit_identical(parameters(first), parameters(second))
    # Not vacuous: every parameter moved.
    for name, tensor in parameters(first).items():
        assert not torch.equal(tensor, initial[name]), f"{name} never changed"


def test_different_seeds_give_different_parameters(run_dir):
    first, second = make_trainer(run_dir, "trainer.seed=0"), make_trainer(run_dir, "trainer.seed=1")
    train(first, 3)
    train(second, 3)
    first_parameters, second_parameters = parameters(first), parameters(second)
    assert any(not torch.equal(first_parameters[n], second_parameters[n]) for n in first_parameters)
    assert not torch.equal(
        first_parameters["blocks.0.attn.wq.weight"], second_parameters["blocks.0.attn.wq.weight"]
    )


def test_data_seed_changes_the_batches(run_dir):
    first, second = make_trainer(run_dir, "data.seed=0"), make_trainer(run_dir, "data.seed=1")
    assert train(first, 1)[0]["loss"] != train(second, 1)[0]["loss"]


def test_evaluation_does_not_disturb_training(run_dir):
    plain, evaluated = make_trainer(run_dir), make_trainer(run_dir)
    train(plain, 4)
    first_eval = evaluated.evaluate()
    for _ in range(4):
        evaluated.train_step()
        evaluated.evaluate()
    assert_bit_identical(parameters(plain), parameters(evaluated))
    assert math.isfinite(first_eval["eval_loss"])


def test_grad_accumulation_trains_and_stays_deterministic(run_dir):
    accumulated = [make_trainer(run_dir, "trainer.grad_accum_steps=2") for _ in range(2)]
    whole = make_trainer(run_dir, "trainer.grad_accum_steps=1")
    runs = [train(trainer, 10) for trainer in accumulated]
    assert [m["loss"] for m in runs[0]] == [m["loss"] for m in runs[1]]
    assert_bit_identical(parameters(accumulated[0]), parameters(accumulated[1]))
    # Two half batches average to the whole batch's loss (same parameters, same 8 windows).
    whole_first = whole.train_step()
    assert runs[0][0]["loss"] == pytest.approx(whole_first["loss"], rel=1e-6)
    assert runs[0][0]["grad_norm"] == pytest.approx(whole_first["grad_norm"], rel=1e-4)
    losses = [m["loss"] for m in runs[0]]
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses


# ---------------------------------------------------------------------------------------------
# Learning and precision


def test_loss_falls_on_arithmetic_over_60_steps(run_dir):
    trainer = make_trainer(
        run_dir,
        "model.depth=2",
        "model.context_length=32",
        "trainer.batch_size=16",
        "trainer.max_steps=60",
        "optim.lr=3e-3",
        "optim.warmup_steps=5",
    )
    before = trainer.evaluate()["eval_loss"]
    metrics = train(trainer, 60)
    after = trainer.evaluate()["eval_loss"]
    assert before == pytest.approx(math.log(259), abs=0.2)  # uniform over the vocabulary
    # The digits of random operands cap how low it can go; the format and the EOS are learned.
    assert after < 2.3 and after < before - 3.0, (before, after)
    assert sum(m["loss"] for m in metrics[-10:]) / 10 < 2.5
    assert trainer.step == 60 and trainer.totals["tokens"] == 60 * 16 * 32
    assert all(m["skipped"] == 0.0 for m in metrics)
    assert metrics[0]["lr"] == pytest.approx(3e-3 / 5)  # warmup starts at peak / warmup_steps


def test_bf16_autocast_runs_and_learns(run_dir):
    trainer = make_trainer(run_dir, "trainer.precision=bf16")
    fp32 = make_trainer(run_dir, "trainer.precision=fp32")
    losses = [m["loss"] for m in train(trainer, 10)]
    fp32_losses = [m["loss"] for m in train(fp32, 10)]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.5
    assert losses != fp32_losses  # autocast really changed the arithmetic ...
    assert losses[0] == pytest.approx(fp32_losses[0], abs=0.05)  # ... but not the model
    # Master weights and optimizer state stay in float32.
    assert all(t.dtype == torch.float32 for t in parameters(trainer).values())
    again = make_trainer(run_dir, "trainer.precision=bf16")
    assert [m["loss"] for m in train(again, 10)] == losses


# ---------------------------------------------------------------------------------------------
# Hooks


def test_hooks_run_at_their_points_of_the_step(run_dir):
    trainer = make_trainer(run_dir)
    events = []
    weight = trainer.model.blocks[0].attn.wq.weight

    def before_optimizer(step):
        events.append(("before_optimizer", step, weight.detach().clone()))

    trainer.phase_hooks.append(lambda phase, step: events.append((phase, step)))
    trainer.before_optimizer_hooks.append(before_optimizer)
    trainer.after_step_hooks.append(lambda step: events.append(("after_step", step)))
    start = weight.detach().clone()
    train(trainer, 2)
    names = [event[:2] for event in events]
    step_events = [
        ("forward", 1),
        ("backward", 1),
        ("before_optimizer", 1),
        ("optimizer", 1),
        ("after_step", 1),
    ]
    assert names == step_events + [(name, 2) for name, _ in step_events]
    # Parameters are still untouched when the before-optimizer hook runs.
    assert torch.equal(events[2][2], start)
    assert not torch.equal(events[7][2], start)


# ---------------------------------------------------------------------------------------------
# State


def _leaves(state, prefix=""):
    if isinstance(state, dict):
        for key, value in state.items():
            assert isinstance(key, str), f"{prefix}: key {key!r} is not a string"
            yield from _leaves(value, f"{prefix}.{key}")
    elif isinstance(state, list | tuple):
        for index, value in enumerate(state):
            yield from _leaves(value, f"{prefix}.{index}")
    else:
        yield prefix, state


def test_state_dict_holds_only_tensors_and_json_values(run_dir):
    trainer = make_trainer(run_dir)
    train(trainer, 2)
    state = trainer.state_dict()
    assert {"model", "optim", "schedule", "sampler", "rng", "step", "totals"} <= state.keys()
    for where, leaf in _leaves(state):
        assert isinstance(leaf, torch.Tensor | int | float | str | bool | type(None)), (where, leaf)
    assert set(state["optim"]["blocks.0.attn.wq.weight"]) >= {"exp_avg", "exp_avg_sq", "step"}


@pytest.mark.parametrize(
    "variant",
    [[], ["model.tie_embeddings=true", "trainer.grad_accum_steps=2"], ["trainer.precision=bf16"]],
    ids=["plain", "tied-accum", "bf16"],
)
def test_resume_from_state_dict_is_bit_identical(run_dir, variant):
    uninterrupted = make_trainer(run_dir, *variant)
    train(uninterrupted, 4)
    saved = snapshot(uninterrupted.state_dict())
    expected = [m["loss"] for m in train(uninterrupted, 5)]

    # A fresh trainer with another init seed: everything must come from the state.
    resumed = make_trainer(run_dir, *variant, "trainer.seed=99")
    resumed.load_state_dict(saved)
    assert resumed.step == 4
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch_cpu"])
    assert random.getstate()[1] == tuple(saved["rng"]["python"]["internal"])
    resumed_metrics = train(resumed, 5)
    assert [m["loss"] for m in resumed_metrics] == expected
    assert_bit_identical(parameters(resumed), parameters(uninterrupted))
    resumed_optim, uninterrupted_optim = (
        resumed.state_dict()["optim"],
        uninterrupted.state_dict()["optim"],
    )
    for name, entries in uninterrupted_optim.items():
        for key, value in entries.items():
            assert torch.equal(resumed_optim[name][key], value), f"optimizer {name}.{key}"
    assert resumed.sampler.state_dict() == uninterrupted.sampler.state_dict()
    assert resumed.schedule.state_dict() == uninterrupted.schedule.state_dict()
    assert resumed.totals == uninterrupted.totals


def test_load_state_dict_rejects_a_state_without_all_parameters(run_dir):
    trainer = make_trainer(run_dir)
    state = snapshot(trainer.state_dict())
    del state["model"]["lm_head.weight"]
    with pytest.raises(ValueError, match="lm_head.weight"):
        make_trainer(run_dir).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# The tiny example


def test_tiny_example_trains(tmp_path):
    config = load_config(EXAMPLES / "tiny.yaml", ["trainer.max_steps=40", "trainer.num_threads=1"])
    trainer = Trainer(config, run_dir=tmp_path)
    losses = [m["loss"] for m in train(trainer, 40)]
    assert sum(losses[-5:]) / 5 < losses[0] - 2.5, losses


def test_a_trainer_built_before_its_process_group_trains_like_one_built_after(run_dir):
    # A standby worker builds its Trainer first and attaches it when it gets a rank; with one
    # process (no group) the attach must change nothing about what is computed.
    first = make_trainer(run_dir)
    second = make_trainer(run_dir)
    second.attach_process_group(0, 1)
    assert second.rank == 0 and second.world_size == 1
    train(first, 3)
    train(second, 3)
    assert_bit_identical(parameters(first), parameters(second))


@pytest.mark.parametrize(
    "overrides",
    [("parallel.strategy=fsdp",), ("offload.device=cpu",)],
    ids=["fsdp", "offload"],
)
def test_attaching_later_is_refused_where_the_wrapper_changes_the_parameters(run_dir, overrides):
    config = load_config(None, [*SMALL, f"run_dir={run_dir}", *overrides])
    assert not Trainer.can_attach_later(config)


def test_can_attach_later_for_ddp_on_cpu(run_dir):
    config = load_config(None, [*SMALL, f"run_dir={run_dir}", "parallel.strategy=ddp"])
    assert Trainer.can_attach_later(config)

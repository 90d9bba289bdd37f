"""Recipes and convert(): which layers are quantized, config validation, and training the GPT
through the Trainer with every recipe; SR counters make a resumed run bit-identical."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stalwart.config import ConfigError, QuantConfig, load_config
from stalwart.models.gpt import GPT, GPTConfig, LMHead
from stalwart.quant.linear import QuantLinear
from stalwart.quant.recipes import (
    RECIPE_NAMES,
    convert,
    get_recipe,
    load_quant_state_dict,
    quant_state_dict,
    recipe_from_config,
)
from stalwart.trainer.loop import Trainer

QUANTIZING = [name for name in RECIPE_NAMES if get_recipe(name).converts]


def small_gpt(depth: int = 2) -> GPT:
    return GPT(GPTConfig(depth=depth, context_length=32, seed=0))


def quantized_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, QuantLinear)}


def test_recipe_names_cover_the_required_presets():
    required = {"bf16", "mxfp8", "mxint8", "mxfp4", "nvfp4", "nvint4_rht", "fp4_ue5m3"}
    assert required <= set(RECIPE_NAMES)


@pytest.mark.parametrize("name", QUANTIZING)
def test_convert_swaps_block_linears_and_keeps_parameters(name):
    model = small_gpt()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    parameters = dict(model.named_parameters())
    convert(model, name)
    assert quantized_names(model) == {
        f"blocks.{i}.{part}"
        for i in range(2)
        for part in (
            "attn.wq",
            "attn.wk",
            "attn.wv",
            "attn.wo",
            "mlp.w_gate",
            "mlp.w_up",
            "mlp.w_down",
        )
    }
    assert type(model.lm_head) is LMHead and type(model.token_embedding) is nn.Embedding
    # same Parameter objects, same state_dict keys and values: checkpoints keep working
    assert all(p is parameters[n] for n, p in model.named_parameters())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)
    small_gpt().load_state_dict(after, strict=True)
    model.load_state_dict(before, strict=True)


def test_no_conversion_recipes_leave_the_model_alone():
    for name in ("bf16", "none"):
        model = small_gpt()
        assert convert(model, name) is model and not quantized_names(model)


def test_first_and_last_blocks_and_module_patterns_stay_high_precision():
    model = convert(
        small_gpt(depth=4), get_recipe("nvfp4", keep_first_blocks=1, keep_last_blocks=1)
    )
    assert {name.split(".")[1] for name in quantized_names(model)} == {"1", "2"}
    model = convert(small_gpt(), get_recipe("mxfp8", keep_modules=["lm_head", "*.mlp.*"]))
    assert quantized_names(model) and all(".attn." in name for name in quantized_names(model))


def test_convert_accepts_a_config_section_and_seeds_layers_differently():
    config = QuantConfig(recipe="nvfp4", seed=5, wgrad={"hadamard_size": 0})
    model = convert(small_gpt(), config)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers[0].recipe.wgrad.hadamard_size == 0
    assert len({layer.seed for layer in layers}) == len(layers)
    again = convert(small_gpt(), QuantConfig(recipe="nvfp4", seed=5, wgrad={"hadamard_size": 0}))
    assert [m.seed for m in again.modules() if isinstance(m, QuantLinear)] == [
        layer.seed for layer in layers
    ]


def test_overrides_per_gemm_and_per_operand():
    recipe = get_recipe(
        "nvfp4",
        forward={"element": "int4"},
        dgrad={"grad_output": {"rounding": "nearest"}},
        wgrad={"hadamard_size": 0, "input": {"scale_format": "ue5m3"}},
    )
    linear = recipe.linear
    assert linear.forward.a.element == linear.forward.b.element == "int4"
    assert linear.forward.b.block_2d  # untouched fields keep the preset's values
    assert linear.dgrad.a.rounding == "nearest" and linear.dgrad.b.rounding == "nearest"
    assert linear.wgrad.hadamard_size == 0
    assert linear.wgrad.b.scale_format == "ue5m3" and linear.wgrad.a.scale_format == "e4m3"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["quant.recipe=mxfp9"], "'quant.recipe'.*allowed: bf16, none, mxfp8"),
        (["quant.recipe=mxfp8", "quant.forward.elemnt=e4m3"], "unknown key quant.forward.elemnt"),
        (["quant.recipe=mxfp8", "quant.dgrad.input.element=e4m3"], "unknown key quant.dgrad.input"),
        (["quant.recipe=mxfp8", "quant.wgrad.input.element=e9m9"], "unknown element format 'e9m9'"),
        (["quant.recipe=mxfp8", "quant.forward.scaling=nv"], "quant.forward.input: scaling 'nv'"),
        (["quant.recipe=mxint8", "quant.forward.rounding=up"], "unknown rounding 'up'"),
        (["quant.recipe=nvfp4", "quant.wgrad.hadamard_size=12"], "quant.wgrad: hadamard_size"),
        (["quant.recipe=mxfp8", "quant.forward.block_2d=true"], None),
        (["quant.recipe=fp8_tensorwise", "quant.forward.block_2d=true"], "block_2d needs block"),
        (["quant.keep_last_blocks=-1"], "keep_last_blocks"),
    ],
)
def test_config_errors_name_the_key_and_the_allowed_values(overrides, message):
    if message is None:
        load_config(None, overrides)  # a valid combination
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_recipe_from_config_matches_get_recipe():
    config = load_config(None, ["quant.recipe=fp4_ue5m3", "quant.keep_first_blocks=1"])
    assert recipe_from_config(config.quant) == get_recipe("fp4_ue5m3", keep_first_blocks=1)


# ---------------------------------------------------------------------------------------------
# Training through the Trainer

SMALL = [
    "model.depth=1",
    "model.context_length=32",
    "data.num_examples=400",
    "trainer.batch_size=8",
    "trainer.max_steps=4",
    "trainer.num_threads=1",
    "optim.warmup_steps=1",
    "parallel.strategy=none",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quant-trainer")  # the corpus is generated once


def train_losses(run_dir: Path, recipe: str, num_steps: int = 4) -> tuple[list[float], Trainer]:
    trainer = Trainer(load_config(None, [*SMALL, f"quant.recipe={recipe}"]), run_dir=run_dir)
    return [trainer.train_step()["loss"] for _ in range(num_steps)], trainer


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_trainer_trains_the_gpt_with_each_recipe(run_dir, recipe):
    losses, trainer = train_losses(run_dir, recipe)
    converted = quantized_names(trainer.model)
    assert bool(converted) == get_recipe(recipe).converts
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3  # it learns


def test_quantized_training_differs_from_bf16_but_stays_close(run_dir):
    baseline, _ = train_losses(run_dir, "bf16")
    mxint8, _ = train_losses(run_dir, "mxint8")
    nvfp4, _ = train_losses(run_dir, "nvfp4")
    assert mxint8 != baseline and nvfp4 != baseline
    assert abs(mxint8[-1] - baseline[-1]) < abs(nvfp4[-1] - baseline[-1]) + 0.02
    assert abs(nvfp4[-1] / baseline[-1] - 1) < 0.05


def test_stochastic_rounding_recipes_are_deterministic(run_dir):
    first, _ = train_losses(run_dir, "nvfp4", num_steps=3)
    second, _ = train_losses(run_dir, "nvfp4", num_steps=3)
    assert first == second


def test_resume_with_quant_state_is_bit_identical():
    """Model + optimizer + SR counters restored -> the continuation matches exactly; without
    the counters the stochastic rounding replays other bits and the run diverges."""
    tokens = torch.randint(0, 259, (8, 33), generator=torch.Generator().manual_seed(0))

    def step(model, optimizer):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    def fresh():
        model = convert(GPT(GPTConfig(depth=1, context_length=32, seed=0)), "nvfp4")
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, optimizer = fresh()
    for _ in range(2):
        step(model, optimizer)
    saved = (
        {k: v.clone() for k, v in model.state_dict().items()},
        copy.deepcopy(optimizer.state_dict()),  # its tensors are updated in place otherwise
        quant_state_dict(model),
    )
    continued = [step(model, optimizer) for _ in range(2)]

    def resumed(with_quant_state: bool):
        model, optimizer = fresh()
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
        if with_quant_state:
            load_quant_state_dict(model, saved[2])
        return [step(model, optimizer) for _ in range(2)]

    assert resumed(True) == continued
    assert resumed(False) != continued
    with pytest.raises(ValueError, match="does not match the model's quantized layers"):
        load_quant_state_dict(fresh()[0], {"blocks.0.attn.wq": saved[2]["blocks.0.attn.wq"]})


def test_an_lm_head_left_out_of_keep_modules_is_quantized_in_the_forward():
    """GPT calls its head as a module: converting it changes the logits. (It once applied the
    head's weight with F.linear, so a converted head was silently never used.)"""
    tokens = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = small_gpt()
    model = convert(small_gpt(), get_recipe("mxfp4", keep_modules=["blocks.*"]))
    assert quantized_names(model) == {"lm_head"}
    with torch.no_grad():
        assert not torch.equal(model(tokens), reference(tokens))
        kept = convert(small_gpt(), get_recipe("mxfp4", keep_modules=["blocks.*", "lm_head"]))
        assert torch.equal(kept(tokens), reference(tokens))

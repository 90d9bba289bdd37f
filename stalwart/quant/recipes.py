"""Named low-precision recipes and `convert(model, recipe)`, which applies one to a model.

A recipe names, for each GEMM of a linear layer (forward, dgrad, wgrad), the format, scaling
and rounding of both operands and the Hadamard transform, plus which layers stay in high
precision. `convert` swaps every `nn.Linear` that is not kept for a `QuantLinear` holding the
very same parameters (names, objects and state_dict keys are unchanged).

Presets (operands: forward input x weight; dgrad grad_output x weight; wgrad grad_output x input)
- bf16 / none: no conversion; linears run at trainer.precision. The baseline.
- mxfp8: E4M3 everywhere (gradients too: E5M2 gradients diverged at 8B in Megatron-Bridge #638),
  MX blocks of 32, E8M0 scales rounded up ("ceil", the MXFP8 recipe of arXiv 2506.08027), RNE.
  The OCP floor rule measured a smaller gap on the tiny benchmark GPT, within its seed noise;
  the preset follows the paper, where the OCP rounding made LLM pre-training diverge and
  rounding up trained an 8B model on 15T tokens (docs/quant.md).
- mxint8: MXINT8 everywhere (symmetric [-127, 127]), MX 32, ceil, RNE (arXiv 2510.25602).
- mxfp4: E2M1 everywhere, MX 32, ceil, RNE, no transform: plain MXFP4, the FP4 baseline.
- nvfp4: E2M1, NV blocks of 16 with E4M3 scale + FP32 tensor scale, 16x16 blocks for weights,
  stochastic rounding on gradients, 16-point random Hadamard on the wgrad inputs (NVFP4
  pretraining recipe, arXiv 2509.25149; TE's NVFP4BlockScaling defaults).
- nvint4_rht: INT4 [-7, 7], NV blocks of 16 (E4M3 + FP32), 16-point random Hadamard on all three
  GEMMs (without it NVINT4 loses to NVFP4, with it it wins: arXiv 2510.25602), SR on gradients.
- fp4_ue5m3: nvfp4's settings with UE5M3 block scales (Hadamard + tensor scaling + SR + UE5M3:
  the combination arXiv 2509.17791 found best, and "UE5M3 with TE settings" in 2609.02846).
- fp8_tensorwise: FP8 with one FP32 scale per tensor, E4M3 activations/weights and E5M2
  gradients; runs natively through torch._scaled_mm on CUDA capability 8.9+.
High precision: embeddings are never converted (not nn.Linear); `lm_head` is kept by default
(GPT calls its LM head weight directly in FP32 anyway). `keep_first_blocks` / `keep_last_blocks`
keep whole transformer blocks (the NVFP4 paper keeps ~15% of linears: the first 2 and last 8 of
62 blocks); `keep_modules` takes fnmatch patterns of module names.

Overrides (config `quant.forward` / `quant.dgrad` / `quant.wgrad`): a mapping per GEMM whose
keys are QuantSpec fields (applied to both operands), `hadamard_size`, `hadamard_seed`, or an
operand name (`input`, `weight`, `grad_output`) mapping to QuantSpec fields for that operand.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from stalwart.quant.linear import GEMM_OPERANDS, GemmQuant, LinearQuant, QuantLinear
from stalwart.quant.mx import QuantSpec
from stalwart.quant.rounding import mix_seed

__all__ = [
    "Recipe",
    "RECIPE_NAMES",
    "get_recipe",
    "recipe_from_config",
    "convert",
    "quant_state_dict",
    "load_quant_state_dict",
]

_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:blocks|layers|h|layer)\.(\d+)(?:\.|$)")
_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(QuantSpec))
_GEMM_FIELDS = ("hadamard_size", "hadamard_seed")


@dataclass(frozen=True)
class Recipe:
    name: str
    linear: LinearQuant | None  # None: the model is left as it is
    keep_modules: tuple[str, ...] = ("lm_head",)
    keep_first_blocks: int = 0
    keep_last_blocks: int = 0
    description: str = ""

    @property
    def converts(self) -> bool:
        return self.linear is not None and not self.linear.is_identity

    def describe(self) -> str:
        """One line per GEMM: the operand formats and the transform."""
        if not self.converts:
            return f"{self.name}: no conversion"
        lines = [f"{self.name}: {self.description}"]
        for gemm_name, operands in GEMM_OPERANDS.items():
            gemm = getattr(self.linear, gemm_name)
            text = f"{operands[0]}={gemm.a.describe()} {operands[1]}={gemm.b.describe()}"
            if gemm.hadamard_size:
                text += f" hadamard={gemm.hadamard_size}"
            lines.append(f"  {gemm_name:8s} {text}")
        kept = list(self.keep_modules)
        if self.keep_first_blocks:
            kept.append(f"first {self.keep_first_blocks} blocks")
        if self.keep_last_blocks:
            kept.append(f"last {self.keep_last_blocks} blocks")
        lines.append(f"  high precision: {', '.join(kept) or 'nothing'}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Presets


def _mx(element: str, rounding: str = "nearest") -> QuantSpec:
    return QuantSpec(
        element=element, scaling="mx", block_size=32, scale_rounding="ceil", rounding=rounding
    )


def _nv(element: str, scale: str, rounding: str = "nearest", block_2d: bool = False) -> QuantSpec:
    return QuantSpec(
        element=element,
        scaling="nv",
        block_size=16,
        scale_format=scale,
        rounding=rounding,
        block_2d=block_2d,
    )


def _uniform(spec: QuantSpec) -> LinearQuant:
    gemm = GemmQuant(spec, spec)
    return LinearQuant(gemm, gemm, gemm)


def _nvfp4_like(scale: str) -> LinearQuant:
    activation = _nv("e2m1", scale)
    weight = _nv("e2m1", scale, block_2d=True)
    gradient = _nv("e2m1", scale, rounding="stochastic")
    return LinearQuant(
        forward=GemmQuant(activation, weight),
        dgrad=GemmQuant(gradient, weight),
        wgrad=GemmQuant(gradient, activation, hadamard_size=16),
    )


def _nvint4_rht() -> LinearQuant:
    value = _nv("int4", "e4m3")
    gradient = _nv("int4", "e4m3", rounding="stochastic")
    return LinearQuant(
        forward=GemmQuant(value, value, hadamard_size=16),
        dgrad=GemmQuant(gradient, value, hadamard_size=16),
        wgrad=GemmQuant(gradient, value, hadamard_size=16),
    )


def _fp8_tensorwise() -> LinearQuant:
    e4m3 = QuantSpec(element="e4m3", scaling="tensor")
    e5m2 = QuantSpec(element="e5m2", scaling="tensor")
    return LinearQuant(GemmQuant(e4m3, e4m3), GemmQuant(e5m2, e4m3), GemmQuant(e5m2, e4m3))


_PRESETS: dict[str, tuple[LinearQuant | None, str]] = {
    "bf16": (None, "no conversion (linears run at trainer.precision)"),
    "none": (None, "no conversion"),
    "mxfp8": (_uniform(_mx("e4m3")), "MXFP8 E4M3 everywhere, E8M0 scales rounded up"),
    "mxint8": (_uniform(_mx("int8")), "MXINT8 (symmetric) everywhere, E8M0 scales rounded up"),
    "mxfp4": (_uniform(_mx("e2m1")), "MXFP4 E2M1 everywhere, RNE, no transform"),
    "nvfp4": (_nvfp4_like("e4m3"), "NVFP4: 2-D weight blocks, SR on gradients, RHT16 on wgrad"),
    "nvint4_rht": (_nvint4_rht(), "NVINT4 with RHT16 on every GEMM, SR on gradients"),
    "fp4_ue5m3": (_nvfp4_like("ue5m3"), "E2M1 with UE5M3 block + FP32 tensor scales, RHT, SR"),
    "fp8_tensorwise": (_fp8_tensorwise(), "FP8 tensor scaling: E4M3 forward, E5M2 gradients"),
}
RECIPE_NAMES = tuple(_PRESETS)


def get_recipe(
    name: str,
    *,
    forward: Mapping[str, Any] | None = None,
    dgrad: Mapping[str, Any] | None = None,
    wgrad: Mapping[str, Any] | None = None,
    keep_modules: list[str] | tuple[str, ...] | None = None,
    keep_first_blocks: int | None = None,
    keep_last_blocks: int | None = None,
    native_fp8: bool | None = None,
) -> Recipe:
    """A preset by name, with optional per-GEMM overrides (see the module docstring)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown quant recipe {name!r}; allowed: {', '.join(RECIPE_NAMES)}")
    linear, description = _PRESETS[name]
    overrides = {"forward": forward or {}, "dgrad": dgrad or {}, "wgrad": wgrad or {}}
    if any(overrides.values()):
        linear = linear or LinearQuant()
        changed = {
            gemm_name: _override_gemm(gemm_name, getattr(linear, gemm_name), values)
            for gemm_name, values in overrides.items()
            if values
        }
        linear = dataclasses.replace(linear, **changed)
        description += " (with overrides)"
    if native_fp8 is not None and linear is not None:
        linear = dataclasses.replace(linear, native_fp8=native_fp8)
    for key, value in (
        ("keep_first_blocks", keep_first_blocks),
        ("keep_last_blocks", keep_last_blocks),
    ):
        if value is not None and value < 0:
            raise ValueError(f"quant.{key} must be >= 0, got {value}")
    return Recipe(
        name=name,
        linear=linear,
        keep_modules=tuple(keep_modules) if keep_modules is not None else ("lm_head",),
        keep_first_blocks=keep_first_blocks or 0,
        keep_last_blocks=keep_last_blocks or 0,
        description=description,
    )


def _override_gemm(gemm_name: str, gemm: GemmQuant, values: Mapping[str, Any]) -> GemmQuant:
    operand_a, operand_b = GEMM_OPERANDS[gemm_name]
    allowed = (*_SPEC_FIELDS, *_GEMM_FIELDS, operand_a, operand_b)
    if not isinstance(values, Mapping):
        raise ValueError(f"quant.{gemm_name} must be a mapping of overrides, got {values!r}")
    both: dict[str, Any] = {}
    per_operand: dict[str, dict[str, Any]] = {operand_a: {}, operand_b: {}}
    gemm_changes: dict[str, Any] = {}
    for key, value in values.items():
        if key in _SPEC_FIELDS:
            both[key] = value
        elif key in _GEMM_FIELDS:
            gemm_changes[key] = value
        elif key in per_operand:
            if not isinstance(value, Mapping):
                raise ValueError(
                    f"quant.{gemm_name}.{key} must be a mapping of QuantSpec fields "
                    f"({', '.join(_SPEC_FIELDS)}), got {value!r}"
                )
            for spec_key in value:
                if spec_key not in _SPEC_FIELDS:
                    raise ValueError(
                        f"unknown key quant.{gemm_name}.{key}.{spec_key}; allowed: "
                        f"{', '.join(_SPEC_FIELDS)}"
                    )
            per_operand[key] = dict(value)
        else:
            raise ValueError(f"unknown key quant.{gemm_name}.{key}; allowed: {', '.join(allowed)}")
    specs = {}
    for slot, operand in (("a", operand_a), ("b", operand_b)):
        changes = {**both, **per_operand[operand]}
        try:
            specs[slot] = dataclasses.replace(getattr(gemm, slot), **changes)
        except (ValueError, TypeError) as error:
            raise ValueError(f"quant.{gemm_name}.{operand}: {error}") from None
    try:
        return dataclasses.replace(gemm, **specs, **gemm_changes)
    except (ValueError, TypeError) as error:
        raise ValueError(f"quant.{gemm_name}: {error}") from None


def recipe_from_config(config: Any) -> Recipe:
    """The recipe a `QuantConfig` (or any object with the same attributes) describes."""
    return get_recipe(
        config.recipe,
        forward=getattr(config, "forward", None),
        dgrad=getattr(config, "dgrad", None),
        wgrad=getattr(config, "wgrad", None),
        keep_modules=getattr(config, "keep_modules", None),
        keep_first_blocks=getattr(config, "keep_first_blocks", None),
        keep_last_blocks=getattr(config, "keep_last_blocks", None),
        native_fp8=getattr(config, "native_fp8", None),
    )


# ---------------------------------------------------------------------------------------------
# Conversion


def _block_index(name: str) -> int | None:
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def _is_kept(name: str, recipe: Recipe, num_blocks: int) -> bool:
    short_name = name.rsplit(".", 1)[-1]
    for pattern in recipe.keep_modules:
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(short_name, pattern):
            return True
    index = _block_index(name)
    if index is None:
        return False
    return index < recipe.keep_first_blocks or index >= num_blocks - recipe.keep_last_blocks


def layer_seed(seed: int, name: str) -> int:
    """The stochastic-rounding seed of one layer: stable across processes (no hash salt)."""
    return mix_seed(seed, zlib.crc32(name.encode()))


def convert(model: nn.Module, recipe: str | Recipe | Any = "mxfp8", *, seed: int | None = None):
    """Replace the model's nn.Linear layers (except the kept ones) by QuantLinear, in place.

    `recipe` is a preset name, a `Recipe`, or a `QuantConfig`-like object (its `seed` is used
    unless `seed` is given). Returns the model. Layers converted before are left alone.
    """
    if isinstance(recipe, str):
        resolved = get_recipe(recipe)
    elif isinstance(recipe, Recipe):
        resolved = recipe
    elif hasattr(recipe, "recipe"):
        resolved = recipe_from_config(recipe)
        seed = getattr(recipe, "seed", 0) if seed is None else seed
    else:
        raise ValueError(
            f"recipe must be a name ({', '.join(RECIPE_NAMES)}), a Recipe or a QuantConfig; "
            f"got {type(recipe).__name__}"
        )
    seed = 0 if seed is None else seed
    model.quant_recipe = resolved
    if not resolved.converts:
        return model
    linears = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, QuantLinear)
    ]
    indices = [i for i in (_block_index(name) for name, _ in linears) if i is not None]
    num_blocks = max(indices) + 1 if indices else 0
    for name, module in linears:
        if _is_kept(name, resolved, num_blocks):
            continue
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantized = QuantLinear.from_linear(module, resolved.linear, seed=layer_seed(seed, name))
        setattr(parent, attribute, quantized)
    return model


def quant_state_dict(model: nn.Module) -> dict[str, dict[str, int]]:
    """The stochastic-rounding counters of every QuantLinear (JSON-serialisable)."""
    return {
        name: module.quant_state()
        for name, module in model.named_modules()
        if isinstance(module, QuantLinear)
    }


def load_quant_state_dict(model: nn.Module, state: Mapping[str, Mapping[str, int]]) -> None:
    layers = {
        name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)
    }
    if set(layers) != set(state):
        missing = sorted(set(layers) - set(state))[:5]
        unexpected = sorted(set(state) - set(layers))[:5]
        raise ValueError(
            f"quant state does not match the model's quantized layers: missing {missing}, "
            f"unexpected {unexpected} (was the model converted with the same recipe?)"
        )
    for name, layer in layers.items():
        layer.load_quant_state(state[name])

"""A linear layer whose three GEMMs run on quantized operands.

For Y = X W^T + b the layer computes, as one autograd function,
    forward  Y  = Q(X)   Q(W)^T      reduce over in_features   (operands: input, weight)
    dgrad    dX = Q(dY)  Q(W)        reduce over out_features  (operands: grad_output, weight)
    wgrad    dW = Q(dY)^T Q(X)       reduce over tokens        (operands: grad_output, input)
Each of the six operands is quantized along its GEMM's reduction dimension with its own
`QuantSpec` (format, scaling, rounding), and each GEMM may rotate both operands with the same
random Hadamard transform first (`GemmQuant.hadamard_size`), which leaves the product unchanged.
The bias and its gradient stay in high precision.

Emulation is the reference: operands are quantized, decoded to fp32 (element * block scale,
exact), multiplied in fp32, and the tensor scales applied in the epilogue. Where the hardware
has a native kernel the GEMM uses it instead: FP8 tensor-scaled operands (e4m3/e5m2) go through
torch._scaled_mm on CUDA devices of compute capability 8.9+ (Ada, Hopper, Blackwell); the
`gpu` tests check it against emulation. MX/NVFP4 native GEMMs (Blackwell) are not wired in.

Stochastic rounding draws from generators seeded by (layer seed, call counter, GEMM, operand),
so a run is reproducible; the counters are the layer's only state (`quant_state`), exposed so a
resumed run continues bit-identically (recipes.quant_state_dict gathers them for a model).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from stalwart.quant.mx import QuantSpec, quantize_for_gemm
from stalwart.quant.rounding import make_generator, mix_seed
from stalwart.quant.transforms import HadamardTransform

__all__ = [
    "GemmQuant",
    "LinearQuant",
    "QuantLinear",
    "quantized_matmul",
    "native_fp8_available",
    "GEMM_OPERANDS",
]

# The two operands of each GEMM, in (a, b) order for C = a @ b^T.
GEMM_OPERANDS = {
    "forward": ("input", "weight"),
    "dgrad": ("grad_output", "weight"),
    "wgrad": ("grad_output", "input"),
}
_FP8_ELEMENTS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class GemmQuant:
    """Quantization of one GEMM C = a b^T; both operands are reduced along their last dim."""

    a: QuantSpec = field(default_factory=QuantSpec)
    b: QuantSpec = field(default_factory=QuantSpec)
    hadamard_size: int = 0  # 0 = no transform; else a power of two (16, 32, 64, ...)
    hadamard_seed: int | None = 0  # random sign vector seed; None = plain Hadamard

    def __post_init__(self) -> None:
        size = self.hadamard_size
        if not isinstance(size, int) or isinstance(size, bool):
            raise ValueError(f"hadamard_size must be an integer, got {size!r}")
        if self.hadamard_seed is not None and not isinstance(self.hadamard_seed, int):
            raise ValueError(
                f"hadamard_seed must be an integer or null, got {self.hadamard_seed!r}"
            )
        if size and (size < 2 or size & (size - 1)):
            raise ValueError(
                f"hadamard_size must be 0 (off) or a power of two >= 2 (16, 32, 64, ...), "
                f"got {size}"
            )

    @property
    def is_identity(self) -> bool:
        return self.a.is_identity and self.b.is_identity and not self.hadamard_size

    def describe(self) -> str:
        text = f"{self.a.describe()} x {self.b.describe()}"
        if self.hadamard_size:
            kind = "rht" if self.hadamard_seed is not None else "ht"
            text += f" {kind}{self.hadamard_size}"
        return text


@dataclass(frozen=True)
class LinearQuant:
    """The three GEMMs of a linear layer (see the module docstring for operand order)."""

    forward: GemmQuant = field(default_factory=GemmQuant)
    dgrad: GemmQuant = field(default_factory=GemmQuant)
    wgrad: GemmQuant = field(default_factory=GemmQuant)
    native_fp8: bool = True  # use torch._scaled_mm for eligible FP8 GEMMs on capable GPUs

    @property
    def is_identity(self) -> bool:
        return self.forward.is_identity and self.dgrad.is_identity and self.wgrad.is_identity


def native_fp8_available(device: torch.device) -> bool:
    """FP8 tensor-core GEMMs: CUDA compute capability 8.9+ (Ada, Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _native_fp8_eligible(a: torch.Tensor, b: torch.Tensor, gemm: GemmQuant) -> bool:
    if not native_fp8_available(a.device):
        return False
    specs = (gemm.a, gemm.b)
    if any(s.scaling != "tensor" or s.element not in _FP8_ELEMENTS for s in specs):
        return False
    if gemm.a.element == "e5m2" and gemm.b.element == "e5m2":
        return False  # cuBLASLt has no e5m2 x e5m2 kernel
    return a.shape[0] % 16 == 0 and a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0


@functools.lru_cache(maxsize=64)
def _hadamard(size: int, seed: int | None) -> HadamardTransform:
    """One transform (and its cached matrices) per (size, seed), shared by all layers."""
    return HadamardTransform(size, seed)


def quantized_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    gemm: GemmQuant,
    *,
    generator_a: torch.Generator | None = None,
    generator_b: torch.Generator | None = None,
    allow_native: bool = True,
) -> torch.Tensor:
    """fp32 a @ b^T for 2-D a [M, K], b [N, K], each quantized along K per `gemm`."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"reduction dims differ: a {tuple(a.shape)} vs b {tuple(b.shape)}")
    a, b = a.float(), b.float()
    if gemm.hadamard_size:
        size = gemm.hadamard_size
        pad = -a.shape[-1] % size
        if pad:  # zeros along K on both operands leave the product unchanged
            a, b = F.pad(a, (0, pad)), F.pad(b, (0, pad))
        transform = _hadamard(size, gemm.hadamard_seed)
        a, b = transform.apply(a), transform.apply(b)
    a_values, a_scale = quantize_for_gemm(a, gemm.a, -1, generator=generator_a)
    b_values, b_scale = quantize_for_gemm(b, gemm.b, -1, generator=generator_b)
    if allow_native and _native_fp8_eligible(a_values, b_values, gemm):
        return torch._scaled_mm(
            a_values.to(_FP8_ELEMENTS[gemm.a.element]).contiguous(),
            b_values.to(_FP8_ELEMENTS[gemm.b.element]).contiguous().t(),
            scale_a=a_scale.reshape(1),
            scale_b=b_scale.reshape(1),
            out_dtype=torch.float32,
            use_fast_accum=False,
        )
    out = a_values @ b_values.t()
    if gemm.a.scaling in ("nv", "tensor") or gemm.b.scaling in ("nv", "tensor"):
        out.mul_(a_scale * b_scale)  # the tensor scales, in the epilogue
    return out


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _QuantLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        recipe: LinearQuant = layer.recipe
        output_dtype = _output_dtype(x)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.input_dtype = x.dtype
        ctx.save_for_backward(x, weight)
        device_type = x.device.type
        with torch.autocast(device_type, enabled=False):
            if recipe.forward.is_identity:
                weight_fp32 = weight.float()
                bias_fp32 = bias.float() if bias is not None else None
                return F.linear(x.float(), weight_fp32, bias_fp32).to(output_dtype)
            generators = layer._generators("forward", recipe.forward)
            x2d = x.reshape(-1, x.shape[-1])
            y = quantized_matmul(
                x2d, weight, recipe.forward, **generators, allow_native=recipe.native_fp8
            )
            if bias is not None:
                y = y + bias.float()
        return y.view(*x.shape[:-1], weight.shape[0]).to(output_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        layer = ctx.layer
        recipe: LinearQuant = layer.recipe
        x, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        dy = grad_output.reshape(-1, grad_output.shape[-1]).float()
        x2d = x.reshape(-1, x.shape[-1]).float()
        grad_input = grad_weight = grad_bias = None
        layer.num_backward_calls += 1
        with torch.autocast(x.device.type, enabled=False):
            if need_input:
                if recipe.dgrad.is_identity:
                    grad_input = dy.mm(weight.float())
                else:
                    generators = layer._generators("dgrad", recipe.dgrad)
                    grad_input = quantized_matmul(
                        dy, weight.t(), recipe.dgrad, **generators, allow_native=recipe.native_fp8
                    )
                grad_input = grad_input.view(x.shape).to(ctx.input_dtype)
            if need_weight:
                if recipe.wgrad.is_identity:
                    grad_weight = dy.t().mm(x2d)
                else:
                    generators = layer._generators("wgrad", recipe.wgrad)
                    grad_weight = quantized_matmul(
                        dy.t(), x2d.t(), recipe.wgrad, **generators, allow_native=recipe.native_fp8
                    )
                grad_weight = grad_weight.to(weight.dtype)
            if ctx.has_bias and need_bias:
                grad_bias = dy.sum(0).to(layer.bias.dtype)
        return grad_input, grad_weight, grad_bias, None


class QuantLinear(nn.Linear):
    """nn.Linear whose GEMMs follow a `LinearQuant` recipe; same parameters, same names.

    `from_linear` wraps an existing layer without copying: the new module holds the very same
    Parameter objects, so optimizers, state_dicts and checkpoints keep working unchanged.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        recipe: LinearQuant,
        seed: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup(recipe, seed)

    def _setup(self, recipe: LinearQuant, seed: int) -> None:
        self.recipe = recipe
        self.seed = int(seed)
        self.num_forward_calls = 0
        self.num_backward_calls = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: LinearQuant, seed: int = 0) -> QuantLinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features = linear.in_features
        layer.out_features = linear.out_features
        layer.weight = linear.weight
        if linear.bias is not None:
            layer.bias = linear.bias
        else:
            layer.register_parameter("bias", None)
        layer.train(linear.training)
        layer._setup(recipe, seed)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.num_forward_calls += 1
        return _QuantLinearFunction.apply(x, self.weight, self.bias, self)

    def _generators(self, gemm_name: str, gemm: GemmQuant) -> dict[str, torch.Generator | None]:
        """Generators for the stochastically rounded operands of one GEMM call."""
        calls = self.num_forward_calls if gemm_name == "forward" else self.num_backward_calls
        generators = {}
        for slot, spec in (("a", gemm.a), ("b", gemm.b)):
            generator = None
            if spec.rounding == "stochastic":
                seed = mix_seed(self.seed, calls, _GEMM_IDS[gemm_name], 0 if slot == "a" else 1)
                generator = make_generator(seed, self.weight.device)
            generators[f"generator_{slot}"] = generator
        return generators

    def quant_state(self) -> dict[str, int]:
        """The counters that seed stochastic rounding (JSON-serialisable)."""
        return {
            "num_forward_calls": self.num_forward_calls,
            "num_backward_calls": self.num_backward_calls,
        }

    def load_quant_state(self, state: dict[str, int]) -> None:
        self.num_forward_calls = int(state["num_forward_calls"])
        self.num_backward_calls = int(state["num_backward_calls"])

    def extra_repr(self) -> str:
        recipe = self.recipe
        return (
            f"{super().extra_repr()}, forward=[{recipe.forward.describe()}], "
            f"dgrad=[{recipe.dgrad.describe()}], wgrad=[{recipe.wgrad.describe()}]"
        )


_GEMM_IDS = {"forward": 0, "dgrad": 1, "wgrad": 2}

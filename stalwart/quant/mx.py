"""Block-scaled quantization along a chosen dimension: MX, NV (two-level) and tensor scaling.

A `QuantSpec` says how one GEMM operand is quantized:
- scaling "mx": blocks of `block_size` (32) consecutive elements along `dim` share an E8M0
  power-of-two scale X = 2^e (OCP MX v1.0). `scale_rounding` picks e:
    "floor" (the spec): e = floor(log2 amax) - emax_elem; amax / X can reach 2^(emax+1), above
            the element max, so the largest values saturate;
    "ceil":  e = ceil(log2(amax / max_elem)), computed exactly from the fp32 bits: nothing
            saturates (the MXFP8 training recipe of arXiv 2506.08027 and the INT-vs-FP paper);
    "rceil": the hardware form (cvt.rp.ue8m0 on SM100): fp32(amax / max_elem) rounded up to a
            power of two. Equals "ceil" except where that division rounds.
  Default: "floor" (the spec). The recipes in recipes.py choose "ceil".
- scaling "nv": blocks of 16 with an E4M3 (or UE5M3) block scale and an FP32 tensor scale
  (NVFP4 / NVINT4, TE's nvfp4 reference): s_global = amax_tensor / (scale_max * elem_max)
  (1 when amax is 0), s_block = RNE_scale((amax_block / elem_max) / s_global) with saturation,
  elements = Q(x / s), value = element * s with s = fp32(s_block * s_global).
  A block whose scale underflows to 0 dequantizes to 0. `block_2d` uses 16x16 tiles (weights):
  the quantized matrix is then the same whichever dimension the GEMM reduces over.
- scaling "tensor": one FP32 scale s = amax / elem_max for the whole tensor.
- scaling "none": the elements are rounded directly (bf16, or fp32 = no quantization).

Elements are rounded with round-to-nearest-even or stochastic rounding (rounding.py), and
saturate at the element max. NaN or Inf in a block makes its E8M0 scale NaN (the whole block
reads NaN, as the spec says); under NV or tensor scaling it makes the whole tensor NaN.

`quantize` returns a `QuantizedTensor` (elements, block scales, tensor scale, codes on demand)
and is the reference; `quantize_dequantize` computes the same values fused. On CPU it uses the
compiled kernels of cpu_kernels.py when a C compiler is available (1-D MX with nearest
rounding, NV, tensor and no scaling): one pass over memory, two for NV, bit-identical to the
eager path. The eager path (no compiler, 2-D tiles, MX with stochastic rounding) runs over
cache-sized chunks with scratch buffers reused across chunks, so intermediates stay in cache
and no tensor-sized temporaries are allocated: MX in a single pass (each chunk's amax, scales
and rounding while it is in cache, rounding on x itself), NV in two (the tensor scale needs
every block amax first). On CUDA the same math runs as whole-tensor ops. No Python loop ever
runs per block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stalwart.quant import cpu_kernels, rounding
from stalwart.quant.formats import (
    E8M0,
    E8M0Format,
    ElementFormat,
    element_format,
    quantize_magnitude_,
    scale_format,
)

__all__ = [
    "SCALINGS",
    "SCALE_ROUNDINGS",
    "QuantSpec",
    "QuantizedTensor",
    "quantize",
    "quantize_dequantize",
    "quantize_for_gemm",
    "mx_spec",
    "nv_spec",
]

SCALINGS = ("none", "tensor", "mx", "nv")
SCALE_ROUNDINGS = ("floor", "ceil", "rceil")
# Elements per CPU chunk: big enough that the per-op dispatch cost is amortised, small enough
# that the chunk, its scratch and its output (6 MiB) stay in cache (L3) between the ops.
CPU_CHUNK_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class QuantSpec:
    """How one GEMM operand is quantized (see the module docstring)."""

    element: str = "fp32"
    scaling: str = "none"
    block_size: int = 32
    block_2d: bool = False
    scale_format: str = "e8m0"
    scale_rounding: str = "floor"
    rounding: str = "nearest"
    num_random_bits: int = 8

    def __post_init__(self) -> None:
        for name in ("element", "scaling", "scale_format", "scale_rounding", "rounding"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("block_size", "num_random_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if not isinstance(self.block_2d, bool):
            raise ValueError(f"block_2d must be true or false, got {self.block_2d!r}")
        element = element_format(self.element)  # raises for unknown names
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r}; allowed: {', '.join(SCALINGS)}")
        scale = scale_format(self.scale_format)
        if self.rounding not in rounding.ROUNDING_MODES:
            raise ValueError(
                f"unknown rounding {self.rounding!r}; allowed: {', '.join(rounding.ROUNDING_MODES)}"
            )
        if self.scale_rounding not in SCALE_ROUNDINGS:
            raise ValueError(
                f"unknown scale_rounding {self.scale_rounding!r}; allowed: "
                f"{', '.join(SCALE_ROUNDINGS)}"
            )
        if not 1 <= self.num_random_bits <= rounding.MAX_RANDOM_BITS:
            raise ValueError(
                f"num_random_bits must be in 1..{rounding.MAX_RANDOM_BITS}, got "
                f"{self.num_random_bits}"
            )
        if element.kind in ("identity", "native"):
            if self.scaling != "none":
                raise ValueError(
                    f"element {self.element!r} is not a low-precision format: use scaling 'none' "
                    f"with it (got {self.scaling!r})"
                )
            if self.rounding != "nearest":
                raise ValueError(
                    f"element {self.element!r} supports rounding 'nearest' only "
                    f"(got {self.rounding!r})"
                )
        if self.scaling == "mx" and not isinstance(scale, E8M0Format):
            raise ValueError(
                f"scaling 'mx' uses power-of-two E8M0 block scales; got scale_format "
                f"{self.scale_format!r} (use scaling 'nv' for e4m3/ue5m3 block scales)"
            )
        if self.scaling == "nv" and isinstance(scale, E8M0Format):
            raise ValueError(
                "scaling 'nv' uses e4m3 or ue5m3 block scales with an FP32 tensor scale; "
                "got scale_format 'e8m0' (use scaling 'mx' for E8M0 scales)"
            )
        if self.scaling in ("mx", "nv") and not 2 <= self.block_size <= 4096:
            raise ValueError(f"block_size must be in 2..4096, got {self.block_size}")
        if self.block_2d and self.scaling not in ("mx", "nv"):
            raise ValueError(
                f"block_2d needs block scaling ('mx' or 'nv'), got scaling {self.scaling!r}"
            )

    @property
    def element_format(self) -> ElementFormat:
        return element_format(self.element)

    @property
    def is_identity(self) -> bool:
        return self.element_format.is_identity

    @property
    def is_blocked(self) -> bool:
        return self.scaling in ("mx", "nv")

    def describe(self) -> str:
        if self.is_identity:
            return "fp32"
        parts = [self.element]
        tile = f"{self.block_size}x{self.block_size}" if self.block_2d else f"{self.block_size}"
        if self.scaling == "mx":
            parts.append(f"mx{tile}/{self.scale_rounding}")
        elif self.scaling == "nv":
            parts.append(f"nv{tile}/{self.scale_format}")
        elif self.scaling == "tensor":
            parts.append("tensor")
        if self.rounding == "stochastic":
            parts.append(f"sr{self.num_random_bits}")
        return "-".join(parts)


def mx_spec(element: str, block_size: int = 32, **options) -> QuantSpec:
    """An MX spec: E8M0 block scales over `block_size` elements."""
    return QuantSpec(element=element, scaling="mx", block_size=block_size, **options)


def nv_spec(
    element: str = "e2m1", scale: str = "e4m3", block_size: int = 16, **options
) -> QuantSpec:
    """An NV spec: e4m3/ue5m3 block scales over `block_size` elements plus an FP32 tensor scale."""
    return QuantSpec(
        element=element, scaling="nv", block_size=block_size, scale_format=scale, **options
    )


# ---------------------------------------------------------------------------------------------
# Layout: any tensor -> padded 2-D rows whose last dimension is the quantized one


@dataclass
class _Rows:
    rows: torch.Tensor  # [R_padded, K_padded] float32, contiguous
    shape: torch.Size  # input shape
    dim: int  # normalised quantization dim
    num_rows: int
    length: int  # K before padding
    moved: bool  # rows are x.movedim(dim, -1) (False for 2-D tiles, which keep x's layout)


def _to_rows(x: torch.Tensor, dim: int, spec: QuantSpec) -> _Rows:
    if x.dim() == 0:
        raise ValueError("cannot quantize a 0-d tensor; give it at least one dimension")
    dim = dim % x.dim()
    values = x.float()
    if spec.block_2d:
        if x.dim() != 2:
            raise ValueError(
                f"block_2d quantization needs a 2-D tensor, got shape {tuple(x.shape)}"
            )
        # 2-D tiles are symmetric: quantize x in its own layout whatever the reduction dim
        rows, moved = values, False
    else:
        rows, moved = values.movedim(dim, -1), True
        rows = rows.reshape(-1, x.shape[dim])
    num_rows, length = rows.shape
    block = spec.block_size if spec.is_blocked else 1
    pad_columns = -length % block
    pad_rows = -num_rows % block if spec.block_2d else 0
    if pad_columns or pad_rows:
        rows = torch.nn.functional.pad(rows, (0, pad_columns, 0, pad_rows))
    return _Rows(rows.contiguous(), x.shape, dim, num_rows, length, moved)


def _from_rows(values: torch.Tensor, layout: _Rows) -> torch.Tensor:
    values = values[: layout.num_rows, : layout.length]
    if not layout.moved:
        return values if values.is_contiguous() else values.contiguous()
    moved_shape = list(layout.shape)
    moved_shape.append(moved_shape.pop(layout.dim))
    return values.reshape(moved_shape).movedim(-1, layout.dim)


# ---------------------------------------------------------------------------------------------
# Scales


@dataclass
class _Scales:
    """Per-block factors, shaped [num_blocks, 1] (0-d for tensor scaling, None for 1)."""

    divisor: torch.Tensor | None  # x / divisor lands in the element range
    gemm_multiplier: torch.Tensor | None  # GEMM operand = element * this (tensor scale deferred)
    full_multiplier: torch.Tensor | None  # dequantized value = element * this
    tensor_scale: torch.Tensor  # 0-d float32
    block_scales: torch.Tensor  # what QuantizedTensor records (block or tile grid), or 0-d ones
    saturates: bool  # False when the scale rule guarantees |x / divisor| <= element max


def _runs_chunked(rows: torch.Tensor) -> bool:
    """CPU tensors go through the cache-sized chunk loops; accelerators take whole-tensor ops."""
    return rows.device.type == "cpu"


def _block_amax(rows: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Absolute max per block [R, K/B] (per tile [R/B, K/B] for 2-D); NaN propagates.

    On CPU the rows are read chunk by chunk (abs into a reused scratch, then a reduction that
    stays in cache); elsewhere amax and amin of the whole view, with no abs() temporary.
    """
    block = spec.block_size
    if spec.block_2d:
        tiles = rows.view(rows.shape[0] // block, block, rows.shape[1] // block, block)
        return torch.maximum(tiles.amax(dim=(1, 3)), tiles.amin(dim=(1, 3)).neg_())
    blocks = rows.view(-1, block)
    if not _runs_chunked(rows):
        amax = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_())
        return amax.view(rows.shape[0], -1)
    amax = torch.empty(blocks.shape[0])
    # ATen's CPU reduction over an innermost run shorter than 32 floats is not vectorised;
    # for NV's 16-blocks reduce 32-wide rows with the other half masked to zero instead (a
    # NaN leaks into the neighbouring block, which is harmless under NV scaling: any NaN makes
    # the tensor scale, hence the whole tensor, NaN).
    paired = block == 16 and spec.scaling == "nv" and blocks.shape[0] % 2 == 0
    chunk_blocks = max(2, CPU_CHUNK_ELEMENTS // block // 2 * 2)  # whole pairs per chunk
    scratch = torch.empty(min(chunk_blocks, blocks.shape[0]), block)
    if paired:
        halves = torch.zeros(2, 1, 2 * block)
        halves[0, :, :block] = 1.0
        halves[1, :, block:] = 1.0
        masked = torch.empty(min(chunk_blocks, blocks.shape[0]) // 2, 2 * block)
        amax_pairs = amax.view(-1, 2)
    for start in range(0, blocks.shape[0], chunk_blocks):
        stop = min(start + chunk_blocks, blocks.shape[0])
        magnitude = torch.abs(blocks[start:stop], out=scratch[: stop - start])
        if not paired:
            torch.amax(magnitude, dim=1, out=amax[start:stop])
            continue
        wide = magnitude.view(-1, 2 * block)
        for half in range(2):
            product = torch.mul(wide, halves[half], out=masked[: wide.shape[0]])
            amax_pairs[start // 2 : stop // 2, half] = product.amax(dim=1)
    return amax.view(rows.shape[0], -1)


def e8m0_scale_exponent(
    amax: torch.Tensor, element: ElementFormat, scale_rounding: str
) -> torch.Tensor:
    """Unbiased E8M0 exponent per block (int32, clamped to [-127, 127]) from the block amax."""
    bits = amax.float().view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 127  # floor(log2 amax) for normal amax
    if scale_rounding == "floor":
        shared = exponent - element.emax
    elif scale_rounding == "ceil":
        max_mantissa = int(
            torch.tensor(element.max_value, dtype=torch.float32).view(torch.int32) & 0x7FFFFF
        )
        shared = exponent - element.emax + ((bits & 0x7FFFFF) > max_mantissa).to(torch.int32)
    else:  # rceil
        ratio = (amax.float() / element.max_value).view(torch.int32)
        shared = ((ratio >> 23) & 0xFF) - 127 + ((ratio & 0x7FFFFF) != 0).to(torch.int32)
    return shared.clamp_(-127, 127)


def _nv_tensor_scale(amax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """s_global = amax_tensor / (scale_max * elem_max); 1 for an all-zero tensor, NaN when the
    tensor holds NaN or Inf."""
    amax_tensor = amax.max()
    scale_max = scale_format(spec.scale_format).max_value
    tensor_scale = amax_tensor / (scale_max * spec.element_format.max_value)
    tensor_scale = torch.where(amax_tensor == 0, 1.0, tensor_scale)
    return torch.where(torch.isfinite(amax_tensor), tensor_scale, math.nan)


def _nv_block_scales(amax: torch.Tensor, tensor_scale: torch.Tensor, spec: QuantSpec):
    """(s_block, divisor, s_block * s_global) per block: s_block is the block amax's share of
    the element range, rounded to the scale format (RNE, saturating; may underflow to 0)."""
    scale_fmt = scale_format(spec.scale_format)
    wanted = (amax / spec.element_format.max_value) / tensor_scale
    block_scale = quantize_magnitude_(wanted.clamp_(max=scale_fmt.max_value), scale_fmt)
    full = block_scale * tensor_scale
    return block_scale, torch.where(full == 0, 1.0, full), full


def _compute_scales(rows: torch.Tensor, spec: QuantSpec) -> _Scales:
    element = spec.element_format
    one = torch.ones((), dtype=torch.float32, device=rows.device)
    if spec.scaling == "none" or spec.is_identity:
        return _Scales(None, None, None, one, one, saturates=True)
    if spec.scaling == "tensor":
        amax = torch.maximum(rows.amax(), rows.amin().neg())
        scale = torch.where(amax == 0, one, amax / element.max_value)
        scale = torch.where(torch.isfinite(amax), scale, math.nan)
        # amax / scale <= max * (1 + 2^-24), which rounds to max: nothing saturates
        return _Scales(scale, None, scale, scale, one, saturates=False)
    amax = _block_amax(rows, spec)
    if spec.scaling == "mx":
        exponent = e8m0_scale_exponent(amax, element, spec.scale_rounding)
        block_scale = E8M0.exponent_to_scale(exponent)
        block_scale = torch.where(torch.isfinite(amax), block_scale, math.nan)
        divisor = gemm_multiplier = full_multiplier = block_scale
        tensor_scale = one
        # rounding the scale up leaves amax / X <= max (rceil: within 2^-24 of max)
        saturates = spec.scale_rounding == "floor"
    else:  # nv: two-level scale
        tensor_scale = _nv_tensor_scale(amax, spec)
        block_scale, divisor, full_multiplier = _nv_block_scales(amax, tensor_scale, spec)
        gemm_multiplier = block_scale
        saturates = True
    recorded = block_scale
    factors = [divisor, gemm_multiplier, full_multiplier]
    if spec.block_2d:  # expand tile scales to one per (row, block) in row-major block order
        factors = [f.repeat_interleave(spec.block_size, dim=0) for f in factors]
    divisor, gemm_multiplier, full_multiplier = (f.reshape(-1, 1) for f in factors)
    return _Scales(
        divisor, gemm_multiplier, full_multiplier, tensor_scale, recorded, saturates=saturates
    )


# ---------------------------------------------------------------------------------------------
# The fused elementwise pass


def _quantize_chunk_(
    out: torch.Tensor,
    values: torch.Tensor,
    scratch: torch.Tensor,
    divisor: torch.Tensor | None,
    multiplier: torch.Tensor | None,
    saturates: bool,
    element: ElementFormat,
    spec: QuantSpec,
    random_bits: torch.Tensor | None,
    scratch_for_stochastic: torch.Tensor | None = None,
) -> None:
    """out = Q(x / divisor) * multiplier, in place."""
    limit = element.max_value
    if spec.rounding == "nearest":
        # Signed: nearest-even is symmetric, so no abs/copysign pair is needed (a negative
        # value that rounds to zero gives +0, numerically the same).
        if divisor is None:
            scaled = out.copy_(values)
        else:
            scaled = torch.div(values, divisor, out=out)
        if saturates:
            scaled.clamp_(-limit, limit)
        quantize_magnitude_(scaled, element, scratch=scratch)
    else:
        # Stochastic rounding on magnitudes keeps it symmetric; the sign comes back at the end.
        scaled = torch.abs(values, out=out)
        if divisor is not None:
            scaled.div_(divisor)
        scaled.clamp_(max=limit)
        quantize_magnitude_(
            scaled,
            element,
            rounding_mode="stochastic",
            random_bits=random_bits,
            num_random_bits=spec.num_random_bits,
            scratch=scratch,
            scratch_for_stochastic=scratch_for_stochastic,
        )
        torch.copysign(scaled, values, out=scaled)
    if multiplier is not None:
        scaled.mul_(multiplier)


# Below this block amax, 1.5 * 2^23 * ulp (the magic constant) stays finite in fp32 on x's
# own scale; above it (absurd for training data) the chunk takes the divide/multiply route.
_X_DOMAIN_MAX_AMAX = 2.0**96
# An fp32 subnormal x has no exponent field to read its ulp from; that is harmless while the
# scaled grid's smallest normal X * min_normal is an fp32 normal (x is then below it, where the
# floor X * min_subnormal is the right spacing). Blocks with smaller scales take the
# divide/multiply route too.
_X_DOMAIN_MIN_SCALED_NORMAL = 2.0**-126


def _uses_single_pass_mx(rows: torch.Tensor, spec: QuantSpec) -> bool:
    return (
        _runs_chunked(rows)
        and spec.scaling == "mx"
        and not spec.block_2d
        and spec.rounding == "nearest"
        and spec.element_format.kind in ("float", "int")
    )


def _chunk_e8m0_scales(amax: torch.Tensor, element: ElementFormat, scale_rounding: str):
    """E8M0 scales X [n, 1] from block amax [n, 1] with float/bit ops that cost a handful of
    small kernels; the same values as e8m0_scale_exponent + exponent_to_scale. NaN/Inf amax
    gives X = Inf, which turns every element of the block into NaN (0 * Inf) below."""
    if scale_rounding == "rceil":
        amax = amax / element.max_value
        # round up to a power of two: a non-zero mantissa carries into the exponent
        bits = amax.view(torch.int32).add(0x7FFFFF).bitwise_and_(0x7F800000)
        scale = bits.view(torch.float32)
    else:
        power = amax.view(torch.int32).bitwise_and(0x7F800000).view(torch.float32)
        scale = power.mul(2.0 ** (-element.emax))  # floor: 2^(floor(log2 amax) - emax)
        if scale_rounding == "ceil":  # one binade up when amax's mantissa exceeds max's
            scale = torch.where(amax > scale * element.max_value, scale * 2, scale)
    # the E8M0 range; a NaN/Inf amax (false below) gives Inf
    return torch.where(amax < math.inf, scale.clamp_(2.0**-127, 2.0**127), math.inf)


def _round_mx_chunk_(
    out: torch.Tensor,
    values: torch.Tensor,
    scratch: torch.Tensor,
    scale: torch.Tensor,
    element: ElementFormat,
    saturates: bool,
) -> None:
    """out = RNE(x / X) * X for power-of-two block scales X, computed on x itself: the grid
    around x is the element grid scaled by X, so the magic constant is 1.5 * 2^23 times x's
    own ulp (from its exponent field), floored at X times the subnormal spacing (integers: X
    times the step). Exact, and 2-5 elementwise ops instead of 7-8."""
    if element.kind == "int":
        magic = scale * (rounding.MAGIC * element.step)
    else:
        magic = torch.bitwise_and(
            values.view(torch.int32), 0x7F800000, out=scratch.view(torch.int32)
        ).view(torch.float32)
        magic.mul_(rounding.MAGIC * 2.0 ** (-element.mantissa_bits))
        torch.maximum(magic, scale * (rounding.MAGIC * element.min_subnormal), out=magic)
    torch.add(values, magic, out=out).sub_(magic)
    if saturates:  # rounding is monotone and +-max*X is on the grid: clamping after is exact
        limit = scale * element.max_value
        torch.minimum(out, limit, out=out)
        torch.maximum(out, limit.neg_(), out=out)


def _fused_mx_cpu(rows: torch.Tensor, spec: QuantSpec, out: torch.Tensor) -> torch.Tensor:
    """MX quantize-dequantize in one pass over cache-sized chunks: each chunk is read from
    memory once (its block amax, its scales and its rounding all happen while it is in L2)."""
    element = spec.element_format
    block = spec.block_size
    blocks_in, blocks_out = rows.view(-1, block), out.view(-1, block)
    chunk_blocks = max(1, CPU_CHUNK_ELEMENTS // block)
    scratch = torch.empty(min(chunk_blocks, blocks_in.shape[0]), block)
    saturates = spec.scale_rounding == "floor"
    for start in range(0, blocks_in.shape[0], chunk_blocks):
        stop = min(start + chunk_blocks, blocks_in.shape[0])
        values, target, work = (
            blocks_in[start:stop],
            blocks_out[start:stop],
            scratch[: stop - start],
        )
        amax = torch.abs(values, out=work).amax(dim=1, keepdim=True)
        scale = _chunk_e8m0_scales(amax, element, spec.scale_rounding)
        if bool(amax.max() < _X_DOMAIN_MAX_AMAX) and (
            element.kind == "int"
            or bool(scale.min() * element.min_normal >= _X_DOMAIN_MIN_SCALED_NORMAL)
        ):
            _round_mx_chunk_(target, values, work, scale, element, saturates)
        else:
            _quantize_chunk_(target, values, work, scale, scale, True, element, spec, None)
    return out


def _uses_chunked_nv(rows: torch.Tensor, spec: QuantSpec) -> bool:
    return _runs_chunked(rows) and spec.scaling == "nv" and not spec.block_2d


def _fused_nv_cpu(
    rows: torch.Tensor,
    spec: QuantSpec,
    random_bits: torch.Tensor | None,
    apply_tensor_scale: bool,
    out: torch.Tensor,
) -> torch.Tensor:
    """NV quantize-dequantize: one pass for the block amaxes (the tensor scale needs them all),
    then per chunk its block scales and the rounding, while the chunk is in cache."""
    element = spec.element_format
    block = spec.block_size
    amax = _block_amax(rows, spec).view(-1, 1)
    tensor_scale = _nv_tensor_scale(amax, spec)
    blocks_in, blocks_out = rows.view(-1, block), out.view(-1, block)
    bits = random_bits.view(-1, block) if random_bits is not None else None
    chunk_blocks = max(1, CPU_CHUNK_ELEMENTS // block)
    scratch = torch.empty(min(chunk_blocks, blocks_in.shape[0]), block)
    scratch_for_stochastic = torch.empty_like(scratch) if bits is not None else None
    for start in range(0, blocks_in.shape[0], chunk_blocks):
        stop = min(start + chunk_blocks, blocks_in.shape[0])
        block_scale, divisor, full = _nv_block_scales(amax[start:stop], tensor_scale, spec)
        _quantize_chunk_(
            blocks_out[start:stop],
            blocks_in[start:stop],
            scratch[: stop - start],
            divisor,
            full if apply_tensor_scale else block_scale,
            True,
            element,
            spec,
            bits[start:stop] if bits is not None else None,
            scratch_for_stochastic[: stop - start] if bits is not None else None,
        )
    return tensor_scale


def _fused_rows(
    rows: torch.Tensor,
    scales: _Scales,
    spec: QuantSpec,
    random_bits: torch.Tensor | None,
    apply_tensor_scale: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    element = spec.element_format
    out = torch.empty_like(rows) if out is None else out
    if element.kind == "native":
        return out.copy_(rows.to(element.torch_dtype))
    width = spec.block_size if spec.is_blocked else rows.shape[1]
    blocks_in = rows.view(-1, width)
    blocks_out = out.view(-1, width)
    bits = random_bits.view(-1, width) if random_bits is not None else None
    multiplier = scales.full_multiplier if apply_tensor_scale else scales.gemm_multiplier
    divisor = scales.divisor
    if not _runs_chunked(rows):
        _quantize_chunk_(
            blocks_out, blocks_in, torch.empty_like(blocks_in), divisor, multiplier,
            scales.saturates, element, spec, bits,
        )  # fmt: skip
        return out

    def rows_of(factor, start, stop):
        return factor[start:stop] if factor is not None and factor.dim() else factor

    chunk_blocks = max(1, CPU_CHUNK_ELEMENTS // width)
    scratch = torch.empty(min(chunk_blocks, blocks_in.shape[0]), width)
    scratch_for_stochastic = torch.empty_like(scratch) if bits is not None else None
    for start in range(0, blocks_in.shape[0], chunk_blocks):
        stop = min(start + chunk_blocks, blocks_in.shape[0])
        _quantize_chunk_(
            blocks_out[start:stop],
            blocks_in[start:stop],
            scratch[: stop - start],
            rows_of(divisor, start, stop),
            rows_of(multiplier, start, stop),
            scales.saturates,
            element,
            spec,
            bits[start:stop] if bits is not None else None,
            scratch_for_stochastic[: stop - start] if bits is not None else None,
        )
    return out


def _kernels_for(rows: torch.Tensor, spec: QuantSpec) -> cpu_kernels.CpuKernels | None:
    """The fused CPU kernels when they cover this spec (1-D blocks, tensor or no scaling of a
    float/int grid; MX with nearest rounding) and are available; else None (eager path)."""
    if rows.device.type != "cpu" or spec.block_2d or rows.numel() == 0:
        return None
    if spec.element_format.kind not in ("float", "int"):
        return None
    if spec.scaling == "mx" and spec.rounding != "nearest":
        return None
    return cpu_kernels.load()


def _fused_with_kernels(
    kernels: cpu_kernels.CpuKernels,
    rows: torch.Tensor,
    spec: QuantSpec,
    generator: torch.Generator | None,
    random_bits: torch.Tensor | None,
    apply_tensor_scale: bool,
    out: torch.Tensor,
) -> torch.Tensor:
    """Quantize-dequantize `rows` into `out` with the compiled kernels (the same values as the
    eager path); returns the tensor scale."""
    element = spec.element_format
    one = torch.ones((), dtype=torch.float32)
    if spec.scaling == "mx":
        kernels.mx_nearest(rows, out, spec)
        return one
    random_bits_kept = None
    if spec.rounding != "stochastic":
        random, _ = cpu_kernels.random_struct(0)
    elif random_bits is not None:
        if random_bits.shape != rows.shape:
            raise ValueError(
                f"random_bits must have the padded row shape {tuple(rows.shape)}, got "
                f"{tuple(random_bits.shape)}"
            )
        random, random_bits_kept = cpu_kernels.random_struct(
            spec.num_random_bits, random_bits=random_bits
        )
    else:
        key = rounding.draw_random_key(generator)
        random, _ = cpu_kernels.random_struct(spec.num_random_bits, key=key)
    if spec.scaling == "nv":
        amax = kernels.block_amax(rows.view(-1, spec.block_size))
        tensor_scale = _nv_tensor_scale(amax, spec)
        kernels.nv(rows, out, amax, float(tensor_scale), spec, apply_tensor_scale, random)
    elif spec.scaling == "tensor":
        amax = kernels.block_amax(rows).max()
        tensor_scale = torch.where(amax == 0, one, amax / element.max_value)
        tensor_scale = torch.where(torch.isfinite(amax), tensor_scale, math.nan)
        scale = float(tensor_scale)
        # amax / scale <= max * (1 + 2^-24), which rounds to max: nothing saturates
        kernels.scaled(rows, out, scale, scale if apply_tensor_scale else None, False, element, random)  # fmt: skip
    else:
        tensor_scale = one
        kernels.scaled(rows, out, None, None, True, element, random)
    del random_bits_kept  # the explicit bits had to outlive the calls above
    return tensor_scale


def _random_bits_for(
    rows: torch.Tensor,
    spec: QuantSpec,
    generator: torch.Generator | None,
    random_bits: torch.Tensor | None,
) -> torch.Tensor | None:
    if spec.rounding != "stochastic":
        return None
    if random_bits is not None:
        if random_bits.shape != rows.shape:
            raise ValueError(
                f"random_bits must have the padded row shape {tuple(rows.shape)}, got "
                f"{tuple(random_bits.shape)}"
            )
        return random_bits
    return rounding.draw_random_bits(rows.shape, spec.num_random_bits, generator, rows.device)


# ---------------------------------------------------------------------------------------------
# Public API


@dataclass
class QuantizedTensor:
    """A quantized tensor: value = element * fp32(block scale * tensor scale).

    elements: float32 values on the element grid, in the input's shape.
    block_scales: 1-D blocks: the input shape with `dim` replaced by the number of blocks;
    2-D tiles: [ceil(rows / B), ceil(cols / B)]; tensor/none scaling: a 0-d 1.0.
    tensor_scale: 0-d float32 (1.0 for mx and none).
    """

    elements: torch.Tensor
    block_scales: torch.Tensor
    tensor_scale: torch.Tensor
    spec: QuantSpec
    dim: int

    def expanded_block_scales(self) -> torch.Tensor:
        """One block scale per element, in the input's shape."""
        if not self.spec.is_blocked:
            return self.block_scales.expand(self.elements.shape)
        block = self.spec.block_size
        if self.spec.block_2d:
            rows, cols = self.elements.shape
            tiles = self.block_scales.repeat_interleave(block, 0).repeat_interleave(block, 1)
            return tiles[:rows, :cols]
        expanded = self.block_scales.repeat_interleave(block, dim=self.dim)
        return expanded.narrow(self.dim, 0, self.elements.shape[self.dim])

    def dequantize(self) -> torch.Tensor:
        """elements * fp32(block scale * tensor scale)."""
        return self.elements * (self.expanded_block_scales() * self.tensor_scale)

    def element_codes(self) -> torch.Tensor:
        """uint8 codes of the elements (NaN elements get the format's NaN code or 0)."""
        return self.spec.element_format.encode(self.elements)

    def scale_codes(self) -> torch.Tensor:
        """uint8 codes of the block scales in the spec's scale format."""
        if not self.spec.is_blocked:
            raise ValueError(f"scaling {self.spec.scaling!r} has no block scales to encode")
        return scale_format(self.spec.scale_format).encode(self.block_scales)


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
    random_bits: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize `x` with blocks along `dim` (the GEMM's reduction dimension).

    Stochastic rounding draws its bits from `generator` (the global generator when None), or
    takes `random_bits` shaped like the padded [rows, K] layout (for tests and replay).
    """
    layout = _to_rows(x, dim, spec)
    rows = layout.rows
    element = spec.element_format
    scales = _compute_scales(rows, spec)
    bits = _random_bits_for(rows, spec, generator, random_bits)
    width = spec.block_size if spec.is_blocked else rows.shape[1]
    scaled = rows if scales.divisor is None else (rows.view(-1, width) / scales.divisor)
    elements = element.quantize(
        scaled.view(rows.shape),
        rounding_mode=spec.rounding,
        random_bits=bits,
        num_random_bits=spec.num_random_bits,
    )
    if spec.scaling == "nv":  # blocks whose scale underflowed to 0 hold zeros
        zero_block = (scales.gemm_multiplier == 0).expand(-1, width).reshape(rows.shape)
        elements = torch.where(zero_block, 0.0, elements)
    block_scales = scales.block_scales
    if spec.is_blocked and not spec.block_2d:
        moved_shape = list(layout.shape)
        moved_shape.pop(layout.dim)
        block_scales = block_scales[: layout.num_rows].reshape(*moved_shape, -1)
        block_scales = block_scales.movedim(-1, layout.dim)
    return QuantizedTensor(
        elements=_from_rows(elements, layout),
        block_scales=block_scales,
        tensor_scale=scales.tensor_scale,
        spec=spec,
        dim=layout.dim,
    )


def quantize_dequantize(
    x: torch.Tensor,
    spec: QuantSpec,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
    random_bits: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`quantize(x, spec, dim).dequantize()` in one fused pass (float32 result, x's shape).

    The values equal the two-step result; only the sign of zero may differ (a negative value
    that rounds to zero gives +0 here). `out` (float32, x's shape) receives the result.
    """
    values, _ = _quantize_dequantize(
        x, spec, dim, generator, random_bits, apply_tensor_scale=True, out=out
    )
    return values


def quantize_for_gemm(
    x: torch.Tensor,
    spec: QuantSpec,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
    random_bits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(element * block scale, tensor scale): the GEMM operand and the factor its result is
    multiplied by in the epilogue. Elements times E8M0/E4M3/UE5M3 scales are exact in fp32 (and
    in tf32/bf16 for FP4/FP6 elements), so only the epilogue rounds."""
    return _quantize_dequantize(x, spec, dim, generator, random_bits, apply_tensor_scale=False)


def _quantize_dequantize(
    x: torch.Tensor,
    spec: QuantSpec,
    dim: int,
    generator: torch.Generator | None,
    random_bits: torch.Tensor | None,
    apply_tensor_scale: bool,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    one = torch.ones((), dtype=torch.float32, device=x.device)
    if out is not None and (out.shape != x.shape or out.dtype != torch.float32):
        raise ValueError(
            f"out must be float32 with the input's shape {tuple(x.shape)}, got "
            f"{out.dtype} {tuple(out.shape)}"
        )
    if spec.is_identity:
        return (x.float().clone() if out is None else out.copy_(x)), one
    layout = _to_rows(x, dim, spec)
    kernels = _kernels_for(layout.rows, spec)
    bits = None if kernels else _random_bits_for(layout.rows, spec, generator, random_bits)
    # write straight into `out` when the row layout is a plain view of it
    direct = (
        out is not None
        and out.is_contiguous()
        and layout.moved
        and layout.dim == x.dim() - 1
        and tuple(layout.rows.shape) == (layout.num_rows, layout.length)
    )
    rows = layout.rows
    result = out.view(rows.shape) if direct else torch.empty_like(rows)
    if kernels is not None:
        tensor_scale = _fused_with_kernels(
            kernels, rows, spec, generator, random_bits, apply_tensor_scale, result
        )
    elif _uses_single_pass_mx(rows, spec):  # CPU fast paths compute their scales per chunk
        _fused_mx_cpu(rows, spec, result)
        tensor_scale = one
    elif _uses_chunked_nv(rows, spec):
        tensor_scale = _fused_nv_cpu(rows, spec, bits, apply_tensor_scale, result)
    else:
        scales = _compute_scales(rows, spec)
        _fused_rows(rows, scales, spec, bits, apply_tensor_scale, out=result)
        tensor_scale = scales.tensor_scale
    tensor_scale = one if apply_tensor_scale else tensor_scale
    if direct:
        return out, tensor_scale
    result = _from_rows(result, layout)
    return (result if out is None else out.copy_(result)), tensor_scale

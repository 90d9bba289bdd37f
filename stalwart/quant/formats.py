"""Number formats of low-precision training: element formats and block-scale formats.

An element format (E4M3, E5M2, E3M2, E2M3, E2M1, MXINT8, INT4, and BF16/FP32 as the
"no quantization" ends of the scale) knows its code table, its largest finite value, how it
saturates and which codes are special (NaN, Inf). A scale format knows how a positive scale is
rounded onto it: E8M0 (powers of two, bias 127, code 0xFF is NaN, no zero), E4M3 and UE5M3.

Definitions follow the OCP Microscaling (MX) v1.0 spec and the OFP8 spec; the bit layouts are
checked against ml_dtypes in tests/quant/test_formats.py.

Pinned choices (they differ between publications, so they are fixed here and tested):
- MXINT8 is 8-bit two's complement with an implicit 2^-6 scale and a *symmetric* range
  [-127, 127] * 2^-6: the -128 code decodes to -2.0 but quantization never produces it.
- INT4 (NVINT4 elements) is symmetric [-7, 7] with step 1; the -8 code is never produced.
- UE5M3 is unsigned, 5 exponent bits (bias 15) and 3 mantissa bits with IEEE-style subnormals;
  the top exponent field (31) is reserved (all eight codes 0xF8..0xFF read as NaN), so the
  largest value is 2^15 * 1.875 = 61440, the smallest normal 2^-14 and the smallest subnormal
  2^-17 (the codebook of arXiv 2509.17791 / 2609.02846, not the 114688-max variant).
- E4M3 is the "fn" variant (no Inf, only S.1111.111 is NaN, max 448); E5M2 is IEEE-like (Inf and
  NaN in the top exponent, max 57344).

Quantization returns float32 tensors whose values lie on the format's grid ("fake quantized");
`encode` / `decode` convert between those values and the integer codes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from stalwart.quant import rounding

__all__ = [
    "ElementFormat",
    "E8M0Format",
    "ELEMENT_FORMATS",
    "SCALE_FORMATS",
    "E8M0",
    "element_format",
    "scale_format",
]

# fp32 bit fields used by the vectorised rounding below
_FP32_EXPONENT_MASK = 0x7F800000


@dataclass(frozen=True)
class ElementFormat:
    """A sign-magnitude minifloat, a symmetric integer format, or a pass-through (bf16/fp32).

    kind: "float" (exponent + mantissa fields), "int" (two's complement times `step`),
    "native" (rounded by a torch dtype cast: bf16, fp16) or "identity" (fp32: no rounding).
    specials: for "float": "none" (every code finite), "fn" (only the all-ones magnitude is NaN),
    "ieee" (top exponent field: mantissa 0 is Inf, others NaN), "top_exponent_nan" (the top
    exponent field is reserved: every code there reads as NaN).
    """

    name: str
    kind: str
    num_bits: int
    exponent_bits: int = 0
    mantissa_bits: int = 0
    bias: int = 0
    signed: bool = True
    specials: str = "none"
    step: float = 1.0  # "int": value of one integer unit
    ml_dtypes_name: str | None = None
    torch_dtype_name: str | None = None

    # ---- derived properties -------------------------------------------------------------------

    @functools.cached_property
    def max_value(self) -> float:
        """Largest finite value (quantization saturates here)."""
        if self.kind == "int":
            return float(2 ** (self.num_bits - 1) - 1) * self.step
        if self.kind in ("native", "identity"):
            return float(torch.finfo(self.torch_dtype).max)
        return float(self._finite_magnitudes()[-1])

    @functools.cached_property
    def min_normal(self) -> float:
        """Smallest positive normal (for "int": one step)."""
        if self.kind == "int":
            return self.step
        if self.kind in ("native", "identity"):
            return float(torch.finfo(self.torch_dtype).smallest_normal)
        return 2.0 ** (1 - self.bias)

    @functools.cached_property
    def min_subnormal(self) -> float:
        """Smallest positive representable value."""
        if self.kind == "int":
            return self.step
        if self.kind in ("native", "identity"):
            return self.min_normal * 2.0 ** (-self.mantissa_bits)
        return 2.0 ** (1 - self.bias - self.mantissa_bits)

    @property
    def emax(self) -> int:
        """floor(log2(max_value)): the exponent the OCP scale rule subtracts."""
        return math.floor(math.log2(self.max_value))

    @property
    def has_nan(self) -> bool:
        return self.specials != "none" or self.kind in ("native", "identity")

    @property
    def has_inf(self) -> bool:
        return self.specials == "ieee" or self.kind in ("native", "identity")

    @property
    def is_identity(self) -> bool:
        return self.kind == "identity"

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.torch_dtype_name is None:
            raise ValueError(f"format {self.name} has no torch dtype")
        return getattr(torch, self.torch_dtype_name)

    # ---- code table ---------------------------------------------------------------------------

    def _field_value(self, code: int) -> float:
        """Value of one code (float or int kinds)."""
        if self.kind == "int":
            signed_int = code - (1 << self.num_bits) if code >> (self.num_bits - 1) else code
            return signed_int * self.step
        magnitude_bits = self.exponent_bits + self.mantissa_bits
        sign = -1.0 if self.signed and (code >> magnitude_bits) & 1 else 1.0
        exponent_field = (code >> self.mantissa_bits) & ((1 << self.exponent_bits) - 1)
        mantissa_field = code & ((1 << self.mantissa_bits) - 1)
        top_exponent = (1 << self.exponent_bits) - 1
        if self.specials == "ieee" and exponent_field == top_exponent:
            return sign * math.inf if mantissa_field == 0 else math.nan
        if self.specials == "top_exponent_nan" and exponent_field == top_exponent:
            return math.nan
        if (
            self.specials == "fn"
            and exponent_field == top_exponent
            and mantissa_field == (1 << self.mantissa_bits) - 1
        ):
            return math.nan
        fraction = mantissa_field / (1 << self.mantissa_bits)
        if exponent_field == 0:
            return sign * fraction * 2.0 ** (1 - self.bias)
        return sign * (1.0 + fraction) * 2.0 ** (exponent_field - self.bias)

    @functools.cached_property
    def code_table(self) -> torch.Tensor:
        """float32 value of every code 0 .. 2^num_bits - 1 (NaN/Inf where the code is special)."""
        if self.kind not in ("float", "int"):
            raise ValueError(f"format {self.name} ({self.kind}) has no small code table")
        return torch.tensor(
            [self._field_value(code) for code in range(1 << self.num_bits)], dtype=torch.float32
        )

    def _finite_magnitudes(self) -> torch.Tensor:
        table = self.code_table
        finite = table[torch.isfinite(table)]
        return torch.unique(finite.abs())

    def grid(self) -> torch.Tensor:
        """Every finite value the format can produce, ascending (one zero; -128/-8 excluded)."""
        magnitudes = self._finite_magnitudes()
        magnitudes = magnitudes[magnitudes <= self.max_value]
        if not self.signed:
            return magnitudes
        return torch.cat((-magnitudes.flip(0)[:-1], magnitudes))

    # ---- encode / decode ----------------------------------------------------------------------

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes (any integer dtype) -> float32 values."""
        table = self.code_table.to(codes.device)
        return table[codes.long() & ((1 << self.num_bits) - 1)]

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """float32 values already on the grid (use `quantize` first) -> uint8 codes.

        NaN maps to the format's NaN code (0 for formats without one: there NaN is carried by
        the block scale). Raises ValueError for a value the format cannot represent.
        """
        values = values.float()
        nan = torch.isnan(values)
        if self.kind == "int":
            units = torch.where(nan, 0.0, values / self.step)
            limit = 2 ** (self.num_bits - 1)
            if not torch.equal(units, units.round()) or bool((units.abs() > limit).any()):
                raise ValueError(f"values are not on the {self.name} grid; quantize them first")
            return (units.long() & ((1 << self.num_bits) - 1)).to(torch.uint8)
        table = self.code_table
        magnitude_bits = self.exponent_bits + self.mantissa_bits
        positive_codes = torch.arange(1 << magnitude_bits)
        positive_values = table[positive_codes]
        finite = torch.isfinite(positive_values)
        finite_values, finite_codes = positive_values[finite], positive_codes[finite]
        magnitude = values.abs()
        index = torch.searchsorted(finite_values.to(values.device), magnitude)
        index = index.clamp(max=finite_values.numel() - 1)
        codes = finite_codes.to(values.device)[index]
        exact = finite_values.to(values.device)[index] == magnitude
        infinite = torch.isinf(values)
        if self.specials == "ieee":
            inf_code = ((1 << self.exponent_bits) - 1) << self.mantissa_bits
            codes = torch.where(infinite, inf_code, codes)
            exact |= infinite
        if not bool((exact | nan).all()):
            raise ValueError(f"values are not on the {self.name} grid; quantize them first")
        nan_code = 0 if self.specials == "none" else (1 << magnitude_bits) - 1
        codes = torch.where(nan, nan_code, codes)
        if self.signed:
            codes = codes | (torch.signbit(values).long() << magnitude_bits)
        return codes.to(torch.uint8)

    # ---- quantization -------------------------------------------------------------------------

    def quantize(
        self,
        x: torch.Tensor,
        *,
        rounding_mode: str = "nearest",
        saturate: bool = True,
        random_bits: torch.Tensor | None = None,
        num_random_bits: int = 8,
    ) -> torch.Tensor:
        """Round float values onto this format's grid; returns float32.

        rounding_mode "nearest" is round-to-nearest-even; "stochastic" needs `random_bits`
        (integers in [0, 2^num_random_bits), one per element, see rounding.draw_random_bits).
        saturate=True clamps to +-max_value (Inf becomes max, NaN stays NaN): the MX and OFP8
        saturating conversion. saturate=False overflows to Inf (E5M2, bf16) or NaN (E4M3) like
        the non-saturating OFP8 conversion; formats without Inf/NaN always saturate.
        """
        x = x.float()
        if self.kind == "identity":
            return x.clone()
        if self.kind == "native":
            if rounding_mode != "nearest":
                raise ValueError(
                    f"rounding {rounding_mode!r} is not supported for {self.name}; use 'nearest'"
                )
            limit = self.max_value
            clamped = x.clamp(-limit, limit) if saturate else x
            return clamped.to(self.torch_dtype).float()
        magnitude = x.abs()
        saturating = saturate or not self.has_nan
        if saturating:
            magnitude.clamp_(max=self.max_value)
        else:
            # Round on an extended grid, then map what lands above max to the overflow value;
            # clamping at 2*max first keeps the magic-constant rounding inside fp32 range.
            magnitude.clamp_(max=2 * self.max_value)
        quantized = quantize_magnitude_(
            magnitude,
            self,
            rounding_mode=rounding_mode,
            random_bits=random_bits,
            num_random_bits=num_random_bits,
        )
        if not saturating:
            overflow = quantized > self.max_value
            quantized = torch.where(overflow, math.inf if self.has_inf else math.nan, quantized)
        return torch.copysign(quantized, x)


def quantize_magnitude_(
    values: torch.Tensor,
    element: ElementFormat,
    *,
    rounding_mode: str = "nearest",
    random_bits: torch.Tensor | None = None,
    num_random_bits: int = 8,
    scratch: torch.Tensor | None = None,
    scratch_for_stochastic: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round float32 `values` onto the grid of a float/int format, in place.

    The caller has already clamped `values` to +-max (saturation); NaN stays NaN. Stochastic
    rounding needs non-negative magnitudes (the caller restores the sign, which keeps it
    symmetric); nearest-even also accepts signed values, but a negative value that rounds to
    zero comes back as +0. The scratch tensors (same shape, float32) avoid allocations in
    mx.py's chunk loops.
    """
    if element.kind == "int":
        if rounding_mode == "nearest":
            return rounding.round_half_even_to_ulp_(values, element.step)
        return rounding.stochastic_round_to_ulp_(
            values, element.step, random_bits, num_random_bits, buffer=scratch_for_stochastic
        )
    if rounding_mode == "nearest":
        # c = 1.5 * 2^23 * ulp straight from the exponent field: one multiply, not two
        magic = float_ulp(values, element, out=scratch, factor=rounding.MAGIC)
        return rounding.add_sub_magic_(values, magic)
    ulp = float_ulp(values, element, out=scratch)
    return rounding.stochastic_round_to_ulp_(
        values, ulp, random_bits, num_random_bits, buffer=scratch_for_stochastic
    )


def float_ulp(
    values: torch.Tensor,
    element: ElementFormat,
    out: torch.Tensor | None = None,
    factor: float = 1.0,
) -> torch.Tensor:
    """factor * spacing of the format's grid around each value: 2^(floor(log2|v|) - M), never
    below the subnormal spacing. Read from the fp32 exponent field (no log2)."""
    exponent_bits = torch.bitwise_and(
        values.view(torch.int32),
        _FP32_EXPONENT_MASK,
        out=None if out is None else out.view(torch.int32),
    )
    ulp = exponent_bits.view(torch.float32)
    ulp.mul_(factor * 2.0 ** (-element.mantissa_bits))
    return ulp.clamp_(min=factor * element.min_subnormal)


@dataclass(frozen=True)
class E8M0Format:
    """OCP MX shared scale: 2^(code - 127) for codes 0..254, 0xFF is NaN, no zero, no sign."""

    name: str = "e8m0"
    num_bits: int = 8
    bias: int = 127
    ml_dtypes_name: str = "float8_e8m0fnu"

    @property
    def max_value(self) -> float:
        return 2.0**127

    @property
    def min_value(self) -> float:
        return 2.0**-127

    def exponent_to_scale(self, exponent: torch.Tensor) -> torch.Tensor:
        """Unbiased integer exponents in [-127, 127] (int32) -> float32 powers of two."""
        biased = (exponent + self.bias).to(torch.int32)
        # 2^-127 is an fp32 subnormal, so it has no exponent field of its own
        normal = (biased.clamp(min=1) << 23).view(torch.float32)
        return torch.where(biased == 0, 2.0**-127, normal)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.to(torch.int32)
        scale = self.exponent_to_scale(codes - self.bias)
        return torch.where(codes == 255, math.nan, scale)

    def encode(self, scales: torch.Tensor) -> torch.Tensor:
        """float32 powers of two in [2^-127, 2^127] (or NaN) -> uint8 codes."""
        scales = scales.float()
        nan = torch.isnan(scales)
        safe = torch.where(nan, 1.0, scales)
        mantissa, exponent = torch.frexp(safe)
        if not bool(((mantissa == 0.5) | nan).all()) or not bool(
            ((safe >= 2.0**-127) & (safe <= 2.0**127)).all()
        ):
            raise ValueError("E8M0 scales must be powers of two in [2^-127, 2^127] or NaN")
        codes = exponent.to(torch.int32) - 1 + self.bias
        return torch.where(nan, 255, codes).to(torch.uint8)

    def quantize(self, scales: torch.Tensor, *, rounding_mode: str = "nearest") -> torch.Tensor:
        """Round positive float32 scales to E8M0: "floor", "ceil" or "nearest" (ties up, like
        ml_dtypes). Below 2^-127 gives 2^-127; above 2^127, zero, negative, Inf or NaN gives NaN.
        """
        scales = scales.float()
        mantissa, frexp_exponent = torch.frexp(
            scales
        )  # scales = mantissa * 2^e, mantissa in [.5, 1)
        exponent = (frexp_exponent - 1).to(torch.int32)
        if rounding_mode == "floor":
            pass
        elif rounding_mode == "ceil":
            exponent = exponent + (mantissa != 0.5).to(torch.int32)
        elif rounding_mode == "nearest":
            exponent = exponent + (mantissa >= 0.75).to(torch.int32)
        else:
            raise ValueError(
                f"E8M0 rounding {rounding_mode!r} is unknown; use 'floor', 'ceil' or 'nearest'"
            )
        valid = (scales > 0) & torch.isfinite(scales) & (exponent <= 127)
        result = self.exponent_to_scale(exponent.clamp(-127, 127))
        return torch.where(valid, result, math.nan)


E4M3 = ElementFormat(
    "e4m3", "float", 8, 4, 3, 7, specials="fn", ml_dtypes_name="float8_e4m3fn",
    torch_dtype_name="float8_e4m3fn",
)  # fmt: skip
E5M2 = ElementFormat(
    "e5m2", "float", 8, 5, 2, 15, specials="ieee", ml_dtypes_name="float8_e5m2",
    torch_dtype_name="float8_e5m2",
)  # fmt: skip
E3M2 = ElementFormat("e3m2", "float", 6, 3, 2, 3, ml_dtypes_name="float6_e3m2fn")
E2M3 = ElementFormat("e2m3", "float", 6, 2, 3, 1, ml_dtypes_name="float6_e2m3fn")
E2M1 = ElementFormat("e2m1", "float", 4, 2, 1, 1, ml_dtypes_name="float4_e2m1fn")
INT8 = ElementFormat("int8", "int", 8, step=2.0**-6)
INT4 = ElementFormat("int4", "int", 4, step=1.0)
BF16 = ElementFormat("bf16", "native", 16, 8, 7, 127, torch_dtype_name="bfloat16")
FP16 = ElementFormat("fp16", "native", 16, 5, 10, 15, torch_dtype_name="float16")
FP32 = ElementFormat("fp32", "identity", 32, 8, 23, 127, torch_dtype_name="float32")
UE5M3 = ElementFormat("ue5m3", "float", 8, 5, 3, 15, signed=False, specials="top_exponent_nan")
E8M0 = E8M0Format()

ELEMENT_FORMATS: dict[str, ElementFormat] = {
    f.name: f for f in (E4M3, E5M2, E3M2, E2M3, E2M1, INT8, INT4, BF16, FP16, FP32)
}
# Block-scale formats: E8M0 (MX), E4M3 (NVFP4/NVINT4), UE5M3 (the FP4 design-space recipe).
SCALE_FORMATS: dict[str, ElementFormat | E8M0Format] = {"e8m0": E8M0, "e4m3": E4M3, "ue5m3": UE5M3}


def element_format(name: str) -> ElementFormat:
    try:
        return ELEMENT_FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown element format {name!r}; allowed: {', '.join(ELEMENT_FORMATS)}"
        ) from None


def scale_format(name: str) -> ElementFormat | E8M0Format:
    try:
        return SCALE_FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown scale format {name!r}; allowed: {', '.join(SCALE_FORMATS)}"
        ) from None

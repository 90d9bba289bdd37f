"""Element and scale formats against the spec tables and ml_dtypes (the golden reference)."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stalwart.quant import formats
from stalwart.quant.formats import E8M0, ELEMENT_FORMATS, UE5M3, element_format

ML_DTYPES_FORMATS = ["e4m3", "e5m2", "e3m2", "e2m3", "e2m1"]


def ml_dtype(fmt):
    return getattr(ml_dtypes, fmt.ml_dtypes_name)


def golden_quantize(fmt, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 values, uint8 codes) of ml_dtypes' round-to-nearest-even cast."""
    cast = values.numpy().astype(ml_dtype(fmt))
    decoded = torch.from_numpy(cast.astype(np.float32))
    codes = torch.from_numpy(cast.view(np.uint8).copy())
    return decoded, codes


def same_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise equal, NaN equal to NaN, and the sign of zero must match too."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    return both_nan | ((a == b) & (torch.signbit(a) == torch.signbit(b)))


def wide_random_values(num: int, seed: int) -> torch.Tensor:
    """Values spread over 60 binades around 1, plus exact grid midpoints are added per test."""
    generator = torch.Generator().manual_seed(seed)
    mantissa = torch.randn(num, generator=generator)
    exponent = torch.randint(-30, 30, (num,), generator=generator).float()
    return mantissa * torch.exp2(exponent)


# ---------------------------------------------------------------------------------------------
# Spec tables


@pytest.mark.parametrize(
    "name, max_value, min_normal, min_subnormal, emax",
    [
        ("e4m3", 448.0, 2.0**-6, 2.0**-9, 8),
        ("e5m2", 57344.0, 2.0**-14, 2.0**-16, 15),
        ("e3m2", 28.0, 0.25, 0.0625, 4),
        ("e2m3", 7.5, 1.0, 0.125, 2),
        ("e2m1", 6.0, 1.0, 0.5, 2),
        ("int8", 127 / 64, 2.0**-6, 2.0**-6, 0),
        ("int4", 7.0, 1.0, 1.0, 2),
    ],
)
def test_format_constants_match_the_ocp_spec_table(
    name, max_value, min_normal, min_subnormal, emax
):
    fmt = element_format(name)
    assert fmt.max_value == max_value
    assert fmt.min_normal == min_normal
    assert fmt.min_subnormal == min_subnormal
    assert fmt.emax == emax


def test_e2m1_grid_is_the_spec_list():
    expected = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    grid = element_format("e2m1").grid()
    assert grid.tolist() == [-v for v in reversed(expected[1:])] + expected


def test_special_values():
    e4m3, e5m2 = element_format("e4m3"), element_format("e5m2")
    assert math.isnan(e4m3.decode(torch.tensor([0x7F])).item())
    assert e4m3.decode(torch.tensor([0x7E])).item() == 448.0
    assert not e4m3.has_inf and e4m3.has_nan
    assert e5m2.decode(torch.tensor([0x7C])).item() == math.inf
    assert e5m2.decode(torch.tensor([0xFC])).item() == -math.inf
    assert math.isnan(e5m2.decode(torch.tensor([0x7D])).item())
    for name in ("e3m2", "e2m3", "e2m1", "int8", "int4"):
        table = element_format(name).code_table
        assert torch.isfinite(table).all(), name


# ---------------------------------------------------------------------------------------------
# Every code round-trips; decoding equals ml_dtypes bit for bit


@pytest.mark.parametrize("name", ML_DTYPES_FORMATS)
def test_every_code_decodes_like_ml_dtypes(name):
    fmt = element_format(name)
    codes = np.arange(1 << fmt.num_bits, dtype=np.uint8)
    golden = torch.from_numpy(codes.view(ml_dtype(fmt)).astype(np.float32))
    ours = fmt.decode(torch.from_numpy(codes))
    assert same_values(ours, golden).all()


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e3m2", "e2m3", "e2m1", "int8", "int4"])
def test_every_representable_value_round_trips_exactly(name):
    fmt = element_format(name)
    codes = torch.arange(1 << fmt.num_bits)
    values = fmt.decode(codes)
    representable = torch.isfinite(values) & (values.abs() <= fmt.max_value)
    values, codes = values[representable], codes[representable]
    assert torch.equal(fmt.quantize(values), values)
    assert torch.equal(fmt.quantize(values, saturate=False), values)
    assert torch.equal(fmt.encode(values).long(), codes)
    # the sign of zero survives quantize and encode
    assert torch.equal(torch.signbit(fmt.quantize(values)), torch.signbit(values))


def test_grid_sizes():
    # 2^bits codes minus duplicates (-0) minus specials (and the never-used -128 / -8 codes)
    assert element_format("e4m3").grid().numel() == 256 - 1 - 2
    assert element_format("e5m2").grid().numel() == 256 - 1 - 8
    assert element_format("e2m1").grid().numel() == 15
    assert element_format("int8").grid().numel() == 255
    assert element_format("int4").grid().numel() == 15


# ---------------------------------------------------------------------------------------------
# Quantization of random values matches ml_dtypes bit for bit


def grid_midpoints(fmt) -> torch.Tensor:
    grid = fmt.grid()
    return (grid[1:] + grid[:-1]) / 2  # exact ties in fp32


@pytest.mark.parametrize("name", ML_DTYPES_FORMATS)
def test_quantize_matches_ml_dtypes_saturating(name):
    fmt = element_format(name)
    values = torch.cat(
        [
            wide_random_values(200_000, seed=1),
            grid_midpoints(fmt),  # ties: round half to even
            fmt.grid() * 1.0000001,
            torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e30, -1e30]),
            torch.tensor([fmt.min_subnormal / 2, -fmt.min_subnormal / 2, fmt.min_subnormal * 0.51]),
        ]
    )
    ours = fmt.quantize(values, saturate=True)
    # the saturating conversion is ml_dtypes' cast of the input clipped to +-max
    golden, golden_codes = golden_quantize(fmt, values.clamp(-fmt.max_value, fmt.max_value))
    assert same_values(ours, golden).all()
    assert torch.equal(fmt.encode(ours), golden_codes)


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_quantize_matches_ml_dtypes_non_saturating_overflow(name):
    fmt = element_format(name)
    beyond = torch.tensor([464.0, 470.0, 480.0, 61439.0, 61440.0, 1e6, math.inf, math.nan])
    values = torch.cat([wide_random_values(100_000, seed=2), beyond, -beyond])
    ours = fmt.quantize(values, saturate=False)
    golden, golden_codes = golden_quantize(fmt, values)
    assert same_values(ours, golden).all()
    finite_or_signed = ~torch.isnan(values)  # ml_dtypes keeps NaN payload signs its own way
    assert torch.equal(fmt.encode(ours)[finite_or_signed], golden_codes[finite_or_signed])
    # E4M3 (fn) has no Inf: overflow is NaN; E5M2 overflows to Inf
    overflow = fmt.quantize(torch.tensor([1e6]), saturate=False)
    assert (math.isnan(overflow.item())) if name == "e4m3" else overflow.item() == math.inf


@pytest.mark.parametrize("name", ML_DTYPES_FORMATS)
def test_subnormals_match_ml_dtypes(name):
    fmt = element_format(name)
    generator = torch.Generator().manual_seed(3)
    values = (torch.rand(50_000, generator=generator) * 2 - 1) * fmt.min_normal * 1.5
    ours = fmt.quantize(values)
    golden, codes = golden_quantize(fmt, values)
    assert same_values(ours, golden).all()
    assert torch.equal(fmt.encode(ours), codes)
    assert (ours.abs() < fmt.min_normal).any()  # the test really exercises subnormals


def test_nan_propagates_and_inf_saturates():
    for name in ("e4m3", "e5m2", "e2m1", "int8", "int4"):
        fmt = element_format(name)
        result = fmt.quantize(torch.tensor([math.nan, math.inf, -math.inf]))
        assert math.isnan(result[0].item())
        assert result[1:].tolist() == [fmt.max_value, -fmt.max_value]


# ---------------------------------------------------------------------------------------------
# Integer formats: symmetric ranges


def test_mxint8_is_symmetric_two_complement_with_implicit_scale():
    int8 = element_format("int8")
    assert int8.decode(torch.tensor([0x80])).item() == -2.0  # the code exists...
    assert int8.quantize(torch.tensor([-2.0, -1.999, -100.0])).tolist() == [-127 / 64] * 3
    generator = torch.Generator().manual_seed(4)
    values = torch.randn(200_000, generator=generator) * 2
    quantized = int8.quantize(values)
    codes = int8.encode(quantized)
    assert not (codes == 0x80).any()  # ...but quantization never emits it
    golden = np.clip(np.rint(values.numpy() * 64), -127, 127) / 64  # rint: half to even
    assert torch.equal(quantized, torch.from_numpy(golden.astype(np.float32)))
    assert torch.equal(int8.decode(codes), quantized)


def test_int4_is_symmetric():
    int4 = element_format("int4")
    values = torch.linspace(-9, 9, 721)
    quantized = int4.quantize(values)
    golden = np.clip(np.rint(values.numpy()), -7, 7)
    assert torch.equal(quantized, torch.from_numpy(golden.astype(np.float32)))
    assert not (int4.encode(quantized) == 0x8).any()
    assert int4.quantize(torch.tensor([2.5, 3.5, -2.5])).tolist() == [2.0, 4.0, -2.0]


# ---------------------------------------------------------------------------------------------
# Scale formats


def test_ue5m3_codebook_is_pinned():
    assert UE5M3.max_value == 61440.0
    assert UE5M3.min_normal == 2.0**-14
    assert UE5M3.min_subnormal == 2.0**-17
    table = UE5M3.code_table
    assert torch.isnan(table[0xF8:]).all() and torch.isfinite(table[:0xF8]).all()
    assert table[0xF7].item() == 61440.0 and table[1].item() == 2.0**-17
    assert UE5M3.grid().numel() == 248


def test_ue5m3_rounds_to_nearest_grid_value_ties_to_even_code():
    grid = UE5M3.grid().double()
    generator = torch.Generator().manual_seed(5)
    values = torch.exp2(torch.rand(20_000, generator=generator) * 36 - 19).float()
    values = torch.cat([values, ((grid[1:] + grid[:-1]) / 2).float()])
    ours = UE5M3.quantize(values)
    distance = (values.double()[:, None] - grid[None, :]).abs()
    nearest = distance.min(dim=1).values
    candidates = distance == nearest[:, None]
    # among equidistant neighbours pick the even code (codes are in grid order)
    index = torch.where(candidates, torch.arange(grid.numel()) % 2 == 0, False).float().argmax(1)
    single = candidates.sum(1) == 1
    index = torch.where(single, candidates.float().argmax(1), index)
    expected = grid[index].clamp(max=61440.0).float()
    assert torch.equal(ours, expected)


def test_e8m0_decodes_like_ml_dtypes_and_has_no_zero():
    codes = np.arange(256, dtype=np.uint8)
    golden = torch.from_numpy(codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32))
    ours = E8M0.decode(torch.from_numpy(codes))
    assert same_values(ours, golden).all()
    assert ours[0].item() == 2.0**-127 and ours[254].item() == 2.0**127
    assert math.isnan(ours[255].item()) and not (ours == 0).any()
    assert torch.equal(E8M0.encode(ours), torch.from_numpy(codes))


def test_e8m0_nearest_matches_ml_dtypes():
    generator = torch.Generator().manual_seed(6)
    values = torch.exp2(torch.rand(100_000, generator=generator) * 250 - 125)
    values = torch.cat([values, torch.tensor([1.5, 3.0, 0.75, 2.0**-130, 0.0, math.inf])])
    ours = E8M0.quantize(values, rounding_mode="nearest")
    golden = torch.from_numpy(values.numpy().astype(ml_dtypes.float8_e8m0fnu).astype(np.float32))
    assert same_values(ours, golden).all()


def test_e8m0_floor_and_ceil():
    values = torch.tensor([1.0, 1.5, 3.99, 2.0**-127, 2.0**127 * 1.5])
    floor = E8M0.quantize(values, rounding_mode="floor")
    ceil = E8M0.quantize(values, rounding_mode="ceil")
    assert floor[:4].tolist() == [1.0, 1.0, 2.0, 2.0**-127]
    assert ceil[:4].tolist() == [1.0, 2.0, 4.0, 2.0**-127]
    assert floor[4].item() == 2.0**127 and math.isnan(ceil[4].item())


def test_unknown_format_names_list_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: e4m3, e5m2"):
        element_format("e9m9")
    with pytest.raises(ValueError, match="allowed: e8m0, e4m3, ue5m3"):
        formats.scale_format("fp32")


def test_encode_rejects_values_off_the_grid():
    with pytest.raises(ValueError, match="quantize them first"):
        element_format("e2m1").encode(torch.tensor([0.7]))
    with pytest.raises(ValueError, match="quantize them first"):
        element_format("int8").encode(torch.tensor([0.001]))


def test_native_and_identity_formats():
    values = wide_random_values(10_000, seed=7)
    assert torch.equal(ELEMENT_FORMATS["fp32"].quantize(values), values)
    assert torch.equal(ELEMENT_FORMATS["bf16"].quantize(values), values.bfloat16().float())
    with pytest.raises(ValueError, match="nearest"):
        ELEMENT_FORMATS["bf16"].quantize(values, rounding_mode="stochastic")


@settings(max_examples=60, deadline=None)
@given(
    values=arrays(
        np.float32,
        st.integers(1, 64),
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
    ),
    name=st.sampled_from(["e4m3", "e5m2"]),
)
def test_any_float32_quantizes_like_ml_dtypes(values, name):
    """Property: for arbitrary fp32 inputs (NaN, Inf, subnormals, huge), the non-saturating
    cast is ml_dtypes' cast, and the saturating one is ml_dtypes' cast of the clipped input."""
    fmt = element_format(name)
    x = torch.from_numpy(values.copy())
    golden, _ = golden_quantize(fmt, x)
    assert same_values(fmt.quantize(x, saturate=False), golden).all()
    clipped, _ = golden_quantize(fmt, x.clamp(-fmt.max_value, fmt.max_value))
    assert same_values(fmt.quantize(x), clipped).all()


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("name", ML_DTYPES_FORMATS)
def test_unscaled_quantize_dequantize_matches_ml_dtypes(name, use_kernels):
    """The fused path (compiled kernels or eager torch) with no block scale is the element
    cast itself: ml_dtypes' saturating conversion, bit for bit."""
    from stalwart.quant import cpu_kernels
    from stalwart.quant.mx import QuantSpec, quantize_dequantize

    if use_kernels and cpu_kernels._compiler() is None:
        pytest.skip("no C compiler")
    fmt = element_format(name)
    values = torch.cat(
        [
            wide_random_values(100_000, seed=3),
            grid_midpoints(fmt),
            torch.tensor([fmt.min_subnormal / 2, -fmt.min_subnormal / 2, fmt.min_subnormal * 0.51]),
        ]
    )
    cpu_kernels.set_enabled(use_kernels)
    try:
        ours = quantize_dequantize(values, QuantSpec(element=name))
    finally:
        cpu_kernels.set_enabled(None)  # back to the environment's setting
    golden, _ = golden_quantize(fmt, values.clamp(-fmt.max_value, fmt.max_value))
    # the fused path documents one difference: a negative value that rounds to zero gives +0
    assert ((ours == golden) | (torch.isnan(ours) & torch.isnan(golden))).all()

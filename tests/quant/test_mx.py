"""Block quantization: scale rules against their formulas, NVFP4's two-level scale against an
independent ml_dtypes computation, 2-D blocks, NaN handling, fused == two-step."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from stalwart.quant import mx
from stalwart.quant.formats import element_format
from stalwart.quant.mx import QuantSpec, mx_spec, nv_spec, quantize, quantize_dequantize

ALL_SPECS = [
    mx_spec("e4m3"),
    mx_spec("e5m2", scale_rounding="ceil"),
    mx_spec("e3m2"),
    mx_spec("e2m3", scale_rounding="rceil"),
    mx_spec("e2m1"),
    mx_spec("int8", scale_rounding="ceil"),
    mx_spec("e2m1", block_2d=True),
    nv_spec("e2m1"),
    nv_spec("int4"),
    nv_spec("e2m1", scale="ue5m3"),
    nv_spec("e2m1", block_2d=True),
    QuantSpec(element="e4m3", scaling="tensor"),
    QuantSpec(element="e5m2", scaling="tensor"),
    QuantSpec(element="e2m1"),
    QuantSpec(element="bf16"),
    mx_spec("e2m1", rounding="stochastic"),
    nv_spec("e2m1", rounding="stochastic"),
    mx_spec("int8", rounding="stochastic", num_random_bits=4),
]


def blocks_with_spread(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    magnitude = torch.exp2(torch.randint(-12, 12, (rows, 1), generator=generator).float())
    return torch.randn(rows, cols, generator=generator) * magnitude


def qsnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum()))


# ---------------------------------------------------------------------------------------------
# MX scale selection


@pytest.mark.parametrize("element", ["e4m3", "e5m2", "e2m1", "e2m3", "e3m2", "int8"])
@pytest.mark.parametrize("scale_rounding", ["floor", "ceil", "rceil"])
def test_e8m0_scale_follows_the_formula(element, scale_rounding):
    fmt = element_format(element)
    x = blocks_with_spread(64, 32 * 8, seed=0)
    q = quantize(x, mx_spec(element, scale_rounding=scale_rounding))
    amax = x.double().abs().view(64, 8, 32).amax(-1)
    if scale_rounding == "floor":  # OCP MX v1.0: X = 2^(floor(log2 amax) - emax_elem)
        exponent = torch.floor(torch.log2(amax)) - fmt.emax
    elif scale_rounding == "ceil":  # X = 2^ceil(log2(amax / max_elem))
        exponent = torch.ceil(torch.log2(amax / fmt.max_value))
    else:  # fp32 division first, then round up to a power of two
        exponent = torch.ceil(torch.log2((amax.float() / fmt.max_value).double()))
    expected = torch.exp2(exponent.clamp(-127, 127)).float()
    assert torch.equal(q.block_scales, expected)
    # elements are the saturating quantization of x / X
    scaled = x.view(64, 8, 32) / q.block_scales[..., None]
    assert torch.equal(q.elements, fmt.quantize(scaled).view(64, -1))
    assert torch.equal(q.scale_codes().long(), (exponent.clamp(-127, 127) + 127).long())


def test_floor_saturates_where_ceil_does_not():
    e4m3 = element_format("e4m3")
    x = torch.full((1, 32), 1.0)
    x[0, 0] = 500.0  # amax/X = 500/256 * 256 ... floor: X = 2^(8-8) = 1, 500 > 448 saturates
    floor = quantize(x, mx_spec("e4m3"))
    ceil = quantize(x, mx_spec("e4m3", scale_rounding="ceil"))
    assert floor.block_scales.item() == 1.0 and floor.elements[0, 0].item() == e4m3.max_value
    assert ceil.block_scales.item() == 2.0 and ceil.dequantize()[0, 0].item() == 512.0
    # ceil never needs to saturate: |x| / X <= max for every element
    y = blocks_with_spread(128, 256, seed=1)
    for element in ("e4m3", "e2m1", "int8"):
        q = quantize(y, mx_spec(element, scale_rounding="ceil"))
        ratio = y.view(128, 8, 32).abs() / q.block_scales[..., None]
        assert ratio.max() <= element_format(element).max_value


def test_mxint8_never_emits_the_minus_128_code():
    x = blocks_with_spread(256, 256, seed=2)
    x[:, ::32] = -x.view(256, 8, 32).abs().amax(-1) * 1.0  # each block's extreme is negative
    for scale_rounding in ("floor", "ceil", "rceil"):
        q = quantize(x, mx_spec("int8", scale_rounding=scale_rounding))
        codes = q.element_codes()
        assert not (codes == 0x80).any(), scale_rounding
        assert q.elements.min() >= -127 / 64


def test_zero_and_tiny_blocks():
    x = torch.zeros(2, 64)
    x[1, 32:] = 1e-40  # fp32 subnormals
    for spec in (mx_spec("e4m3"), nv_spec(), QuantSpec(element="e4m3", scaling="tensor")):
        y = quantize_dequantize(x, spec)
        assert torch.isfinite(y).all() and torch.equal(y[0], torch.zeros(64))
    q = quantize(x, mx_spec("e4m3"))
    assert q.block_scales[0, 0].item() == 2.0**-127  # the smallest E8M0 scale, not zero


def test_nan_or_inf_makes_only_its_mx_block_nan():
    x = torch.randn(2, 64)
    x[0, 5] = math.nan
    x[1, 40] = math.inf
    q = quantize(x, mx_spec("e4m3"))
    assert q.scale_codes()[0, 0].item() == 0xFF and q.scale_codes()[1, 1].item() == 0xFF
    y = q.dequantize()
    assert torch.isnan(y[0, :32]).all() and torch.isnan(y[1, 32:]).all()
    assert torch.isfinite(y[0, 32:]).all() and torch.isfinite(y[1, :32]).all()
    fused = quantize_dequantize(x, mx_spec("e4m3"))
    assert torch.equal(torch.isnan(fused), torch.isnan(y))


# ---------------------------------------------------------------------------------------------
# NV two-level scaling against an independent ml_dtypes computation


def nvfp4_reference(x: np.ndarray, scale_dtype, scale_max: float):
    """TE's nvfp4 formula, written with numpy + ml_dtypes (float32 arithmetic throughout)."""
    x = x.astype(np.float32)
    blocks = x.reshape(x.shape[0], -1, 16)
    amax_block = np.abs(blocks).max(-1)
    amax_tensor = np.float32(np.abs(x).max())
    s_global = np.float32(amax_tensor / np.float32(scale_max * 6.0)) if amax_tensor else 1.0
    raw = (amax_block / np.float32(6.0)) / np.float32(s_global)
    s_block = np.clip(raw, 0, scale_max).astype(scale_dtype).astype(np.float32)
    effective = (s_block * np.float32(s_global)).astype(np.float32)
    safe = np.where(effective == 0, np.float32(1), effective)
    scaled = np.clip(blocks / safe[..., None], -6, 6)
    elements = scaled.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    elements = np.where((effective == 0)[..., None], np.float32(0), elements)
    return elements.reshape(x.shape), s_block, np.float32(s_global)


def test_nvfp4_two_level_scale_matches_the_formula():
    x = blocks_with_spread(64, 128, seed=3)
    x[0, :16] = 1e-9  # a block whose E4M3 scale underflows to zero
    q = quantize(x, nv_spec("e2m1", scale="e4m3"))
    elements, s_block, s_global = nvfp4_reference(x.numpy(), ml_dtypes.float8_e4m3fn, 448.0)
    assert q.tensor_scale.item() == s_global
    assert torch.equal(q.block_scales, torch.from_numpy(s_block))
    assert torch.equal(q.elements, torch.from_numpy(elements))
    assert (q.block_scales == 0).any()
    assert torch.equal(q.dequantize()[0, :16], torch.zeros(16))


def test_ue5m3_scales_cover_what_e4m3_flushes():
    x = blocks_with_spread(64, 128, seed=4)
    x[0] *= 1e4  # one huge row: E4M3 block scales of the other rows underflow
    e4m3 = quantize(x, nv_spec(scale="e4m3"))
    ue5m3 = quantize(x, nv_spec(scale="ue5m3"))
    assert (e4m3.block_scales == 0).sum() > (ue5m3.block_scales == 0).sum()
    lost_e4m3 = (e4m3.dequantize() == 0).all(dim=1).sum()
    lost_ue5m3 = (ue5m3.dequantize() == 0).all(dim=1).sum()
    assert lost_e4m3 > 0 and lost_ue5m3 == 0  # whole rows vanish with E4M3 scales


def test_nv_tensor_scale_is_one_for_a_zero_tensor():
    q = quantize(torch.zeros(4, 32), nv_spec())
    assert q.tensor_scale.item() == 1.0 and torch.equal(q.dequantize(), torch.zeros(4, 32))


@pytest.mark.parametrize("spec", [nv_spec(block_2d=True), mx_spec("e2m1", block_2d=True)])
def test_2d_blocks_give_the_same_matrix_for_either_reduction_dim(spec):
    weight = blocks_with_spread(48, 80, seed=5)  # not multiples of 16: padding on both sides
    along_rows = quantize_dequantize(weight, spec, dim=1)
    along_cols = quantize_dequantize(weight, spec, dim=0)
    transposed = quantize_dequantize(weight.T.contiguous(), spec, dim=1)
    assert torch.equal(along_rows, along_cols)
    assert torch.equal(along_rows, transposed.T)
    tiles = (3, 5) if spec.block_size == 16 else (2, 3)
    assert quantize(weight, spec).block_scales.shape == tiles


def test_1d_blocks_follow_the_chosen_dim():
    x = blocks_with_spread(32, 64, seed=6)
    spec = mx_spec("e4m3")
    along_cols = quantize(x, spec, dim=0)
    assert along_cols.block_scales.shape == (1, 64)
    assert torch.equal(along_cols.dequantize(), quantize(x.T.contiguous(), spec).dequantize().T)


# ---------------------------------------------------------------------------------------------
# The fused pass equals quantize().dequantize()


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("shape, dim", [((37, 100), -1), ((37, 100), 0), ((3, 5, 96), 1)])
def test_fused_equals_two_step(spec, shape, dim):
    if spec.block_2d and len(shape) != 2:
        pytest.skip("2-D blocks are for matrices")
    x = blocks_with_spread(int(np.prod(shape[:-1])), shape[-1], seed=7).view(shape)
    x.view(-1)[::97] = 0.0
    two_step = quantize(x, spec, dim, generator=torch.Generator().manual_seed(1)).dequantize()
    fused = quantize_dequantize(x, spec, dim, generator=torch.Generator().manual_seed(1))
    assert fused.shape == x.shape
    assert torch.equal(fused, two_step)
    values, tensor_scale = mx.quantize_for_gemm(
        x, spec, dim, generator=torch.Generator().manual_seed(1)
    )
    assert torch.allclose(values * tensor_scale, fused, rtol=2**-22, atol=0)


@pytest.mark.parametrize(
    "spec", [s for s in ALL_SPECS if s.scaling == "mx"], ids=lambda s: s.describe()
)
def test_fused_equals_two_step_at_the_ends_of_the_fp32_range(spec):
    """The single-pass MX path rounds on x itself; huge blocks (> 2^96) take the divide route
    and fp32-subnormal blocks hit the 2^-127 scale: both must still match the two-step path."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(12))
    x[0] *= 2.0**100
    x[1] *= 3e38 / x[1].abs().max()
    x[2] *= 1e-40
    x[3, :32] = 0.0
    x[4, 7] = -x[4].abs().max() * 1.99  # just under a binade edge
    two_step = quantize(x, spec, generator=torch.Generator().manual_seed(3)).dequantize()
    fused = quantize_dequantize(x, spec, generator=torch.Generator().manual_seed(3))
    assert torch.equal(fused, two_step)


def test_cpu_chunking_does_not_change_results(monkeypatch):
    x = blocks_with_spread(100, 320, seed=8)
    specs = [mx_spec("e4m3"), mx_spec("int8"), nv_spec(), nv_spec(rounding="stochastic")]
    whole = [quantize_dequantize(x, s, generator=torch.Generator().manual_seed(2)) for s in specs]
    monkeypatch.setattr(mx, "CPU_CHUNK_ELEMENTS", 80)  # 5 NV blocks, 2.5 MX blocks
    chunked = [quantize_dequantize(x, s, generator=torch.Generator().manual_seed(2)) for s in specs]
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.describe())
def test_accelerator_code_path_matches_the_cpu_paths(spec, monkeypatch):
    """CPU twin of the CUDA path: whole-tensor ops instead of the chunk loops and per-chunk
    scales (tests/quant/test_linear.py checks CUDA against CPU bit for bit on a GPU)."""
    x = blocks_with_spread(40, 96, seed=13)
    x[5, 3] = math.nan
    expected = quantize_dequantize(x, spec, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(mx, "_runs_chunked", lambda rows: False)
    whole = quantize_dequantize(x, spec, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.isnan(whole), torch.isnan(expected))
    assert torch.equal(whole.nan_to_num(), expected.nan_to_num())


def test_out_argument_receives_the_result():
    x = blocks_with_spread(16, 64, seed=9)
    out = torch.empty_like(x)
    result = quantize_dequantize(x, mx_spec("e4m3"), out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, quantize_dequantize(x, mx_spec("e4m3")))
    with pytest.raises(ValueError, match="out must be float32"):
        quantize_dequantize(x, mx_spec("e4m3"), out=torch.empty(3))


# ---------------------------------------------------------------------------------------------
# Accuracy orderings the literature reports (qualitative, measured here)


def test_qsnr_orderings_on_gaussian_data():
    x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(10))
    qsnr = {s: qsnr_db(x, quantize_dequantize(x, spec)) for s, spec in {
        "mxint8": mx_spec("int8", scale_rounding="ceil"),
        "mxfp8": mx_spec("e4m3", scale_rounding="ceil"),
        "mxfp6": mx_spec("e2m3", scale_rounding="ceil"),
        "mxfp4": mx_spec("e2m1", scale_rounding="ceil"),
        "nvfp4": nv_spec(),
    }.items()}  # fmt: skip
    assert qsnr["mxint8"] > qsnr["mxfp8"] > qsnr["mxfp6"] > qsnr["nvfp4"] > qsnr["mxfp4"]
    assert 29 < qsnr["mxfp8"] < 33 and qsnr["mxint8"] > 38  # paper: 31.5 and 40.35 dB


# ---------------------------------------------------------------------------------------------
# Spec validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"element": "e9m9"}, "unknown element format 'e9m9'; allowed: e4m3"),
        ({"element": "e4m3", "scaling": "block"}, "unknown scaling 'block'; allowed: none"),
        ({"element": "e4m3", "scaling": "mx", "scale_format": "e4m3"}, "use scaling 'nv'"),
        ({"element": "e2m1", "scaling": "nv", "scale_format": "e8m0"}, "use scaling 'mx'"),
        ({"element": "e2m1", "scaling": "tensor", "block_2d": True}, "block_2d needs block"),
        ({"element": "fp32", "scaling": "mx"}, "not a low-precision format"),
        ({"element": "bf16", "rounding": "stochastic"}, "rounding 'nearest' only"),
        ({"element": "e4m3", "rounding": "up"}, "unknown rounding 'up'"),
        ({"element": "e4m3", "scaling": "mx", "scale_rounding": "even"}, "unknown scale_rounding"),
        ({"element": "e4m3", "scaling": "mx", "block_size": 1}, "block_size must be in 2..4096"),
        ({"element": "e4m3", "scaling": "mx", "block_size": "32"}, "block_size must be an integer"),
    ],
)
def test_bad_specs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_2d_blocks_need_a_matrix():
    with pytest.raises(ValueError, match="needs a 2-D tensor"):
        quantize(torch.ones(2, 3, 32), nv_spec(block_2d=True))

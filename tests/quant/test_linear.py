"""QuantLinear: exact with FP32 formats, each operand quantized along its reduction dim,
gradients within the format's tolerance of a float reference, reproducible SR, native FP8."""

import pytest
import torch
from torch import nn

from stalwart.quant.linear import GemmQuant, LinearQuant, QuantLinear, quantized_matmul
from stalwart.quant.mx import QuantSpec, mx_spec, nv_spec, quantize_dequantize
from stalwart.quant.recipes import RECIPE_NAMES, get_recipe
from stalwart.quant.transforms import HadamardTransform

QUANTIZING_RECIPES = [name for name in RECIPE_NAMES if get_recipe(name).converts]


def make_pair(recipe: LinearQuant, bias=True, seed=0, in_features=64, out_features=48):
    torch.manual_seed(seed)
    reference = nn.Linear(in_features, out_features, bias=bias)
    quantized = QuantLinear.from_linear(
        nn.Linear(in_features, out_features, bias=bias), recipe, seed=seed
    )
    with torch.no_grad():
        quantized.weight.copy_(reference.weight)
        if bias:
            quantized.bias.copy_(reference.bias)
    return reference, quantized


def run(layer, x, grad_output):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(grad_output)
    bias_grad = layer.bias.grad if layer.bias is not None else None
    return y.detach(), x.grad, layer.weight.grad, bias_grad


def relative_error(approx, exact):
    return float((approx - exact).norm() / exact.norm())


def test_fp32_formats_are_exactly_nn_linear():
    reference, quantized = make_pair(LinearQuant())
    x = torch.randn(4, 16, 64)
    grad_output = torch.randn(4, 16, 48)
    for ours, theirs in zip(run(quantized, x, grad_output), run(reference, x, grad_output)):
        assert torch.equal(ours, theirs)


def test_fp32_formats_with_a_hadamard_transform_are_exact_up_to_rounding():
    identity_rht = GemmQuant(hadamard_size=16)
    recipe = LinearQuant(identity_rht, identity_rht, identity_rht)
    reference, quantized = make_pair(recipe)
    x, grad_output = torch.randn(2, 24, 64), torch.randn(2, 24, 48)
    for ours, theirs in zip(run(quantized, x, grad_output), run(reference, x, grad_output)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_each_operand_is_quantized_along_its_reduction_dimension():
    """Y = Q(X) Q(W)^T over in_features, dX = Q(dY) Q(W) over out_features, dW = Q(dY)^T Q(X)
    over tokens: rebuilt here from quantize_dequantize with the matching dims."""
    # MXINT8: a fixed-point grid per block, so which elements share a scale really matters
    spec = mx_spec("int8", scale_rounding="ceil")
    gemm = GemmQuant(spec, spec)
    _, layer = make_pair(LinearQuant(gemm, gemm, gemm), bias=False)
    spread = torch.logspace(-3, 1, 64)
    x = torch.randn(64, 64) * spread * spread[torch.randperm(64)][:, None]
    grad_output = torch.randn(64, 48) * torch.logspace(-2, 1, 48) * spread[:, None]
    y, grad_input, grad_weight, _ = run(layer, x, grad_output)
    w = layer.weight.detach()

    def q(t, dim):
        return quantize_dequantize(t, spec, dim)

    expected_y = q(x, 1) @ q(w, 1).T
    expected_dx = q(grad_output, 1) @ q(w, 0)
    expected_dw = q(grad_output, 0).T @ q(x, 0)
    for ours, expected in ((y, expected_y), (grad_input, expected_dx), (grad_weight, expected_dw)):
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    # quantizing along the wrong dimension gives a clearly different result
    assert relative_error(q(grad_output, 1).T @ q(x, 1), expected_dw) > 1e-3


# Relative (Frobenius) error bounds of Y, dX and dW against FP32 on Gaussian data, set at about
# twice the measured error: 8-bit formats ~1-4%, 4-bit ones ~15-25%.
TOLERANCE = {
    "mxfp8": 0.08,
    "mxint8": 0.025,
    "fp8_tensorwise": 0.12,
    "mxfp4": 0.35,
    "nvfp4": 0.35,
    "nvint4_rht": 0.3,
    "fp4_ue5m3": 0.35,
}


@pytest.mark.parametrize("name", QUANTIZING_RECIPES)
def test_gradients_match_a_float_reference_within_the_format_tolerance(name):
    reference, quantized = make_pair(get_recipe(name).linear, in_features=128, out_features=96)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, 128, generator=generator)
    grad_output = torch.randn(4, 32, 96, generator=generator)
    ours = run(quantized, x, grad_output)
    exact = run(reference, x, grad_output)
    errors = [relative_error(a, b) for a, b in zip(ours[:3], exact[:3])]
    assert max(errors) < TOLERANCE[name], errors
    assert min(errors) > 1e-4  # it really quantized
    assert torch.equal(ours[3], exact[3])  # the bias gradient stays in high precision


def test_eight_bit_recipes_are_closer_than_four_bit_ones():
    errors = {}
    for name in ("mxint8", "mxfp8", "nvfp4", "mxfp4"):
        reference, quantized = make_pair(get_recipe(name).linear, in_features=128, out_features=96)
        x = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
        grad_output = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
        errors[name] = relative_error(
            run(quantized, x, grad_output)[0], run(reference, x, grad_output)[0]
        )
    assert errors["mxint8"] < errors["mxfp8"] < errors["nvfp4"] < errors["mxfp4"]


def test_random_hadamard_in_wgrad_tames_token_outliers():
    # INT4 is where the rotation pays (arXiv 2510.25602: NVINT4 beats NVFP4 only with RHT;
    # an FP4 grid already copes with outliers, and measured here RHT does not help it)
    spec = nv_spec("int4")
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(4))
    x[::37] *= 30.0  # a few outlier tokens: the wgrad blocks run along tokens
    grad_output = torch.randn(256, 48, generator=torch.Generator().manual_seed(5))
    exact = grad_output.T @ x
    plain = quantized_matmul(grad_output.T, x.T, GemmQuant(spec, spec))
    rotated_gemm = GemmQuant(spec, spec, hadamard_size=16)
    rotated = quantized_matmul(grad_output.T, x.T, rotated_gemm)
    assert relative_error(rotated, exact) < 0.85 * relative_error(plain, exact)
    # and it is exactly "rotate both, quantize, multiply, apply the tensor scales"
    transform = HadamardTransform(16, seed=0)
    a, b = transform.apply(grad_output.T), transform.apply(x.T)
    expected = quantize_dequantize(a, spec) @ quantize_dequantize(b, spec).T
    torch.testing.assert_close(rotated, expected, rtol=1e-5, atol=1e-4)


def test_hadamard_pads_a_token_count_that_is_not_a_multiple_of_the_block():
    gemm = GemmQuant(hadamard_size=16)
    a, b = torch.randn(8, 50), torch.randn(6, 50)
    torch.testing.assert_close(quantized_matmul(a, b, gemm), a @ b.T, rtol=1e-5, atol=1e-5)


def test_stochastic_rounding_is_reproducible_and_advances_per_call():
    recipe = get_recipe("nvfp4").linear
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    grad_output = torch.randn(32, 48, generator=torch.Generator().manual_seed(7))
    _, first = make_pair(recipe, seed=3)
    _, second = make_pair(recipe, seed=3)
    one = run(first, x, grad_output)
    two = run(second, x, grad_output)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    first.weight.grad = None
    again = run(first, x, grad_output)  # next call: new random bits
    assert not torch.equal(again[2], one[2])
    assert torch.equal(again[0], one[0])  # the forward pass uses nearest rounding
    # restoring the counters replays the same draws
    second.load_quant_state(first.quant_state())
    second.num_backward_calls -= 1
    second.num_forward_calls -= 1
    second.weight.grad = None
    assert torch.equal(run(second, x, grad_output)[2], again[2])
    assert first.quant_state() == {"num_forward_calls": 2, "num_backward_calls": 2}


def test_from_linear_keeps_the_same_parameters():
    linear = nn.Linear(32, 16)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    layer = QuantLinear.from_linear(linear, get_recipe("mxfp8").linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert list(layer.state_dict()) == ["weight", "bias"]
    before = linear.weight.detach().clone()
    layer(torch.randn(8, 32)).sum().backward()
    optimizer.step()
    assert not torch.equal(linear.weight, before)
    assert "mx32" in repr(layer)


def test_low_precision_inputs_and_autocast():
    _, layer = make_pair(get_recipe("mxfp8").linear)
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    layer.weight.data = layer.weight.data.bfloat16()
    layer.bias.data = layer.bias.data.bfloat16()
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert layer.weight.grad.dtype == torch.bfloat16
    _, layer = make_pair(get_recipe("mxfp8").linear)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(8, 64)).dtype == torch.bfloat16


def test_fp8_tensorwise_emulation_is_the_scaled_product():
    """CPU twin of the native torch._scaled_mm path: the emulated GEMM is exactly
    (Q(a) @ Q(b)^T) * s_a * s_b, which is what _scaled_mm computes in hardware."""
    gemm = get_recipe("fp8_tensorwise").linear.forward
    a = torch.randn(64, 128, generator=torch.Generator().manual_seed(8)) * 3
    b = torch.randn(32, 128, generator=torch.Generator().manual_seed(9))
    ours = quantized_matmul(a, b, gemm)
    amax_a, amax_b = a.abs().max(), b.abs().max()
    scale_a, scale_b = amax_a / 448, amax_b / 448
    qa = (a / scale_a).to(torch.float8_e4m3fn).float()  # torch's own fp8 cast as a check
    qb = (b / scale_b).to(torch.float8_e4m3fn).float()
    assert torch.equal(ours, (qa @ qb.T) * (scale_a * scale_b))


def test_native_fp8_call_matches_emulation_on_cpu(monkeypatch):
    """CPU twin of the GPU native path: torch._scaled_mm also runs on CPU (exact FP32
    accumulation), so the very call the GPU path makes (operand layouts, scale tensors,
    e5m2 x e4m3 pairing) is checked against emulation here."""
    from stalwart.quant import linear as linear_module

    calls = []
    real_scaled_mm = torch._scaled_mm

    def counting_scaled_mm(*args, **kwargs):
        calls.append(args[0].dtype)
        return real_scaled_mm(*args, **kwargs)

    monkeypatch.setattr(linear_module, "native_fp8_available", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", counting_scaled_mm)
    recipe = get_recipe("fp8_tensorwise").linear
    emulated_recipe = LinearQuant(recipe.forward, recipe.dgrad, recipe.wgrad, native_fp8=False)
    _, native = make_pair(recipe, in_features=64, out_features=32)
    _, emulated = make_pair(emulated_recipe, in_features=64, out_features=32)
    x, grad_output = torch.randn(2, 16, 64), torch.randn(2, 16, 32)
    for a, b in zip(run(native, x, grad_output), run(emulated, x, grad_output)):
        # same exact products; the epilogue applies s_a and s_b in another order (1-2 ulp)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert calls == [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e5m2]
    # shapes the FP8 kernels cannot take (not multiples of 16) fall back to emulation
    calls.clear()
    _, odd = make_pair(recipe, in_features=40, out_features=24)
    run(odd, torch.randn(3, 40), torch.randn(3, 24))
    assert calls == []


def test_gemm_quant_validation():
    with pytest.raises(ValueError, match="hadamard_size must be 0"):
        GemmQuant(hadamard_size=24)
    with pytest.raises(ValueError, match="reduction dims differ"):
        quantized_matmul(torch.ones(2, 3), torch.ones(2, 4), GemmQuant())


# ---------------------------------------------------------------------------------------------
# GPU: the native FP8 GEMM and CUDA quantization match the CPU emulation


def _native_fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
def test_native_fp8_gemm_matches_emulation():
    if not _native_fp8_capable():
        pytest.skip("needs compute capability 8.9+ for FP8 GEMMs")
    linear = get_recipe("fp8_tensorwise").linear
    generator = torch.Generator().manual_seed(10)
    for gemm in (linear.forward, linear.dgrad):
        a = (torch.randn(256, 512, generator=generator) * 4).cuda()
        b = torch.randn(384, 512, generator=generator).cuda()
        native = quantized_matmul(a, b, gemm, allow_native=True)
        emulated = quantized_matmul(a, b, gemm, allow_native=False)
        # Products of FP8 values are exact; only the accumulation differs. Hopper's FP8 tensor
        # cores keep fewer accumulator bits than FP32 between promotions, so bound the
        # difference by 2^-10 of the sum of |products| (a wrong scale or layout is off by O(1)).
        abs_sum = quantize_dequantize(a, gemm.a).abs() @ quantize_dequantize(b, gemm.b).abs().T
        assert ((native - emulated).abs() <= abs_sum * 2.0**-10).all()
        assert relative_error(native, emulated) < 1e-3


@pytest.mark.gpu
def test_native_fp8_quant_linear_matches_emulation():
    if not _native_fp8_capable():
        pytest.skip("needs compute capability 8.9+ for FP8 GEMMs")
    recipe = get_recipe("fp8_tensorwise").linear
    emulated_recipe = LinearQuant(recipe.forward, recipe.dgrad, recipe.wgrad, native_fp8=False)
    _, native = make_pair(recipe, in_features=256, out_features=128)
    _, emulated = make_pair(emulated_recipe, in_features=256, out_features=128)
    native, emulated = native.cuda(), emulated.cuda()
    x = torch.randn(4, 64, 256, device="cuda")
    grad_output = torch.randn(4, 64, 128, device="cuda")
    for a, b in zip(run(native, x, grad_output), run(emulated, x, grad_output)):
        assert relative_error(a, b) < 1e-3  # quantization error itself is ~4e-2


@pytest.mark.gpu
@pytest.mark.parametrize(
    "spec",
    [mx_spec("e4m3"), mx_spec("int8", scale_rounding="ceil"), mx_spec("e2m1"), nv_spec(),
     nv_spec(block_2d=True), nv_spec("int4", scale="ue5m3"), QuantSpec(element="e5m2", scaling="tensor")],
    ids=lambda s: s.describe(),
)  # fmt: skip
def test_cuda_quantization_matches_cpu_bit_for_bit(spec):
    x = torch.randn(96, 160, generator=torch.Generator().manual_seed(11)) * 5
    for dim in (0, 1):
        cpu = quantize_dequantize(x, spec, dim)
        cuda = quantize_dequantize(x.cuda(), spec, dim).cpu()
        assert torch.equal(cpu, cuda)


@pytest.mark.gpu
def test_cuda_stochastic_rounding_matches_cpu_given_the_same_bits():
    from stalwart.quant.rounding import draw_random_bits

    spec = nv_spec(rounding="stochastic")
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(12))
    bits = draw_random_bits(x.shape, 8, torch.Generator().manual_seed(13))
    cpu = quantize_dequantize(x, spec, random_bits=bits)
    cuda = quantize_dequantize(x.cuda(), spec, random_bits=bits.cuda()).cpu()
    assert torch.equal(cpu, cuda)

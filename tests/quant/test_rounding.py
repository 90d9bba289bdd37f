"""Round-to-nearest-even and stochastic rounding: exactness, unbiasedness, neighbours, seeds."""

import math

import pytest
import torch

from stalwart.quant import rounding
from stalwart.quant.formats import element_format
from stalwart.quant.mx import QuantSpec, mx_spec, nv_spec, quantize_dequantize


def test_magic_constant_rounding_is_round_half_even():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(100_000, generator=generator) * 100
    for ulp in (2.0**-6, 0.5, 1.0, 4.0):
        ties = (torch.arange(-50, 50) + 0.5) * ulp
        data = torch.cat([values, ties])
        expected = torch.round(data / ulp) * ulp  # torch.round is half-to-even
        assert torch.equal(rounding.round_half_even_to_ulp_(data.clone(), ulp), expected)
        ulp_tensor = torch.full_like(data, ulp)
        assert torch.equal(rounding.round_half_even_to_ulp_(data.clone(), ulp_tensor), expected)


def neighbours(fmt, values):
    """The grid values just below and just above each value (for values inside the range)."""
    grid = fmt.grid()
    index = torch.searchsorted(grid, values, right=True)
    return grid[index - 1], grid[index.clamp(max=grid.numel() - 1)]


@pytest.mark.parametrize("name", ["e2m1", "e4m3", "int8", "int4"])
def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased(name):
    fmt = element_format(name)
    generator = torch.Generator().manual_seed(1)
    num_values, num_draws = 64, 4000
    values = (torch.rand(num_values, generator=generator) * 2 - 1) * fmt.max_value * 0.9
    repeated = values.repeat(num_draws, 1)
    bits = rounding.draw_random_bits(repeated.shape, 8, generator)
    rounded = fmt.quantize(repeated, rounding_mode="stochastic", random_bits=bits)
    low, high = neighbours(fmt, values)
    assert ((rounded == low) | (rounded == high)).all()
    # Tolerance from the draw count: the mean of N Bernoulli(p) steps of size (high - low) has
    # standard deviation (high - low) sqrt(p (1 - p) / N) <= (high - low) / (2 sqrt N); allow 5
    # of those, plus the 8-bit dither's worst-case bias of 2^-9 of a step.
    step = high - low
    p = torch.where(step > 0, (values - low) / step, torch.zeros_like(step))
    sigma = step * torch.sqrt(p * (1 - p) / num_draws)
    tolerance = 5 * sigma + step * 2.0**-9 + 1e-7
    error = (rounded.mean(0) - values).abs()
    assert (error <= tolerance).all(), (error - tolerance).max()
    # and it is not nearest rounding in disguise: values between neighbours take both
    interior = (p > 0.2) & (p < 0.8)
    both = ((rounded == low).any(0) & (rounded == high).any(0))[interior]
    assert both.all()


@pytest.mark.parametrize("num_random_bits", [1, 2, 4, 8])
def test_stochastic_rounding_expectation_over_all_random_values(num_random_bits):
    """Enumerating every r gives the exact expectation: unbiased on the 2^-n lattice of
    fractions, within 2^-(n+1) of a step elsewhere (the centred dither (2r+1)/2^(n+1))."""
    levels = 1 << num_random_bits
    fractions = torch.cat([torch.arange(levels) / levels, torch.rand(200) * 0.999])
    values = 3.0 + fractions  # int4 grid: neighbours 3 and 4
    repeated = values.repeat(levels, 1)
    bits = torch.arange(levels, dtype=torch.int32)[:, None].expand_as(repeated).contiguous()
    rounded = element_format("int4").quantize(
        repeated, rounding_mode="stochastic", random_bits=bits, num_random_bits=num_random_bits
    )
    expectation = rounded.mean(0)
    on_lattice = torch.arange(values.numel()) < levels
    assert torch.equal(expectation[on_lattice], values[on_lattice])
    assert ((expectation - values).abs() <= 2.0 ** -(num_random_bits + 1) + 1e-6).all()


def test_stochastic_rounding_draws_differ_and_seeds_reproduce():
    spec = nv_spec(rounding="stochastic")
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    first = quantize_dequantize(x, spec, generator=torch.Generator().manual_seed(10))
    again = quantize_dequantize(x, spec, generator=torch.Generator().manual_seed(10))
    other = quantize_dequantize(x, spec, generator=torch.Generator().manual_seed(11))
    assert torch.equal(first, again)
    assert (first != other).float().mean() > 0.1


def test_stochastic_rounding_is_symmetric_in_sign():
    spec = mx_spec("e2m1", rounding="stochastic")
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    bits = rounding.draw_random_bits(x.shape, 8, torch.Generator().manual_seed(4))
    positive = quantize_dequantize(x, spec, random_bits=bits)
    negative = quantize_dequantize(-x, spec, random_bits=bits)
    assert torch.equal(positive, -negative)


def test_stochastic_rounding_keeps_nan_and_grid_values():
    fmt = element_format("e2m1")
    grid = fmt.grid()
    values = torch.cat([grid, torch.tensor([math.nan])])
    bits = rounding.draw_random_bits(values.shape, 8, torch.Generator().manual_seed(5))
    rounded = fmt.quantize(values, rounding_mode="stochastic", random_bits=bits)
    assert torch.equal(rounded[:-1], grid)
    assert math.isnan(rounded[-1].item())


def test_random_bit_validation():
    with pytest.raises(ValueError, match="num_random_bits must be in 1..16"):
        rounding.draw_random_bits((4,), 0, None)
    with pytest.raises(ValueError, match="needs random_bits"):
        element_format("e2m1").quantize(torch.ones(3), rounding_mode="stochastic")
    with pytest.raises(ValueError, match="num_random_bits"):
        QuantSpec(element="e2m1", scaling="mx", rounding="stochastic", num_random_bits=40)


def test_draw_random_bits_range_and_dtype():
    bits = rounding.draw_random_bits((10_000,), 3, torch.Generator().manual_seed(6))
    assert bits.dtype == torch.uint8 and int(bits.min()) == 0 and int(bits.max()) == 7
    wide = rounding.draw_random_bits((10,), 12, None)
    assert wide.dtype == torch.int32


def test_mix_seed_is_stable_and_spreads():
    assert rounding.mix_seed(1, 2, 3) == rounding.mix_seed(1, 2, 3)
    seeds = {rounding.mix_seed(7, call, gemm) for call in range(100) for gemm in range(3)}
    assert len(seeds) == 300
    assert all(0 <= s < 2**63 for s in seeds)

"""Fused CPU kernels: bit-identical to the eager torch path on every spec they cover (NaN, Inf,
fp32 subnormals, huge blocks, zeros, stochastic rounding), the counter-based random bits pinned
to their definition, and a clean fallback when no compiler is available."""

import math
import shutil
import subprocess
import sys

import pytest
import torch

from stalwart.quant import cpu_kernels, rounding
from stalwart.quant.mx import (
    QuantSpec,
    mx_spec,
    nv_spec,
    quantize,
    quantize_dequantize,
    quantize_for_gemm,
)

needs_compiler = pytest.mark.skipif(
    cpu_kernels._compiler() is None, reason="no C compiler: the eager path is all there is"
)

KERNEL_SPECS = [
    *(
        mx_spec(element, scale_rounding=scale_rounding)
        for element in ("e4m3", "e5m2", "e3m2", "e2m3", "e2m1", "int8", "int4")
        for scale_rounding in ("floor", "ceil", "rceil")
    ),
    mx_spec("e4m3", block_size=64, scale_rounding="ceil"),
    nv_spec("e2m1"),
    nv_spec("int4"),
    nv_spec("e2m1", scale="ue5m3"),
    nv_spec("e2m1", block_size=32),
    nv_spec("e2m1", block_size=48, rounding="stochastic"),  # blocks straddle the kernels' runs
    nv_spec("int4", block_size=1024, rounding="stochastic"),  # one block spans several runs
    nv_spec("e2m1", rounding="stochastic"),
    nv_spec("int4", rounding="stochastic", num_random_bits=12),
    nv_spec("e2m1", scale="ue5m3", rounding="stochastic", num_random_bits=3),
    QuantSpec(element="e4m3", scaling="tensor"),
    QuantSpec(element="e5m2", scaling="tensor"),
    QuantSpec(element="e5m2", scaling="tensor", rounding="stochastic"),
    QuantSpec(element="e2m1"),
    QuantSpec(element="int8", rounding="stochastic", num_random_bits=16),
]


def awkward_tensor(seed: int) -> torch.Tensor:
    """Rows spread over 80 binades plus the corners: NaN, Inf, all-zero and negative-zero
    blocks, fp32 subnormals (alone and as whole blocks), a block above 2^96."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = torch.exp2(torch.randint(-40, 40, (96, 1), generator=generator).float())
    x = torch.randn(96, 256, generator=generator) * magnitude
    x[3, 5] = math.nan
    x[7, 40] = -math.inf
    x[9] = 0.0
    x[11, :64] = -0.0
    x[13, 3] = 2.0**100
    x[15, 7] = 1e-42
    x[17, 64:128] = torch.linspace(-3e-40, 3e-40, 64)
    x[19, :32] = 1e-40
    return x


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Identical bit patterns, except that any NaN equals any NaN."""
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    return torch.equal(
        torch.where(nan, 0.0, a).view(torch.int32), torch.where(nan, 0.0, b).view(torch.int32)
    )


@pytest.fixture
def kernels_switch():
    """Restores the process-wide switch after a test flips it."""
    yield cpu_kernels.set_enabled
    cpu_kernels.set_enabled(None)


def run_both(function, kernels_switch):
    kernels_switch(True)
    fused = function()
    kernels_switch(False)
    eager = function()
    kernels_switch(None)
    return fused, eager


@needs_compiler
def test_kernels_build_and_load_here():
    kernels = cpu_kernels.load()
    assert kernels is not None and kernels.path.exists()


@needs_compiler
@pytest.mark.parametrize("spec", KERNEL_SPECS, ids=lambda s: s.describe())
def test_kernels_match_the_eager_path_bit_for_bit(spec, kernels_switch):
    assert cpu_kernels.load() is not None
    for data in (awkward_tensor(0), awkward_tensor(1)[40:], torch.randn(33, 70)):
        for dim in (-1, 0):

            def fused_and_scale(data=data, dim=dim):
                generator = torch.Generator().manual_seed(7)
                values = quantize_dequantize(data, spec, dim, generator=generator)
                operand, scale = quantize_for_gemm(data, spec, dim, generator=generator)
                return values, operand, scale

            (values, operand, scale), (eager_values, eager_operand, eager_scale) = run_both(
                fused_and_scale, kernels_switch
            )
            assert same_bits(values, eager_values)
            assert same_bits(operand, eager_operand)
            assert same_bits(scale, eager_scale)


@needs_compiler
@pytest.mark.parametrize(
    "spec", [mx_spec("e4m3", scale_rounding="ceil"), nv_spec("e2m1", rounding="stochastic")]
)
def test_kernels_match_the_two_step_reference(spec, kernels_switch):
    """quantize(x).dequantize() (the reference, never fused) equals the kernels' values."""
    kernels_switch(True)
    x = awkward_tensor(2)
    x[x.isnan() | x.isinf()] = 1.0  # a NaN would turn the whole NV tensor into NaN
    generator_seed = 3
    fused = quantize_dequantize(x, spec, generator=torch.Generator().manual_seed(generator_seed))
    reference = quantize(x, spec, generator=torch.Generator().manual_seed(generator_seed))
    assert torch.equal(fused, reference.dequantize())


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("element", ["e4m3", "e5m2", "e2m1", "e3m2"])
def test_mx_blocks_of_fp32_subnormals_round_on_the_element_grid(
    element, use_kernels, kernels_switch
):
    """A block of fp32 subnormals gets the smallest E8M0 scale 2^-127, where its values are
    element *normals*: x's own exponent field (zero) must not set their spacing."""
    if use_kernels and cpu_kernels._compiler() is None:
        pytest.skip("no C compiler")
    kernels_switch(use_kernels)
    x = torch.stack([torch.full((32,), 1e-40), torch.linspace(1e-41, 3e-40, 32)])
    spec = mx_spec(element, scale_rounding="ceil")
    assert torch.equal(quantize_dequantize(x, spec), quantize(x, spec).dequantize())
    # e5m2: 1e-40 = 1.09 * 2^-133 lies 4.36 steps of 2^-135 above zero, so it rounds to 4 steps
    if element == "e5m2":
        assert quantize_dequantize(x, spec)[0, 0].item() == 4 * 2.0**-135


@needs_compiler
def test_threaded_kernels_match_one_thread(kernels_switch):
    threads = torch.get_num_threads()
    x = torch.randn(1024, 1024)
    specs = [mx_spec("e4m3", scale_rounding="ceil"), nv_spec("e2m1", rounding="stochastic")]
    specs.append(QuantSpec(element="e4m3", scaling="tensor", rounding="stochastic"))
    try:
        results = {}
        for num_threads in (1, 3):
            torch.set_num_threads(num_threads)
            results[num_threads] = [
                quantize_dequantize(x, spec, generator=torch.Generator().manual_seed(1))
                for spec in specs
            ]
    finally:
        torch.set_num_threads(threads)
    for single, threaded in zip(results[1], results[3]):
        assert torch.equal(single, threaded)


@needs_compiler
def test_fused_stochastic_rounding_is_unbiased_seedable_and_lands_on_neighbours():
    assert cpu_kernels.load() is not None
    spec = nv_spec("e2m1", rounding="stochastic")
    num_draws = 4000
    values = torch.linspace(-5.5, 5.5, 16)  # one block: scale 6/6 -> the plain E2M1 grid
    repeated = values.repeat(num_draws, 1)
    rounded = quantize_dequantize(repeated, spec, generator=torch.Generator().manual_seed(5))
    again = quantize_dequantize(repeated, spec, generator=torch.Generator().manual_seed(5))
    other = quantize_dequantize(repeated, spec, generator=torch.Generator().manual_seed(6))
    assert torch.equal(rounded, again) and not torch.equal(rounded, other)
    reference = quantize(values[None], spec)  # one block: value = element * fp32(s_block * s)
    scale = reference.block_scales.flatten()[0] * reference.tensor_scale
    grid = torch.tensor([0.0, 0.5, 1, 1.5, 2, 3, 4, 6])
    grid = torch.cat([-grid.flip(0), grid[1:]]) * scale
    low = grid[torch.searchsorted(grid, values, right=True) - 1]
    high = grid[torch.searchsorted(grid, values, right=False)]
    assert ((rounded == low) | (rounded == high)).all()
    step = high - low
    p = torch.where(step > 0, (values - low) / step, 0.0)
    tolerance = 5 * step * torch.sqrt(p * (1 - p) / num_draws) + step * 2.0**-9 + 1e-6
    assert ((rounded.mean(0) - values).abs() <= tolerance).all()


def splitmix64_reference(key: int, counter: int) -> int:
    mask = (1 << 64) - 1
    z = (key + (counter + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


@pytest.mark.parametrize("num_random_bits", [3, 8, 12, 16])
def test_hashed_random_bits_follow_their_definition(num_random_bits):
    key = 0xFEDCBA9876543210
    bits = rounding.hashed_random_bits((5, 7), num_random_bits, key).flatten().tolist()
    lanes, lane_bits = (8, 8) if num_random_bits <= 8 else (4, 16)
    expected = [
        ((splitmix64_reference(key, i // lanes) >> (lane_bits * (i % lanes))) & ((1 << lane_bits) - 1))
        >> (lane_bits - num_random_bits)
        for i in range(35)
    ]  # fmt: skip
    assert bits == expected


def test_hashed_random_bits_are_uniform_and_keyed():
    draws = rounding.hashed_random_bits((1 << 20,), 8, key=12345).long()
    counts = torch.bincount(draws, minlength=256).double()
    expected = draws.numel() / 256
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 255 + 6 * math.sqrt(2 * 255)  # 255 degrees of freedom, 6 sigma
    # neighbouring lanes of one hash are uncorrelated
    pairs = draws.view(-1, 2).double()
    correlation = torch.corrcoef(pairs.T)[0, 1]
    assert abs(float(correlation)) < 6 / math.sqrt(pairs.shape[0])
    assert not torch.equal(draws, rounding.hashed_random_bits((1 << 20,), 8, key=12346).long())


def test_draw_random_bits_takes_one_key_from_the_generator():
    generator = torch.Generator().manual_seed(9)
    bits = rounding.draw_random_bits((100,), 8, generator)
    key = rounding.draw_random_key(torch.Generator().manual_seed(9))
    assert torch.equal(bits, rounding.hashed_random_bits((100,), 8, key))


def test_without_a_compiler_the_eager_path_takes_over(monkeypatch, tmp_path, kernels_switch):
    x = awkward_tensor(4)
    spec = mx_spec("e4m3", scale_rounding="ceil")
    kernels_switch(False)
    eager = quantize_dequantize(x, spec)
    kernels_switch(True)
    with pytest.raises(RuntimeError, match="no C compiler"):
        cpu_kernels.build(compiler=str(tmp_path / "no-such-cc"), cache_dir=tmp_path)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    cpu_kernels.reset()
    try:
        with pytest.warns(RuntimeWarning, match="eager torch path"):
            assert cpu_kernels.load() is None
        assert same_bits(quantize_dequantize(x, spec), eager)
    finally:
        cpu_kernels.reset()


def test_a_broken_compiler_falls_back(tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: error: no' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="failed"):
        cpu_kernels.build(compiler=str(fake), cache_dir=tmp_path)


def test_environment_switch_disables_the_kernels(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert not cpu_kernels.is_enabled() and cpu_kernels.load() is None


@needs_compiler
def test_build_is_cached_per_source_and_machine(tmp_path):
    first = cpu_kernels.build(cache_dir=tmp_path)
    assert first.parent == tmp_path / "quant_kernels"
    modified = first.stat().st_mtime_ns
    assert cpu_kernels.build(cache_dir=tmp_path) == first
    assert first.stat().st_mtime_ns == modified  # found, not rebuilt


def test_importing_the_package_builds_nothing():
    code = (
        "import stalwart.quant.mx, stalwart.quant.recipes\n"
        "from stalwart.quant import cpu_kernels\n"
        "assert not cpu_kernels._state['loaded']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.gpu
def test_cuda_hashed_random_bits_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    for num_random_bits in (8, 12):
        cpu = rounding.hashed_random_bits((333, 17), num_random_bits, key=2**63 + 11)
        cuda = rounding.hashed_random_bits(
            (333, 17), num_random_bits, key=2**63 + 11, device="cuda"
        )
        assert torch.equal(cpu, cuda.cpu())


def _submit_to_the_kernel_pool(_=None) -> int:
    return cpu_kernels._executor(2).submit(lambda: 7).result(timeout=30)


@pytest.mark.timeout(120)
def test_a_forked_child_gets_its_own_thread_pool():
    """A pool inherited through fork has no threads behind it: work submitted to it would
    wait forever."""
    import multiprocessing

    assert _submit_to_the_kernel_pool() == 7  # the parent's pool exists now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(_submit_to_the_kernel_pool, [0]) == [7]


def test_empty_tensors_take_the_eager_path(kernels_switch):
    kernels_switch(True)
    assert quantize_dequantize(torch.empty(0, 32), mx_spec("e4m3")).shape == (0, 32)

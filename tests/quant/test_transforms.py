"""Walsh-Hadamard transforms: orthogonal, self-inverse up to scale, GEMM products preserved."""

import pytest
import torch

from stalwart.quant.transforms import HadamardTransform, fwht, hadamard_matrix, random_signs


@pytest.mark.parametrize("size", [2, 16, 32, 64, 128])
def test_hadamard_matrix_is_orthogonal_up_to_scale(size):
    matrix = hadamard_matrix(size, dtype=torch.float64)
    assert set(matrix.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(matrix @ matrix.T, size * torch.eye(size, dtype=torch.float64))


@pytest.mark.parametrize("size", [16, 32, 64])
def test_fast_transform_equals_the_matrix_on_every_block(size):
    x = torch.randn(5, 4 * size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = (x.view(5, 4, size) @ hadamard_matrix(size, torch.float64).T).view(5, -1)
    assert torch.allclose(fwht(x, size), expected, atol=1e-12)
    # along another dimension too
    assert torch.allclose(fwht(x.T, size, dim=0), expected.T, atol=1e-12)


@pytest.mark.parametrize("size", [16, 32])
def test_fast_transform_is_self_inverse_up_to_scale(size):
    x = torch.randn(3, 2 * size, dtype=torch.float64)
    assert torch.allclose(fwht(fwht(x, size), size), size * x, atol=1e-10)


@pytest.mark.parametrize("seed", [None, 0, 123])
def test_random_hadamard_is_orthogonal_and_invertible(seed):
    transform = HadamardTransform(32, seed)
    x = torch.randn(8, 96, dtype=torch.float64)
    y = transform.apply(x)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-12)
    assert torch.allclose(transform.invert(y), x, atol=1e-12)
    # Q Q^T = I as an explicit matrix
    q = transform.apply(torch.eye(32, dtype=torch.float64))
    assert torch.allclose(q @ q.T, torch.eye(32, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_rotating_both_gemm_operands_preserves_the_product(size):
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(24, 4 * size, generator=generator, dtype=torch.float64)
    b = torch.randn(40, 4 * size, generator=generator, dtype=torch.float64)
    transform = HadamardTransform(size, seed=7)
    rotated = transform.apply(a) @ transform.apply(b).T
    assert torch.allclose(rotated, a @ b.T, atol=1e-10)
    # and the rotation really changes the operands (it is not the identity)
    assert not torch.allclose(transform.apply(a), a)


def test_hadamard_spreads_an_outlier_across_its_block():
    x = torch.zeros(1, 16)
    x[0, 3] = 8.0
    y = HadamardTransform(16, seed=5).apply(x)
    assert torch.allclose(y.abs(), torch.full((1, 16), 2.0))  # crest factor 4 -> 1


def test_random_signs_are_reproducible_per_seed():
    assert torch.equal(random_signs(64, 3), random_signs(64, 3))
    assert not torch.equal(random_signs(64, 3), random_signs(64, 4))
    assert set(random_signs(64, 3).unique().tolist()) == {-1.0, 1.0}


def test_bad_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="power of two"):
        HadamardTransform(24)
    with pytest.raises(ValueError, match="not a multiple of the Hadamard block size 16"):
        fwht(torch.ones(3, 40), 16)


@pytest.mark.parametrize("size", [16, 512])
def test_dense_and_butterfly_paths_agree(size):
    """Small blocks multiply by the dense matrix, large ones run the butterflies."""
    transform = HadamardTransform(size, seed=9)
    x = torch.randn(4, 2 * size, dtype=torch.float64)
    signs = random_signs(size, 9).double().repeat(2)
    expected = fwht(x * signs, size) / size**0.5
    assert torch.allclose(transform.apply(x), expected, atol=1e-12)
    assert torch.allclose(transform.invert(transform.apply(x)), x, atol=1e-12)

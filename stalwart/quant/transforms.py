"""Walsh-Hadamard transforms on blocks, with optional random signs (the random Hadamard transform).

A GEMM C = A B^T reduces over the last dimension of A and B. Rotating both operands along that
dimension by the same orthogonal matrix Q = diag(s) H_d / sqrt(d), block by block, leaves the
product unchanged (A Q)(B Q)^T = A Q Q^T B^T = A B^T, while spreading outliers across each block
so block scales fit the values better (lower crest factor). `HadamardTransform` is that Q for one
block size and one sign vector; linear.py applies it to both operands of a GEMM.

`fwht` is the fast transform: log2(d) vectorised butterfly stages over all blocks at once
(O(n log d) adds, no d x d matrix), in natural (Sylvester) order, unnormalised. For the block
sizes quantization uses (16..256) `HadamardTransform` multiplies by the d x d matrix instead,
which is one BLAS call; both give the same transform (tests check one against the other).
"""

from __future__ import annotations

import math

import torch

__all__ = ["hadamard_matrix", "fwht", "random_signs", "HadamardTransform"]

# Up to this block size `HadamardTransform` multiplies by the dense d x d matrix: one BLAS call
# beats log2(d) eager butterfly passes at these sizes; above it, `fwht` does O(n log d) work.
DENSE_MAX_BLOCK = 256


def _check_block_size(block_size: int) -> None:
    if block_size < 2 or block_size & (block_size - 1):
        raise ValueError(
            f"Hadamard block size must be a power of two >= 2 (16, 32, 64, ...), got {block_size}"
        )


def hadamard_matrix(size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Sylvester Hadamard matrix H_size with +-1 entries (H H^T = size * I)."""
    _check_block_size(size)
    matrix = torch.ones(1, 1, dtype=dtype)
    while matrix.shape[0] < size:
        matrix = torch.cat((torch.cat((matrix, matrix), 1), torch.cat((matrix, -matrix), 1)), 0)
    return matrix


def fwht(x: torch.Tensor, block_size: int, dim: int = -1) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of every consecutive block of `block_size`
    elements along `dim` (its length must be a multiple of block_size): y_block = H x_block."""
    _check_block_size(block_size)
    length = x.shape[dim]
    if length % block_size:
        raise ValueError(
            f"dimension {dim} has length {length}, not a multiple of the Hadamard block size "
            f"{block_size}; pad it with zeros first"
        )
    moved = x.movedim(dim, -1)
    leading_shape = moved.shape
    values = moved.reshape(-1, block_size)
    half = 1
    while half < block_size:
        pairs = values.view(-1, block_size // (2 * half), 2, half)
        first, second = pairs[:, :, 0, :], pairs[:, :, 1, :]
        values = torch.stack((first + second, first - second), dim=2).view(-1, block_size)
        half *= 2
    return values.view(leading_shape).movedim(-1, dim)


def random_signs(block_size: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A reproducible +-1 float32 vector of length block_size (drawn on the CPU, then moved)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    signs = torch.randint(0, 2, (block_size,), generator=generator).float().mul_(2).sub_(1)
    return signs.to(device)


class HadamardTransform:
    """Orthonormal blockwise transform Q = diag(signs) H / sqrt(d) along one dimension.

    With `seed=None` the signs are all +1 (a plain Hadamard transform). `apply` computes x Q
    block by block, `invert` computes y Q^T; `apply` on both operands of a GEMM along the
    reduction dimension preserves the product.
    """

    def __init__(self, block_size: int, seed: int | None = 0):
        _check_block_size(block_size)
        self.block_size = block_size
        self.seed = seed
        self._signs_by_device: dict[str, torch.Tensor] = {}
        self._matrix_by_device: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def signs(self, device: torch.device | str) -> torch.Tensor | None:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._signs_by_device:
            self._signs_by_device[key] = random_signs(self.block_size, self.seed, device)
        return self._signs_by_device[key]

    def _signs_along(self, x: torch.Tensor, dim: int) -> torch.Tensor | None:
        signs = self.signs(x.device)
        if signs is None:
            return None
        repeats = x.shape[dim] // self.block_size
        shape = [1] * x.dim()
        shape[dim] = x.shape[dim]
        return signs.repeat(repeats).view(shape).to(x.dtype)

    def matrix(self, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """Q = diag(signs) H / sqrt(d) as a dense d x d matrix."""
        key = (str(device), dtype)
        if key not in self._matrix_by_device:
            matrix = hadamard_matrix(self.block_size, torch.float64)
            signs = self.signs("cpu")
            if signs is not None:
                matrix = signs.double()[:, None] * matrix
            matrix = matrix / math.sqrt(self.block_size)
            self._matrix_by_device[key] = matrix.to(device=device, dtype=dtype)
        return self._matrix_by_device[key]

    def _blockwise_product(self, x: torch.Tensor, dim: int, transpose: bool) -> torch.Tensor:
        length = x.shape[dim]
        if length % self.block_size:
            raise ValueError(
                f"dimension {dim} has length {length}, not a multiple of the Hadamard block "
                f"size {self.block_size}; pad it with zeros first"
            )
        matrix = self.matrix(x.device, x.dtype)
        moved = x.movedim(dim, -1)
        product = moved.reshape(-1, self.block_size) @ (matrix.T if transpose else matrix)
        return product.view(moved.shape).movedim(-1, dim)

    def apply(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """x Q block by block along `dim`."""
        if self.block_size <= DENSE_MAX_BLOCK:
            return self._blockwise_product(x, dim, transpose=False)
        signs = self._signs_along(x, dim)
        signed = x * signs if signs is not None else x
        return fwht(signed, self.block_size, dim).mul_(1.0 / math.sqrt(self.block_size))

    def invert(self, y: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """y Q^T block by block along `dim` (the inverse of `apply`)."""
        if self.block_size <= DENSE_MAX_BLOCK:
            return self._blockwise_product(y, dim, transpose=True)
        x = fwht(y, self.block_size, dim).mul_(1.0 / math.sqrt(self.block_size))
        signs = self._signs_along(x, dim)
        return x * signs if signs is not None else x

    def __repr__(self) -> str:
        return f"HadamardTransform(block_size={self.block_size}, seed={self.seed})"

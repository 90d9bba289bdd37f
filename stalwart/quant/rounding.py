"""Rounding onto a power-of-two grid spacing: round-to-nearest-even and stochastic rounding.

Both work on non-negative magnitudes (the callers restore the sign), given the grid spacing
`ulp` around each value (a power of two: a Python float for integer formats, a tensor for
minifloats). Everything is vectorised torch, on CPU and CUDA alike.

Round-to-nearest-even uses the magic-constant trick: adding c = 1.5 * 2^23 * ulp moves the value
into a binade whose fp32 spacing is exactly `ulp`, so the FPU's own round-to-nearest-even does
the work; subtracting c is exact. Two elementwise ops instead of divide/round/multiply.

Stochastic rounding rounds up with probability equal to the fractional distance to the lower
neighbour, resolved with `num_random_bits` random bits per element (8 by default: the width of
Blackwell's cvt.rs and of the UE5M3 recipe). With r uniform in [0, 2^n) the value rounds up iff
    frac + (2r + 1) / 2^(n+1) >= 1,
a centred dither: the expectation equals the input exactly when frac is a multiple of 2^-n and
is off by at most 2^-(n+1) ulp otherwise (plain truncation of the random bits would be biased
downwards by up to 2^-n ulp). The fraction plus the dither is exact in fp32, so no fp32
rounding enters the decision. The result is always one of the two neighbouring grid values.

Random bits come from a counter-based generator: one 64-bit key is drawn from an explicit,
seedable torch.Generator, and element i takes byte i % 8 of splitmix64(key, i // 8)
(`hashed_random_bits`; 16-bit halves for more than 8 bits). A run that re-seeds the same way
draws the same bits, on any device, and the fused CPU kernels (cpu_kernels.py) compute the
very same bits in registers instead of reading a tensor of them (see recipes.py for how seeds
are derived).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ROUNDING_MODES",
    "round_half_even_to_ulp_",
    "add_sub_magic_",
    "stochastic_round_to_ulp_",
    "draw_random_bits",
    "draw_random_key",
    "hashed_random_bits",
    "make_generator",
    "mix_seed",
]

ROUNDING_MODES = ("nearest", "stochastic")
MAX_RANDOM_BITS = 16
MAGIC = 1.5 * 2.0**23
# splitmix64 (Steele, Lea and Flood, 2014): the golden-ratio increment and the two multipliers
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB
_UINT64_MASK = (1 << 64) - 1
_HASH_CHUNK = 1 << 16  # counters per chunk of the torch hash (512 KiB of int64: stays in L2)


def round_half_even_to_ulp_(values: torch.Tensor, ulp: torch.Tensor | float) -> torch.Tensor:
    """Round float32 `values` to the nearest multiple of `ulp`, ties to even, in place.

    A tensor `ulp` is consumed (overwritten). Valid while |values| < 2^21 * ulp; works for
    negative values too (a negative value that rounds to zero gives +0)."""
    magic = ulp.mul_(MAGIC) if isinstance(ulp, torch.Tensor) else ulp * MAGIC
    return add_sub_magic_(values, magic)


def add_sub_magic_(values: torch.Tensor, magic: torch.Tensor | float) -> torch.Tensor:
    """values = (values + magic) - magic with magic = 1.5 * 2^23 * ulp: the fp32 addition lands
    in a binade whose spacing is exactly ulp, so the FPU rounds to nearest even for us."""
    return values.add_(magic).sub_(magic)


def stochastic_round_to_ulp_(
    magnitude: torch.Tensor,
    ulp: torch.Tensor | float,
    random_bits: torch.Tensor | None,
    num_random_bits: int = 8,
    buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round non-negative float32 `magnitude` down or up to a multiple of `ulp` at random, in
    place: up with probability ~ the fractional part (see the module docstring). `buffer`
    (float32, same shape) avoids an allocation.

    With t = magnitude / ulp (exact: ulp is a power of two), the result is
    floor(t) + floor(frac(t) + (2r + 1) / 2^(n+1)); that sum is exact in fp32 (it needs at most
    24 significant bits for every format here), so no fp32 rounding enters the decision."""
    if random_bits is None:
        raise ValueError("stochastic rounding needs random_bits (see draw_random_bits)")
    if random_bits.shape != magnitude.shape:
        raise ValueError(
            f"random_bits shape {tuple(random_bits.shape)} must match the values' shape "
            f"{tuple(magnitude.shape)}"
        )
    scaled = magnitude.div_(ulp)
    lower = torch.floor(scaled) if buffer is None else torch.floor(scaled, out=buffer)
    fraction = scaled.sub_(lower)
    fraction.add_(random_bits, alpha=2.0**-num_random_bits).add_(2.0 ** -(num_random_bits + 1))
    round_up = fraction.floor_()  # 1 where frac + (2r + 1) / 2^(n+1) >= 1, else 0; NaN stays
    return round_up.add_(lower).mul_(ulp)


def draw_random_key(generator: torch.Generator | None, device: torch.device | str = "cpu") -> int:
    """One 64-bit key from `generator` (the global generator when None): the seed of a call's
    counter-based random stream (see hashed_random_bits)."""
    key = torch.empty(1, dtype=torch.int64, device=device)
    key.random_(-(2**63), 2**63 - 1, generator=generator)
    return int(key.item()) & _UINT64_MASK


def hashed_random_bits(
    shape: torch.Size | tuple[int, ...],
    num_random_bits: int,
    key: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Integers uniform in [0, 2^num_random_bits), one per element, from a counter-based
    generator: hash h_c = splitmix64(key + (c + 1) * golden gamma) of counter c; element i takes
    byte i % 8 of h_(i // 8) (up to 8 bits: its top num_random_bits bits) or 16-bit half i % 4
    of h_(i // 4) (9 to 16 bits). The fused CPU kernels compute the same bits in registers.
    uint8 when they fit, else int32."""
    _check_num_random_bits(num_random_bits)
    shape = tuple(shape)
    num_elements = math.prod(shape)
    lanes = 8 if num_random_bits <= 8 else 4
    num_counters = (num_elements + lanes - 1) // lanes
    hashes = torch.empty(num_counters, dtype=torch.int64, device=device)
    scratch = torch.empty(min(_HASH_CHUNK, num_counters), dtype=torch.int64, device=device)
    # cache-sized chunks of in-place ops: several times faster than whole-tensor temporaries;
    # int64 arithmetic wraps modulo 2^64 like the uint64 original, and shifts are made logical
    for start in range(0, num_counters, _HASH_CHUNK):
        stop = min(start + _HASH_CHUNK, num_counters)
        z, shifted = hashes[start:stop], scratch[: stop - start]
        torch.arange(start + 1, stop + 1, out=z)
        z.mul_(_signed(_GOLDEN_GAMMA)).add_(_signed(key))
        for shift, multiplier in ((30, _MIX_1), (27, _MIX_2), (31, None)):
            torch.bitwise_right_shift(z, shift, out=shifted).bitwise_and_((1 << (64 - shift)) - 1)
            z.bitwise_xor_(shifted)
            if multiplier is not None:
                z.mul_(_signed(multiplier))
    z = hashes
    if lanes == 8:  # little-endian bytes of each hash, as the kernels' shifts read them
        random_bytes = z.view(torch.uint8)[:num_elements].view(shape)
        return random_bytes >> (8 - num_random_bits) if num_random_bits < 8 else random_bytes
    halves = z.view(torch.int16)[:num_elements].view(shape).to(torch.int32) & 0xFFFF
    return halves >> (16 - num_random_bits)


def draw_random_bits(
    shape: torch.Size | tuple[int, ...],
    num_random_bits: int,
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Integers uniform in [0, 2^num_random_bits), one per element (uint8 when they fit):
    `hashed_random_bits` keyed by one draw from `generator`."""
    _check_num_random_bits(num_random_bits)
    return hashed_random_bits(
        shape, num_random_bits, draw_random_key(generator, device), device=device
    )


def _check_num_random_bits(num_random_bits: int) -> None:
    if not 1 <= num_random_bits <= MAX_RANDOM_BITS:
        raise ValueError(
            f"num_random_bits must be in 1..{MAX_RANDOM_BITS} (8 is the hardware width), "
            f"got {num_random_bits}"
        )


def _signed(value: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    value &= _UINT64_MASK
    return value - (1 << 64) if value >> 63 else value


def mix_seed(*values: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64 finaliser over each value), so
    per-layer / per-call / per-operand streams are independent yet reproducible."""
    state = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for value in values:
        state = (state ^ (int(value) & mask)) * 0xBF58476D1CE4E5B9 & mask
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & mask
        state ^= state >> 29
    return state & ((1 << 63) - 1)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator

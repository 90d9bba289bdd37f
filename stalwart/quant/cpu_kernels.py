"""Fused CPU kernels for quantize-dequantize, built with the system C compiler on first use.

The eager torch code in mx.py is the reference. These kernels compute the very same values in
one pass over memory per tensor (two for NV, whose tensor scale needs every block amax first):
each block's amax, its scale and the rounding of its elements happen while the block is in
registers, where the eager path needs a handful of ATen ops per chunk. They run the same fp32
operations in the same order (magic-constant round-to-nearest-even, the dithered stochastic
rounding of rounding.py, the scale rules of mx.py), compiled without fast-math and without
FMA contraction, so the results are bit-identical to the eager path; the tests compare them.

Stochastic rounding draws its bits in registers from the counter-based generator of
rounding.py (`hashed_random_bits`): element i of a call takes byte i % 8 of
splitmix64(key, i // 8), so the kernel needs no random tensor and the eager path can reproduce
every bit.

Nothing happens at import. The first call looks for a C compiler (`$CC`, cc, gcc, clang),
compiles the source below into a shared library cached under `$STALWART_CACHE_DIR` (default
~/.cache/stalwart) keyed by the source, the flags, the compiler and the CPU, and loads it with
ctypes. Without a compiler, when compilation fails, or with `STALWART_QUANT_CPU_KERNELS=0`,
`load()` returns None and mx.py keeps its eager path (a failure is reported once as a warning).
The calls release the GIL, so large tensors are split over `torch.get_num_threads()` threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["CpuKernels", "load", "set_enabled", "is_enabled"]

ENV_SWITCH = "STALWART_QUANT_CPU_KERNELS"
# Elements per thread below which splitting a call over threads costs more than it saves.
_MIN_ELEMENTS_PER_THREAD = 1 << 18

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

#define MAGIC 12582912.0f /* 1.5 * 2^23: adding MAGIC * ulp rounds to a multiple of ulp (RNE) */
#define EXPONENT_MASK 0x7F800000u
#define RANDOM_NONE 0
#define RANDOM_BYTES 1
#define RANDOM_WORDS 2
#define RANDOM_HASHED 3
#define RUN 512 /* elements per run: a run's block scales and random bits stay on the stack */

typedef struct {
    int32_t is_int;          /* integer grid (step) rather than a minifloat */
    float ulp_magic;         /* float: MAGIC * 2^-M (times the value's exponent field) */
    float subnormal_magic;   /* float: MAGIC * min_subnormal; int: MAGIC * step */
    float ulp_factor;        /* float: 2^-M (stochastic rounding's ulp) */
    float min_spacing;       /* float: min_subnormal; int: step */
    float min_normal;        /* float: smallest normal; int: step */
    float max_value;
} element_t;

typedef struct {
    int32_t kind;            /* RANDOM_* */
    int32_t num_bits;
    uint64_t key;            /* RANDOM_HASHED */
    const uint8_t *bytes;    /* RANDOM_BYTES */
    const int32_t *words;    /* RANDOM_WORDS */
} random_t;

static inline uint32_t bits_of(float value) { uint32_t u; memcpy(&u, &value, 4); return u; }
static inline float float_of(uint32_t u) { float value; memcpy(&value, &u, 4); return value; }

#define INLINE static inline __attribute__((always_inline))

/* torch.clamp semantics: NaN stays NaN */
INLINE float clamp_max(float v, float hi) { return v > hi ? hi : v; }
INLINE float clamp_min(float v, float lo) { return v < lo ? lo : v; }

/* round to the nearest grid value, ties to even (|v| may exceed max: the caller saturates);
   branch-free so that the loops around it vectorize */
INLINE float round_nearest(float v, const element_t *e) {
    const float own = clamp_min(float_of(bits_of(v) & EXPONENT_MASK) * e->ulp_magic,
                                e->subnormal_magic);
    const float magic = e->is_int ? e->subnormal_magic : own;
    return (v + magic) - magic;
}

/* floor of 0 <= v < 2^23 (NaN stays NaN) by the magic constant 2^23: no libm call, so the
   loops vectorize without relaxing any floating-point flag */
INLINE float floor_small(float v) {
    const float nearest = (v + 8388608.0f) - 8388608.0f;
    return nearest > v ? nearest - 1.0f : nearest;
}

/* splitmix64 over a counter: the generator rounding.hashed_random_bits reproduces in torch */
INLINE uint64_t splitmix64(uint64_t key, uint64_t counter) {
    uint64_t z = key + (counter + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* random integers in [0, 2^num_bits) for elements first .. first + n - 1 (n <= RUN) */
INLINE void fill_random(const random_t *r, int64_t first, int64_t n, int32_t *out) {
    if (r->kind == RANDOM_BYTES) {
        for (int64_t i = 0; i < n; i++) out[i] = r->bytes[first + i];
        return;
    }
    if (r->kind == RANDOM_WORDS) {
        for (int64_t i = 0; i < n; i++) out[i] = r->words[first + i];
        return;
    }
    /* eight bytes per hash for up to 8 bits, four 16-bit halves beyond: hash each counter
       once, then read the hashes' bytes (or halves) in memory order, as the torch path's
       view(uint8) does */
    const int wide = r->num_bits > 8;
    const int lane_shift = wide ? 2 : 3; /* log2 of the lanes per hash */
    const int drop = (wide ? 16 : 8) - r->num_bits;
    const int64_t first_counter = first >> lane_shift;
    const int64_t num_counters = ((first + n - 1) >> lane_shift) - first_counter + 1;
    const int64_t offset = first - (first_counter << lane_shift);
    uint64_t hashes[RUN / 4 + 2];
    for (int64_t c = 0; c < num_counters; c++) {
        hashes[c] = splitmix64(r->key, (uint64_t)(first_counter + c));
    }
    if (wide) {
        uint16_t halves[4 * (RUN / 4 + 2)];
        memcpy(halves, hashes, 8 * num_counters);
        for (int64_t i = 0; i < n; i++) out[i] = halves[offset + i] >> drop;
    } else {
        uint8_t bytes[8 * (RUN / 4 + 2)];
        memcpy(bytes, hashes, 8 * num_counters);
        for (int64_t i = 0; i < n; i++) out[i] = bytes[offset + i] >> drop;
    }
}

/* out = Q(x / divisor) * multiplier over n elements (mx.py's _quantize_chunk_); `random`
   holds stochastic rounding's integers, NULL for nearest. A divisor or multiplier of 1 and a
   limit of Inf stand for "none" (exact no-ops). */
INLINE void quantize_run(const float *restrict x, float *restrict out, int64_t n, float divisor,
                         float multiplier, float limit, const element_t *e,
                         const int32_t *random, int num_random_bits) {
    if (random == NULL) {
        for (int64_t i = 0; i < n; i++) {
            const float v = clamp_max(clamp_min(x[i] / divisor, -limit), limit);
            out[i] = round_nearest(v, e) * multiplier;
        }
        return;
    }
    const float random_scale = 1.0f / (float)(1 << num_random_bits); /* 2^-n */
    const float dither = 0.5f * random_scale;                        /* 2^-(n+1) */
    for (int64_t i = 0; i < n; i++) {
        const float value = x[i];
        const float magnitude = clamp_max(fabsf(value) / divisor, e->max_value);
        const float float_ulp = clamp_min(
            float_of(bits_of(magnitude) & EXPONENT_MASK) * e->ulp_factor, e->min_spacing);
        const float ulp = e->is_int ? e->min_spacing : float_ulp;
        const float scaled = magnitude / ulp; /* < 2^(M+1) for minifloats, <= 127 for ints */
        const float lower = floor_small(scaled);
        float fraction = scaled - lower;
        fraction = fraction + (float)random[i] * random_scale;
        fraction = fraction + dither;
        const float rounded = (floor_small(fraction) + lower) * ulp;
        out[i] = copysignf(rounded, value) * multiplier;
    }
}

/* |x| max per block as bits: for non-negative floats the integer order is the float order,
   and every NaN compares above Inf, so NaN propagates */
INLINE uint32_t block_amax_bits(const float *x, int64_t n) {
    uint32_t amax = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t magnitude = bits_of(x[i]) & 0x7FFFFFFFu;
        amax = magnitude > amax ? magnitude : amax;
    }
    return amax;
}

INLINE void block_amax_blocks(const float *x, float *amax, int64_t num_blocks, int64_t block) {
    for (int64_t b = 0; b < num_blocks; b++) amax[b] = float_of(block_amax_bits(x + b * block, block));
}

void stalwart_block_amax(const float *x, float *amax, int64_t num_blocks, int64_t block) {
    /* constant block sizes let the compiler unroll each block into whole vectors */
    if (block == 16) block_amax_blocks(x, amax, num_blocks, 16);
    else if (block == 32) block_amax_blocks(x, amax, num_blocks, 32);
    else block_amax_blocks(x, amax, num_blocks, block);
}

/* MX with round-to-nearest-even in one pass (mx.py's _fused_mx_cpu): per block the amax, the
   E8M0 scale X (scale_rounding 0 floor, 1 ceil, 2 rceil), and RNE(x / X) * X computed on x */
INLINE void mx_blocks(const float *restrict x, float *restrict out, int64_t num_blocks,
                      int64_t block, const element_t *e, float inverse_emax_power,
                      int32_t scale_rounding) {
    for (int64_t b = 0; b < num_blocks; b++) {
        const float *values = x + b * block;
        float *target = out + b * block;
        const uint32_t amax_bits = block_amax_bits(values, block);
        if (amax_bits >= EXPONENT_MASK) { /* NaN or Inf: the scale is NaN, the block reads NaN */
            for (int64_t i = 0; i < block; i++) target[i] = NAN;
            continue;
        }
        const float amax = float_of(amax_bits);
        float scale;
        if (scale_rounding == 2) {
            const float ratio = amax / e->max_value;
            scale = float_of((bits_of(ratio) + 0x7FFFFFu) & EXPONENT_MASK);
        } else {
            scale = float_of(amax_bits & EXPONENT_MASK) * inverse_emax_power;
            if (scale_rounding == 1 && amax > scale * e->max_value) scale = scale * 2.0f;
        }
        scale = clamp_max(clamp_min(scale, 0x1p-127f), 0x1p127f);
        /* On x's own scale the magic constant would overflow above 2^96; below, an fp32
           subnormal x has no exponent field to read its ulp from, which only matters where
           X * min_normal is itself below fp32's normal range */
        if (!(amax < 0x1p96f) || (!e->is_int && scale * e->min_normal < 0x1p-126f)) {
            quantize_run(values, target, block, scale, scale, e->max_value, e, NULL, 0);
            continue;
        }
        const float floor_magic = scale * e->subnormal_magic;
        const float limit = scale_rounding == 0 ? scale * e->max_value : INFINITY;
        for (int64_t i = 0; i < block; i++) {
            const float own = float_of(bits_of(values[i]) & EXPONENT_MASK) * e->ulp_magic;
            const float floored = own > floor_magic ? own : floor_magic;
            const float magic = e->is_int ? floor_magic : floored;
            const float rounded = (values[i] + magic) - magic;
            /* floor scales saturate: rounding is monotone and +-max * X is on the grid */
            target[i] = clamp_min(clamp_max(rounded, limit), -limit);
        }
    }
}

void stalwart_mx_nearest(const float *x, float *out, int64_t num_blocks, int64_t block,
                         element_t e, float inverse_emax_power, int32_t scale_rounding) {
    if (block == 32) mx_blocks(x, out, num_blocks, 32, &e, inverse_emax_power, scale_rounding);
    else mx_blocks(x, out, num_blocks, block, &e, inverse_emax_power, scale_rounding);
}

/* NV after the amax pass (mx.py's _nv_block_scales + _quantize_chunk_): per block the scale
   s_block = RNE_scale(min((amax / elem_max) / s_global, scale_max)), then the elements. Runs of
   blocks get their scales and random bits first, in loops that vectorize across blocks. */
INLINE void nv_blocks(const float *restrict x, float *restrict out, const float *amax,
                      int64_t first_block, int64_t num_blocks, int64_t block, float tensor_scale,
                      const element_t *e, const element_t *scale_format,
                      int32_t apply_tensor_scale, const random_t *r) {
    const int64_t blocks_per_run = block <= RUN ? RUN / block : 1;
    float divisors[RUN], multipliers[RUN];
    int32_t random[RUN];
    for (int64_t run = first_block; run < first_block + num_blocks; run += blocks_per_run) {
        const int64_t count = first_block + num_blocks - run < blocks_per_run
                                  ? first_block + num_blocks - run : blocks_per_run;
        for (int64_t j = 0; j < count; j++) {
            float wanted = (amax[run + j] / e->max_value) / tensor_scale;
            wanted = clamp_max(wanted, scale_format->max_value);
            const float block_scale = round_nearest(wanted, scale_format);
            const float full = block_scale * tensor_scale;
            divisors[j] = full == 0.0f ? 1.0f : full;
            multipliers[j] = apply_tensor_scale ? full : block_scale;
        }
        for (int64_t j = 0; j < count; j++) {
            for (int64_t start = 0; start < block; start += RUN) {
                const int64_t first = (run + j) * block + start;
                const int64_t length = block - start < RUN ? block - start : RUN;
                if (r->kind != RANDOM_NONE && (block > RUN || j == 0)) {
                    fill_random(r, first, block > RUN ? length : count * block, random);
                }
                const int32_t *bits = r->kind == RANDOM_NONE ? NULL
                                      : random + (block > RUN ? 0 : j * block);
                quantize_run(x + first, out + first, length, divisors[j], multipliers[j],
                             e->max_value, e, bits, r->num_bits);
            }
        }
    }
}

void stalwart_nv(const float *x, float *out, const float *amax, int64_t first_block,
                 int64_t num_blocks, int64_t block, float tensor_scale, element_t e,
                 element_t scale_format, int32_t apply_tensor_scale, random_t r) {
    if (block == 16) {
        nv_blocks(x, out, amax, first_block, num_blocks, 16, tensor_scale, &e, &scale_format,
                  apply_tensor_scale, &r);
    } else {
        nv_blocks(x, out, amax, first_block, num_blocks, block, tensor_scale, &e,
                  &scale_format, apply_tensor_scale, &r);
    }
}

/* one divisor and multiplier for elements first .. first + n - 1 (tensor scaling, or none) */
void stalwart_scaled(const float *x, float *out, int64_t first, int64_t n, float divisor,
                     float multiplier, float limit, element_t e, random_t r) {
    int32_t random[RUN];
    for (int64_t start = first; start < first + n; start += RUN) {
        const int64_t count = first + n - start < RUN ? first + n - start : RUN;
        if (r.kind != RANDOM_NONE) fill_random(&r, start, count, random);
        quantize_run(x + start, out + start, count, divisor, multiplier, limit, &e,
                     r.kind == RANDOM_NONE ? NULL : random, r.num_bits);
    }
}
"""
# no fast-math (the magic-constant rounding needs (v + c) - c evaluated as written) and no
# FMA contraction (the eager path rounds every product)
_FLAGS = ["-O3", "-fPIC", "-shared", "-std=c11", "-ffp-contract=off", "-fno-math-errno"]
_NATIVE_FLAGS = ["-march=native"]


class _Element(ctypes.Structure):
    _fields_ = [
        ("is_int", ctypes.c_int32),
        ("ulp_magic", ctypes.c_float),
        ("subnormal_magic", ctypes.c_float),
        ("ulp_factor", ctypes.c_float),
        ("min_spacing", ctypes.c_float),
        ("min_normal", ctypes.c_float),
        ("max_value", ctypes.c_float),
    ]


class _Random(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("num_bits", ctypes.c_int32),
        ("key", ctypes.c_uint64),
        ("bytes", ctypes.c_void_p),
        ("words", ctypes.c_void_p),
    ]


_MAGIC = 1.5 * 2.0**23
_RANDOM_NONE, _RANDOM_BYTES, _RANDOM_WORDS, _RANDOM_HASHED = 0, 1, 2, 3
_SCALE_ROUNDING_CODES = {"floor": 0, "ceil": 1, "rceil": 2}


def element_struct(element) -> _Element:
    """The C view of a float/int ElementFormat (the constants the eager path multiplies by)."""
    if element.kind == "int":
        return _Element(
            1, 0.0, _MAGIC * element.step, 0.0, element.step, element.step, element.max_value
        )
    return _Element(
        0,
        _MAGIC * 2.0 ** (-element.mantissa_bits),
        _MAGIC * element.min_subnormal,
        2.0 ** (-element.mantissa_bits),
        element.min_subnormal,
        element.min_normal,
        element.max_value,
    )


def random_struct(
    num_bits: int, key: int | None = None, random_bits: torch.Tensor | None = None
) -> tuple[_Random, torch.Tensor | None]:
    """Stochastic rounding's bit source: hashed from `key`, or an explicit tensor (returned so
    the caller keeps it alive during the call); no rounding randomness when both are None."""
    if random_bits is not None:
        if random_bits.dtype == torch.uint8:
            bits = random_bits.contiguous()
            return _Random(_RANDOM_BYTES, num_bits, 0, bits.data_ptr(), None), bits
        bits = random_bits.to(torch.int32).contiguous()
        return _Random(_RANDOM_WORDS, num_bits, 0, None, bits.data_ptr()), bits
    if key is not None:
        return _Random(_RANDOM_HASHED, num_bits, key & (2**64 - 1), None, None), None
    return _Random(_RANDOM_NONE, 0, 0, None, None), None


class CpuKernels:
    """The compiled library plus thin wrappers taking contiguous float32 CPU tensors."""

    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        self._library = library
        pointer, int64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int32
        library.stalwart_block_amax.argtypes = [pointer, pointer, int64, int64]
        library.stalwart_mx_nearest.argtypes = [pointer, pointer, int64, int64, _Element, f32, i32]
        library.stalwart_nv.argtypes = [
            pointer, pointer, pointer, int64, int64, int64, f32, _Element, _Element, i32, _Random,
        ]  # fmt: skip
        library.stalwart_scaled.argtypes = [
            pointer, pointer, int64, int64, f32, f32, f32, _Element, _Random,
        ]  # fmt: skip
        for function in ("stalwart_block_amax", "stalwart_mx_nearest", "stalwart_nv", "stalwart_scaled"):  # fmt: skip
            getattr(library, function).restype = None

    @staticmethod
    def _split(num_items: int, item_elements: int) -> list[tuple[int, int]]:
        """(first, count) ranges of items, one per thread for large inputs."""
        threads = torch.get_num_threads()
        threads = max(1, min(threads, num_items * item_elements // _MIN_ELEMENTS_PER_THREAD))
        step = -(-num_items // threads)
        return [(first, min(step, num_items - first)) for first in range(0, num_items, step)]

    def _run(self, calls: list) -> None:
        if len(calls) == 1:
            calls[0]()
            return
        futures = [_executor(len(calls)).submit(call) for call in calls]
        for future in futures:
            future.result()

    def block_amax(self, blocks: torch.Tensor) -> torch.Tensor:
        """|x| max of each row of a contiguous [num_blocks, block] float32 tensor (NaN wins)."""
        num_blocks, block = blocks.shape
        amax = torch.empty(num_blocks)
        x, out = blocks.data_ptr(), amax.data_ptr()

        def call(first, count):
            return lambda: self._library.stalwart_block_amax(
                x + 4 * first * block, out + 4 * first, count, block
            )

        self._run([call(first, count) for first, count in self._split(num_blocks, block)])
        return amax

    def mx_nearest(self, rows: torch.Tensor, out: torch.Tensor, spec) -> None:
        element = spec.element_format
        block = spec.block_size
        num_blocks = rows.numel() // block
        arguments = (
            element_struct(element),
            2.0 ** (-element.emax),
            _SCALE_ROUNDING_CODES[spec.scale_rounding],
        )
        x, y = rows.data_ptr(), out.data_ptr()

        def call(first, count):
            offset = 4 * first * block
            return lambda: self._library.stalwart_mx_nearest(
                x + offset, y + offset, count, block, *arguments
            )

        self._run([call(first, count) for first, count in self._split(num_blocks, block)])

    def nv(
        self,
        rows: torch.Tensor,
        out: torch.Tensor,
        amax: torch.Tensor,
        tensor_scale: float,
        spec,
        apply_tensor_scale: bool,
        random: _Random,
    ) -> None:
        from stalwart.quant.formats import scale_format

        block = spec.block_size
        num_blocks = rows.numel() // block
        arguments = (
            block,
            tensor_scale,
            element_struct(spec.element_format),
            element_struct(scale_format(spec.scale_format)),
            int(apply_tensor_scale),
            random,
        )
        x, y, scales = rows.data_ptr(), out.data_ptr(), amax.data_ptr()

        def call(first, count):
            return lambda: self._library.stalwart_nv(x, y, scales, first, count, *arguments)

        self._run([call(first, count) for first, count in self._split(num_blocks, block)])

    def scaled(
        self,
        rows: torch.Tensor,
        out: torch.Tensor,
        divisor: float | None,
        multiplier: float | None,
        saturates: bool,
        element,
        random: _Random,
    ) -> None:
        # split on multiples of 8 elements so every thread starts on a whole random hash
        num_groups = -(-rows.numel() // 8)
        arguments = (
            1.0 if divisor is None else divisor,  # x / 1 and x * 1 are exact: "none"
            1.0 if multiplier is None else multiplier,
            element.max_value if saturates else math.inf,
            element_struct(element),
            random,
        )
        x, y, total = rows.data_ptr(), out.data_ptr(), rows.numel()

        def call(first_group, count):
            first = 8 * first_group
            count = min(8 * count, total - first)
            return lambda: self._library.stalwart_scaled(x, y, first, count, *arguments)

        self._run([call(first, count) for first, count in self._split(num_groups, 8)])


# ---------------------------------------------------------------------------------------------
# Building and loading

_lock = threading.Lock()
_state: dict = {"loaded": False, "kernels": None, "enabled": None, "executor": None}


def _executor(num_workers: int) -> ThreadPoolExecutor:
    """A thread pool of at least `num_workers`, owned by this process (a pool inherited
    through fork has no threads behind it, so a forked child makes its own)."""
    owner, executor = _state["executor"] or (None, None)
    if executor is None or owner != os.getpid() or executor._max_workers < num_workers:
        executor = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="stalwart-quant")
        _state["executor"] = (os.getpid(), executor)
    return executor


def is_enabled() -> bool:
    if _state["enabled"] is not None:
        return _state["enabled"]
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def set_enabled(enabled: bool | None) -> bool:
    """Switch the kernels on or off for this process (None: back to the environment's
    setting); returns whether they were enabled before."""
    previous = is_enabled()
    _state["enabled"] = enabled
    return previous


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _cpu_signature() -> str:
    """The CPU's feature flags (the library is built with -march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("STALWART_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "stalwart"


def build(compiler: str | None = None, cache_dir: Path | None = None) -> Path:
    """Compile the kernels (or find them in the cache); raises RuntimeError on failure."""
    compiler = compiler or _compiler()
    if compiler is None or shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler found (tried $CC, cc, gcc, clang; got {compiler!r})")
    cache_dir = (cache_dir or _cache_dir()) / "quant_kernels"
    errors = []
    for flags in (_FLAGS + _NATIVE_FLAGS, _FLAGS):
        digest = hashlib.sha256(
            "\0".join([_SOURCE, *flags, compiler, platform.machine(), _cpu_signature()]).encode()
        ).hexdigest()[:24]
        library = cache_dir / f"quant_{digest}.so"
        if library.exists():
            return library
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
            source = Path(scratch) / "quant.c"
            source.write_text(_SOURCE)
            built = Path(scratch) / "quant.so"
            result = subprocess.run(
                [compiler, *flags, str(source), "-o", str(built), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if result.returncode == 0:
                os.replace(built, library)  # atomic: concurrent builders never see half a file
                return library
            errors.append(f"{' '.join(flags)}: {result.stderr.strip()[-400:]}")
    raise RuntimeError(f"compiling the quantization kernels with {compiler} failed: {errors}")


def load() -> CpuKernels | None:
    """The kernels, built on first use; None when disabled or unavailable (then mx.py uses its
    eager torch path)."""
    if not is_enabled():
        return None
    if _state["loaded"]:
        return _state["kernels"]
    with _lock:
        if not _state["loaded"]:
            try:
                path = build()
                _state["kernels"] = CpuKernels(ctypes.CDLL(str(path)), path)
            except (RuntimeError, OSError, subprocess.SubprocessError) as error:
                warnings.warn(
                    f"stalwart.quant: fused CPU kernels unavailable, using the eager torch path "
                    f"(slower, same results): {error}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                _state["kernels"] = None
            _state["loaded"] = True
    return _state["kernels"]


def reset() -> None:
    """Forget the loaded library (tests use it to exercise the build and fallback paths)."""
    with _lock:
        _state["loaded"] = False
        _state["kernels"] = None

"""The offload planner: measure this machine, model the step, choose the knobs.

Measurements (`measure_machine`): matmul throughput of the compute device, host memory copy
bandwidth, host<->device bandwidth (CUDA only) and NVMe read/write bandwidth through the same
aio back-end the engine uses (O_DIRECT, so the page cache does not flatter the drive).

Model (`plan_offload`), per step with T tokens and the engine's byte counts per unit:
- compute: 2 FLOPs per parameter and token forward, 4 backward, 2 more to recompute each block;
  plus causal attention, which no parameter count sees and which dominates long sequences:
  2 s w FLOPs per token and block forward (QK^T and AV over s/2 keys on average, width w),
  4x that with the backward and the recompute, at the attention kernel's own measured rate;
  all divided by the compute efficiency the engine measured on the model's own blocks in the
  profiling step (this prediction against their measured forward, recomputation and
  backward, parameters resident): normalisation, activations and rotary embeddings run far
  below the matmul rate on a CPU;
- NVMe: parameters read twice (forward and backward), AdamW state (and the fp32 master, with
  bf16 working parameters) read once, parameters and state written once, gradients written once when clipping is on (and twice more per extra
  micro-batch for accumulation), plus every swapped checkpoint written and read;
- host memory: the optimizer touches about 36 bytes per parameter (DeepSpeed's and LoHan's
  accounting: P, G, m, v read, P, m, v written, gradient copy).
With prefetch depth d >= 1 these overlap and the step is the largest of the three plus the
stalls of units whose read takes longer than d units of compute; with d = 0 they add up. The
lower bound is the largest of the three with perfect overlap.

Choices: the smallest prefetch depth within 2% of the best predicted step that fits the pool;
block checkpoints stay in memory while they fit the activation allowance, and the rest go to
NVMe (or host, on a GPU with a device budget), earliest blocks first: their checkpoints are
needed last in the backward, so their reads have the most compute to hide behind (for equal
blocks this is also the order of FLOPs per swapped byte, the LoHan ranking).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from stalwart.offload.aio import AioBackend, measure_bandwidth

GIB = 1 << 30


@dataclass(frozen=True)
class Machine:
    compute_flops_per_s: float
    host_copy_bytes_per_s: float
    nvme_read_bytes_per_s: float
    nvme_write_bytes_per_s: float
    host_to_device_bytes_per_s: float | None = None
    device_name: str = "cpu"
    # Causal scaled-dot-product attention, forward + backward, in model FLOPs per second (its
    # kernels run well below the matmul rate on CPUs); None: the matmul rate.
    attention_flops_per_s: float | None = None

    def describe(self) -> str:
        parts = [
            f"compute {self.compute_flops_per_s / 1e9:.1f} GFLOP/s ({self.device_name})",
            *(
                [f"attention {self.attention_flops_per_s / 1e9:.1f} GFLOP/s"]
                if self.attention_flops_per_s
                else []
            ),
            f"host copy {self.host_copy_bytes_per_s / 1e9:.2f} GB/s",
            f"NVMe read {self.nvme_read_bytes_per_s / 1e9:.2f} GB/s",
            f"NVMe write {self.nvme_write_bytes_per_s / 1e9:.2f} GB/s",
        ]
        if self.host_to_device_bytes_per_s:
            parts.append(f"host->device {self.host_to_device_bytes_per_s / 1e9:.2f} GB/s")
        return ", ".join(parts)


def _probe_tensor(shape, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Random operands from a generator of the probe's own: drawing from the global one would
    shift the training's random numbers (dropout masks) by whether a plan was made."""
    generator = torch.Generator(device=device).manual_seed(0)
    return torch.randn(shape, device=device, dtype=dtype, generator=generator)


def _matmul_flops_per_s(
    device: torch.device, size: int = 1024, repeats: int = 4, dtype: torch.dtype = torch.float32
) -> float:
    a, b = (_probe_tensor((size, size), device, dtype) for _ in range(2))
    torch.mm(a, b)  # warm up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _attention_flops_per_s(
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    length: int = 1024,
    heads: int = 4,
    head_dim: int = 64,
) -> float:
    """Causal SDPA forward + backward on one sequence, as model FLOPs (3x the forward's
    2 s^2 d per head: QK^T and AV over half the keys) per second."""
    shape = (1, heads, length, head_dim)
    q, k, v = (_probe_tensor(shape, device, dtype).requires_grad_() for _ in range(3))

    def run():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(torch.ones_like(out))

    run()  # warm up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 3 * 2 * length**2 * head_dim * heads / (time.perf_counter() - start)


def _copy_bytes_per_s(source: torch.Tensor, target: torch.Tensor, repeats: int = 3) -> float:
    target.copy_(source)
    if target.device.type == "cuda" or source.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source, non_blocking=True)
    if target.device.type == "cuda" or source.device.type == "cuda":
        torch.cuda.synchronize()
    return source.nbytes * repeats / (time.perf_counter() - start)


def measure_machine(
    aio: AioBackend | None,
    directory: str | None,
    compute_device: torch.device,
    compute_dtype: torch.dtype = torch.float32,
) -> Machine:
    """Measure compute (matmuls in the dtype the model computes in), memory and NVMe
    bandwidths (about a second)."""
    flops = _matmul_flops_per_s(compute_device, dtype=compute_dtype)
    attention = _attention_flops_per_s(compute_device, dtype=compute_dtype)
    host = torch.empty(16 << 20, dtype=torch.uint8)
    host_copy = _copy_bytes_per_s(host, torch.empty_like(host))
    host_to_device = None
    if compute_device.type == "cuda":
        pinned = host.pin_memory()
        host_to_device = _copy_bytes_per_s(pinned, torch.empty_like(pinned, device=compute_device))
    if aio is not None and directory is not None:
        # Requests of the size the engine issues (a layer), little memory outside the pool.
        bandwidth = measure_bandwidth(aio, directory, num_bytes=128 << 20, chunk_bytes=16 << 20)
        read, write = bandwidth.read_bytes_per_s, bandwidth.write_bytes_per_s
    else:  # offload.device: cpu, the "drive" is host memory
        read = write = host_copy
    name = torch.cuda.get_device_name(compute_device) if compute_device.type == "cuda" else "cpu"
    return Machine(flops, host_copy, read, write, host_to_device, name, attention)


@dataclass(frozen=True)
class UnitCost:
    """What the planner needs to know about one unit (engine layer)."""

    index: int
    name: str
    num_params: int
    param_bytes: int
    state_bytes: int  # one fp32 set: exp_avg / exp_avg_sq / gradient / master
    is_block: bool
    checkpoint_bytes: int = 0  # the block's input for the planned batch
    attention_width: int = 0  # a block's hidden width (its attention's q.k width); 0: none
    num_state_sets: int = 2  # exp_avg, exp_avg_sq (+ the fp32 master with bf16 parameters)


@dataclass
class OffloadPlan:
    prefetch_depth: int
    buffer_count: int
    activation_targets: dict[int, str]
    predicted_step_s: float
    lower_bound_s: float
    compute_s: float
    nvme_s: float
    host_s: float
    read_bytes: int
    written_bytes: int
    machine: Machine
    candidates: dict[int, float] = field(default_factory=dict)
    compute_efficiency: float = 1.0  # the blocks' measured speed / the matmul rate's prediction

    def describe(self) -> str:
        swapped = sum(1 for target in self.activation_targets.values() if target != "keep")
        lines = [
            f"offload plan: prefetch depth {self.prefetch_depth}, {self.buffer_count} parameter buffers, "
            f"{swapped}/{len(self.activation_targets)} block checkpoints swapped",
            f"  machine: {self.machine.describe()}",
            f"  per step: NVMe {self.read_bytes / 1e9:.2f} GB read + {self.written_bytes / 1e9:.2f} GB written "
            f"= {self.nvme_s:.2f} s, compute {self.compute_s:.2f} s "
            f"(blocks measured at {self.compute_efficiency:.2f}x the matmul rate), "
            f"host memory {self.host_s:.2f} s",
            f"  predicted step {self.predicted_step_s:.2f} s (lower bound {self.lower_bound_s:.2f} s); "
            + ", ".join(f"depth {d}: {t:.2f} s" for d, t in sorted(self.candidates.items())),
        ]
        return "\n".join(lines)


def unit_flops(
    num_params: int,
    tokens: int,
    *,
    recomputed: bool,
    sequence_length: int = 0,
    attention_width: int = 0,
) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) of one unit's forward and backward over `tokens` tokens:
    2 per parameter and token forward, 4 backward, 2 more for a block whose forward is
    recomputed; causal attention 8 s w per token (its forward and backward over half the keys)
    in sequences of `sequence_length` (0: one sequence of all the tokens)."""
    length = min(sequence_length or tokens, tokens)
    matmul = (8 if recomputed else 6) * num_params * tokens
    return matmul, 8 * length * tokens * attention_width


def plan_offload(
    units: list[UnitCost],
    machine: Machine,
    *,
    tokens_per_step: int,
    num_microbatches: int,
    clipping: bool,
    pool_budget_bytes: int,
    activation_allowance_bytes: int,
    max_buffer_count: int,
    device_memory_bytes: int | None = None,
    forced_prefetch_depth: int | None = None,
    forced_activation_target: str | None = None,
    sequence_length: int = 0,
    compute_efficiency: float = 1.0,
) -> OffloadPlan:
    num_params = sum(u.num_params for u in units)
    flops = [
        unit_flops(
            u.num_params,
            tokens_per_step,
            recomputed=u.is_block,
            sequence_length=sequence_length,
            attention_width=u.attention_width if sequence_length else 0,  # 0: not counted
        )
        for u in units
    ]
    compute_s = sum(matmul for matmul, _ in flops) / machine.compute_flops_per_s
    attention_rate = machine.attention_flops_per_s or machine.compute_flops_per_s
    compute_s += sum(attention for _, attention in flops) / attention_rate
    compute_s /= compute_efficiency

    # Activation placement: keep while the allowance lasts, then swap the earliest blocks.
    blocks = sorted((u for u in units if u.is_block), key=lambda u: u.index)
    targets: dict[int, str] = {}
    keep_budget = activation_allowance_bytes // 2  # the other half: one block's recompute, logits
    if device_memory_bytes:
        keep_budget = min(keep_budget, device_memory_bytes // 4)
    kept = sum(u.checkpoint_bytes for u in blocks)
    for unit in blocks:
        targets[unit.index] = "keep"
    for unit in blocks:
        if kept <= keep_budget:
            break
        targets[unit.index] = "host" if device_memory_bytes else "nvme"
        kept -= unit.checkpoint_bytes
    if forced_activation_target is not None:
        targets = {unit.index: forced_activation_target for unit in blocks}
    swap_bytes = sum(u.checkpoint_bytes for u in blocks if targets[u.index] == "nvme")

    param_bytes = sum(u.param_bytes for u in units)
    state_bytes = sum(u.state_bytes for u in units)
    optimizer_bytes = sum(u.num_state_sets * u.state_bytes for u in units)
    extra_micro = max(num_microbatches - 1, 0)
    read_bytes = (
        num_microbatches * 2 * param_bytes
        + optimizer_bytes
        + extra_micro * state_bytes
        + swap_bytes
    )
    written_bytes = (
        param_bytes + optimizer_bytes + (state_bytes if clipping else 0) + extra_micro * state_bytes
    )
    written_bytes += swap_bytes
    nvme_s = (
        read_bytes / machine.nvme_read_bytes_per_s + written_bytes / machine.nvme_write_bytes_per_s
    )
    host_s = 36 * num_params / machine.host_copy_bytes_per_s
    lower_bound_s = max(compute_s, nvme_s, host_s)

    largest = max(units, key=lambda u: u.param_bytes + (u.num_state_sets + 1) * u.state_bytes)
    working_set = largest.param_bytes + (largest.num_state_sets + 1) * largest.state_bytes
    candidates: dict[int, float] = {}
    for depth in range(0, max(max_buffer_count, 1)):
        if depth and working_set * 2 + depth * largest.param_bytes > pool_budget_bytes:
            break
        candidates[depth] = _predict(
            units, machine, tokens_per_step, depth, compute_s, nvme_s, host_s, compute_efficiency
        )
    best = min(candidates.values())
    depth = min(d for d, t in candidates.items() if t <= best * 1.02)
    if forced_prefetch_depth is not None:
        depth = forced_prefetch_depth
        if depth not in candidates:
            candidates[depth] = _predict(
                units,
                machine,
                tokens_per_step,
                depth,
                compute_s,
                nvme_s,
                host_s,
                compute_efficiency,
            )
    return OffloadPlan(
        prefetch_depth=depth,
        buffer_count=depth + 1,
        activation_targets=targets,
        predicted_step_s=candidates[depth],
        lower_bound_s=lower_bound_s,
        compute_s=compute_s,
        nvme_s=nvme_s,
        host_s=host_s,
        read_bytes=read_bytes,
        written_bytes=written_bytes,
        machine=machine,
        candidates=candidates,
        compute_efficiency=compute_efficiency,
    )


def _predict(
    units, machine: Machine, tokens: int, depth: int, compute_s, nvme_s, host_s, efficiency=1.0
) -> float:
    """Predicted step time for a prefetch depth (see the module docstring)."""
    if depth == 0:
        return compute_s + nvme_s + host_s
    stall_s = 0.0
    ordered = sorted(units, key=lambda u: u.index)
    for position, unit in enumerate(ordered):
        read_s = unit.param_bytes / machine.nvme_read_bytes_per_s
        ahead = ordered[max(0, position - depth) : position]
        rate = machine.compute_flops_per_s * efficiency
        hide_s = sum(8 * u.num_params * tokens / rate for u in ahead)
        stall_s += 2 * max(0.0, read_s - hide_s)  # forward and backward
    fill_s = max(u.param_bytes for u in units) / machine.nvme_read_bytes_per_s
    return max(compute_s, nvme_s, host_s) + stall_s + fill_s


def step_vs_plan(plan: OffloadPlan, measured_step_s: float) -> str:
    ratio = measured_step_s / plan.predicted_step_s if plan.predicted_step_s > 0 else math.inf
    return (
        f"offload step: measured {measured_step_s:.2f} s, predicted {plan.predicted_step_s:.2f} s "
        f"({ratio:.2f}x), lower bound {plan.lower_bound_s:.2f} s"
    )

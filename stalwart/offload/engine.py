"""OffloadEngine: train any nn.Module whose parameters and AdamW state live on NVMe (or host).

The model is cut into *units*: every block of its largest `nn.ModuleList` (a transformer layer)
and every other module that owns parameters (embedding, final norm, LM head). Parameters shared
between units (tied embeddings) or owned by the root form one persistent unit that stays resident
during a step. Each unit has, in the tensor store, two versions of [parameters | exp_avg |
exp_avg_sq] (committed and speculative) and a gradient-accumulation span.

A step, driven by module hooks:
- forward: a unit's parameters are read into a host buffer just before it runs (the next
  `prefetch_depth` units are already on their way) and released right after; blocks run under
  activation checkpointing (`activations.py`), so nothing saved points into a released buffer;
- backward: a unit's parameters (and, on the last micro-batch, its optimizer state) are read
  back before its backward; when all its gradients have accumulated (post-accumulate-grad
  hooks) they leave the device, the unit is handed to the optimizer thread, which updates it
  in place (`optimizer.py`) and writes it to the speculative version while the backward of the
  earlier layers goes on;
- end: the global gradient norm decides commit / skip / redo-with-clipping (see optimizer.py).

Host memory: `offload.max_host_memory_gb` bounds the whole process. The engine measures what the
process already uses, reserves a workspace for gradients and activations, and gives the rest to
the buffer pool; a budget too small for one layer fails at construction with the number needed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import statistics
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from stalwart.offload.activations import (
    ActivationSwapper,
    BlockCheckpoint,
    CheckpointedCall,
    StashedCheckpoint,
    can_checkpoint,
)
from stalwart.offload.aio import AioSettings, align_up, limit_heap_retention, make_aio, malloc_trim
from stalwart.offload.device import parameter_transfers
from stalwart.offload.loss import TokenCrossEntropy, chunked_head_loss
from stalwart.offload.optimizer import (
    AdamWSettings,
    OutOfCoreAdamW,
    clip_coefficient,
    decays,
    parameter_norms,
    step_decision,
    total_norm,
)
from stalwart.offload.planner import (
    Machine,
    OffloadPlan,
    UnitCost,
    measure_machine,
    plan_offload,
    step_vs_plan,
    unit_flops,
)
from stalwart.offload.store import (
    GIB,
    HostBufferPool,
    Region,
    TensorStore,
    check_nvme_path,
    completed_future,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "stalwart.offload/1"
_TENSOR_ALIGNMENT = 64  # bytes between tensors inside a unit's span: any dtype view is aligned
_CHECKPOINT_CHUNK_BYTES = 8 << 20


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) so a step's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last `reset_peak_rss` (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return rss_bytes()


_MIN_SPARE_BYTES = 96 << 20  # the least workspace kept for kernels, threads and the allocator
_MAX_SPARE_BYTES = 1 << 30  # and the most: it does not grow with the budget beyond this
# Kept free of the heap's retained pages at block boundaries, for what the optimizer and I/O
# threads allocate before the next boundary (half the least spare).
_HEAP_MARGIN_BYTES = _MIN_SPARE_BYTES // 2
# Allocations above these sizes are mapped and unmapped one by one: while the heap may keep
# freed blocks for reuse, and when the process is near its budget (OffloadEngine._bound_heap).
_REUSE_MMAP_THRESHOLD = 32 << 20
_STRICT_MMAP_THRESHOLD = 256 << 10
# One block's recomputation with eager attention holds its scores, their float32 softmax and
# both gradients: bytes per score (batch x heads x sequence x sequence), measured 7.6-11.0 on
# a Llama block (bf16 and fp32, 4-16 heads, 1-4k tokens) beyond what its linear layers take.
_EAGER_SCORE_BYTES = 12


def budget_split(
    max_host_bytes: int, baseline_bytes: int, largest_grad_bytes: int, min_pool_bytes: int
) -> tuple[int, int, int]:
    """How a host budget is divided: (workspace, buffer pool, activation allowance).

    Outside the pool: autograd's gradients of the unit in backward before they are copied into
    a pool buffer (two units at a boundary), and the transient memory of kernels, threads and
    the allocator, which measured 100-250 MB on a 2-core host: a quarter of what the runtime
    leaves, at least `_MIN_SPARE_BYTES` and at most `_MAX_SPARE_BYTES` (training the Llama 3 8B
    shape's embedding, head and one block at a 17.7 GiB budget peaked at 9.7 GiB with a 4.3
    GiB quarter: the excess was unused). Of the rest the pool gets its minimum and 60% of what
    remains; activations (checkpoints, logits, one block's recomputation) the other 40%."""
    headroom = max(max_host_bytes - baseline_bytes, 0)
    spare = min(max(_MIN_SPARE_BYTES, headroom // 4), _MAX_SPARE_BYTES)
    workspace = 2 * largest_grad_bytes + spare
    available = max_host_bytes - baseline_bytes - workspace
    pool = min_pool_bytes + int(0.6 * (available - min_pool_bytes))
    return workspace, pool, available - pool


def activation_room_bytes(
    max_host_bytes: int, baseline_bytes: int, largest_grad_bytes: int, min_pool_bytes: int
) -> int:
    """Room for what grows with a micro-batch and nothing bounds (one block's recomputation,
    the head's hidden states), with the pool at its minimum: the workspace beyond the gradients
    and the kernels' spare, a quarter of the allowance, and the pool's share above its
    minimum. Negative when the pool's minimum does not fit."""
    workspace, pool, allowance = budget_split(
        max_host_bytes, baseline_bytes, largest_grad_bytes, min_pool_bytes
    )
    if allowance < 0:
        return allowance
    spare = workspace - 2 * largest_grad_bytes - _MIN_SPARE_BYTES
    return spare + allowance // 4 + pool - min_pool_bytes


def smallest_budget_bytes(fits: Callable[[int], bool], low: int, high: int) -> int:
    """The smallest host budget (bytes, within 1 MiB) for which `fits(budget)` holds, given
    that it fails at `low` and holds at `high`. The budget's split (`budget_split`) grows its
    workspace with the budget, so what a refused budget lacks is not what a larger one needs:
    answers are found on the split itself, never on a formula beside it."""
    while high - low > (1 << 20):
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle
    return high


def _placeholder(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device=device)


@dataclass
class _Slot:
    """One parameter inside a unit: where its bytes sit in the unit's spans."""

    name: str
    param: nn.Parameter
    index: int  # position in model.parameters(): the order of the global norm
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the stored parameter: the fp32 master of a trainable one
    p_offset: int
    trainable: bool
    state_offset: int = -1  # inside each optimizer-state set (master, exp_avg, exp_avg_sq)
    compute_dtype: torch.dtype | None = None  # what forward/backward see (the p span's dtype)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def num_bytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def compute_bytes(self) -> int:
        return self.numel * self.compute_dtype.itemsize


@dataclass
class _Unit:
    index: int
    name: str
    modules: list[nn.Module]
    slots: list[_Slot]
    is_block: bool = False
    persistent: bool = False
    p_bytes: int = 0  # aligned span of all parameters as forward/backward see them
    state_bytes: int = 0  # aligned span of one fp32 state set (master, exp_avg or exp_avg_sq)
    # Sets in the optimizer span after the parameters: [exp_avg | exp_avg_sq] in fp32 training,
    # [fp32 master | exp_avg | exp_avg_sq] with bf16 working parameters.
    num_state_sets: int = 2
    # Bytes of each state set updated at a time; 0 = the whole span (see `_sliced_update`).
    slice_bytes: int = 0
    version_offsets: tuple[int, int] = (0, 0)
    grad_offset: int = 0
    grad_half: bool = False  # the gradient span holds bf16 values, packed (see _pack_gradients)
    version: int = 0
    written: bool = False  # the speculative version holds this step's update
    pending: int = 0
    attached: bool = False  # parameters' .data point into p_buffer
    # Non-block units start resident for the whole step until their forward hook has been seen
    # to fire: a model may use a module's weight without calling the module (an output layer
    # applied as F.linear(x, head.weight)).
    provisional: bool = False
    seen_in_forward: bool = False
    has_attention: bool = False  # a block holding an attention layer (the planner's FLOPs)
    updated_slots: list = field(default_factory=list)
    p_buffer: object = None
    p_future: Future | None = None
    mv_buffer: object = None
    mv_future: Future | None = None
    g_buffer: object = None
    g_future: Future | None = None
    g_write: Future | None = None  # the last write of the gradient span, read after it only
    # The optimizer step of a clipped or deferred step waits here, (slots, clip_coef, lr), until
    # the unit's parameters are next needed (see `_start_update`).
    pending_update: tuple | None = None
    update_job: Future | None = None  # that update on the optimizer thread: (write_p, write_mv)
    p_write: Future | None = None  # p_buffer's new parameters going to NVMe: release after it
    device_copies: list = field(default_factory=list)

    @property
    def trainable(self) -> list[_Slot]:
        return [slot for slot in self.slots if slot.trainable]

    @property
    def mv_bytes(self) -> int:
        return self.num_state_sets * self.state_bytes

    @property
    def has_master(self) -> bool:
        return self.num_state_sets == 3

    def state_set_offset(self, kind: str) -> int:
        """Offset of a state set inside the optimizer span (after the parameter span)."""
        position = {"master": 0, "exp_avg": 1, "exp_avg_sq": 2}[kind] - (3 - self.num_state_sets)
        assert position >= 0, f"no {kind} set in a unit with {self.num_state_sets} state sets"
        return position * self.state_bytes

    @property
    def update_buffer_bytes(self) -> int:
        """Host bytes the optimizer state takes during an update: the whole span, or two
        slices of every set (one updating while the next is read and the last written)."""
        if self.slice_bytes:
            return 2 * self.num_state_sets * self.slice_bytes
        return self.mv_bytes

    @property
    def working_set_bytes(self) -> int:
        return self.p_bytes + self.update_buffer_bytes + self.state_bytes


@dataclass(frozen=True)
class _Region:
    """One tensor of the committed state in the store."""

    name: str  # checkpoint entry name: "param/...", "compute/...", "exp_avg/...", "exp_avg_sq/..."
    slot: _Slot
    store_offset: int
    kind: str
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        return self.slot.numel * self.dtype.itemsize


@dataclass
class Shard:
    """A streaming view of offloaded state for the durable tier: layout + read_into."""

    layout: dict
    _reader: Callable[[int, memoryview], None]

    def read_into(self, offset: int, target: memoryview) -> None:
        self._reader(offset, target)


@contextlib.contextmanager
def empty_parameters():
    """Build a model whose parameters are on the meta device (no memory) but buffers are real.

    The engine then initialises each layer's parameters straight into the NVMe store, so a model
    larger than host memory can be created: `with empty_parameters(): model = Model(config)`.
    """
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(
                param.to("meta"), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of the model's largest nn.ModuleList (by parameter count): its layers."""
    best, best_params = [], 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(p.numel() for p in module.parameters())
            if count > best_params:
                best, best_params = list(module), count
    return best


class OffloadEngine:
    """Out-of-core training of `model` with AdamW; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        offload_config,
        optim_config,
        *,
        loss_fn: Callable,
        run_dir: str | os.PathLike | None = None,
        init_fn: Callable[[str, torch.Tensor], None] | None = None,
        aio_backend: str = "auto",
        optimizer_kernel: str | None = None,
        prefetch_depth: int | None = None,
        activation_target: str | None = None,
        precision: str | None = None,
    ):
        device_kind = offload_config.device
        if device_kind not in ("cpu", "nvme"):
            raise ValueError(
                f"offload.device={device_kind!r}: the offload engine needs 'cpu' or 'nvme' "
                "(use the ordinary trainer for 'none')"
            )
        precision = precision or getattr(offload_config, "precision", None) or "fp32"
        if precision not in _COMPUTE_DTYPES:
            raise ValueError(
                f"precision={precision!r}: the offload engine trains in one of "
                f"{sorted(_COMPUTE_DTYPES)} (trainer.precision)"
            )
        self.precision = precision
        self.compute_dtype = _COMPUTE_DTYPES[precision]
        self.model = model
        self.config = offload_config
        self.loss_fn = loss_fn
        self.run_dir = str(run_dir) if run_dir is not None else None
        self.compute_device = (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        )
        # Host buffer -> compute memory: views on the host, a copy stream on a GPU (device.py).
        self.transfers = parameter_transfers(self.compute_device)
        self.settings = AdamWSettings.from_config(optim_config)
        # Looks like a torch optimizer's to LR schedules: train_step reads the LR from here.
        self.param_groups = [{"lr": float(getattr(optim_config, "lr", 1e-3) or 1e-3)}]
        self._on_phase: Callable[[str], None] = lambda _phase: None
        kernel = optimizer_kernel or getattr(offload_config, "optimizer_kernel", "auto")
        self.optimizer = OutOfCoreAdamW(self.settings, kernel)
        self.max_host_bytes = int(float(offload_config.max_host_memory_gb) * GIB)
        self.sub_group_size = int(getattr(offload_config, "sub_group_size", 1 << 23))
        self.step_count = 0
        self.param_steps: dict[str, int] = {}
        self._phase = "idle"
        self._trace: list[_Unit] = []
        self._traced = False
        self._last_microbatch = True
        self._first_microbatch = True
        self._num_microbatches = 1
        self._norms: dict[int, torch.Tensor] = {}
        self._writes: list[Future] = []
        self._jobs: list[Future] = []
        self._job_slots = threading.BoundedSemaphore(2)
        self._optimizer_thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="stalwart-adam"
        )
        self._checkpoint_calls: dict[int, StashedCheckpoint] = {}
        self._stats = {"wait_s": 0.0}
        self.last_metrics: dict = {}
        # After a clipped step the next one defers the optimizer until the norm is known
        # (clipping tends to persist); after an unclipped step it speculates again.
        self._defer = False
        self._last_decision = "commit"

        for name, buffer in model.named_buffers():
            if buffer.is_meta:
                raise ValueError(
                    f"buffer {name} is on the meta device (no data); build the model inside "
                    "stalwart.offload.engine.empty_parameters() so that only parameters are empty"
                )
        self.units = self._build_units(model)
        self._assign_dtypes()
        self._layout_and_budget(offload_config, aio_backend)
        if prefetch_depth is None:
            prefetch_depth = getattr(offload_config, "prefetch_depth", None)
        # Until the planner has run (after the first step), buffer_count - 1 layers ahead.
        self._forced_prefetch_depth = prefetch_depth
        self.prefetch_depth = int(
            prefetch_depth
            if prefetch_depth is not None
            else max(offload_config.buffer_count - 1, 0)
        )
        self.activation_targets: dict[int, str] = {}
        swap = activation_target or getattr(offload_config, "activation_swap", "auto")
        self.default_activation_target = "keep" if swap == "auto" else swap
        self._initialise_store(init_fn)
        self._head, self._head_unit, self._head_forward = self._find_head()
        self._eager_heads = _eager_attention_heads(model)
        # The widest block's linear layers, summed (in + out): the recomputation estimate's
        # basis, fixed at construction (the check before every step reads it).
        self._linear_width = max(
            (
                sum(
                    m.in_features + m.out_features
                    for m in unit.modules[0].modules()
                    if isinstance(m, nn.Linear)
                )
                for unit in self.units
                if unit.is_block
            ),
            default=0,
        )
        self._bypass_head = False
        self._bypassed: torch.Tensor | None = None
        self._install_hooks()
        self._forced_activation_target = None if swap == "auto" else swap
        self._auto_plan = self._forced_prefetch_depth is None or swap == "auto"
        self._max_buffer_count = int(offload_config.buffer_count)
        self._checkpoint_bytes: dict[int, int] = {}
        self._block_width: dict[int, int] = {}
        self._room_checked_bytes = 0  # the largest estimate the budget was checked for
        self.activation_reserve_bytes = 0  # taken from the pool for one block's recomputation
        self._sequence_length = 0
        # (unit, tokens, forward seconds, the call: its backward seconds) of each block in the
        # profiling step.
        self._block_times: list[tuple[_Unit, int, float, CheckpointedCall]] = []
        self.plan: OffloadPlan | None = None
        self.machine: Machine | None = None

    # ------------------------------------------------------------------------------------------
    # construction

    def _build_units(self, model: nn.Module) -> list[_Unit]:
        blocks = find_blocks(model)
        block_ids = {id(block) for block in blocks}
        inside_block: set[int] = set()
        for block in blocks:
            inside_block.update(id(m) for m in block.modules())
        ancestors_of_blocks: set[int] = set()
        for module in model.modules():
            if id(module) not in inside_block and any(id(m) in block_ids for m in module.modules()):
                ancestors_of_blocks.add(id(module))

        owners: list[tuple[str, nn.Module, bool, list[tuple[str, nn.Parameter]]]] = []
        for name, module in model.named_modules():
            if id(module) in block_ids:
                owners.append(
                    (
                        name,
                        module,
                        True,
                        list(module.named_parameters(prefix=name, remove_duplicate=False)),
                    )
                )
            elif id(module) in inside_block:
                continue
            else:
                direct = list(module.named_parameters(prefix=name, recurse=False))
                if direct:
                    owners.append((name, module, False, direct))

        use_count: dict[int, int] = {}
        for _, _module, _, params in owners:
            for _, param in {id(p): (n, p) for n, p in params}.values():
                use_count[id(param)] = use_count.get(id(param), 0) + 1
        root_direct = {id(p) for _, p in model.named_parameters(recurse=False)}
        index_of = {id(p): i for i, p in enumerate(model.parameters())}
        canonical_name = {id(p): n for n, p in model.named_parameters()}

        units: list[_Unit] = []
        persistent_params: dict[int, nn.Parameter] = {}
        persistent_modules: list[nn.Module] = []
        for name, module, is_block, params in owners:
            kept = []
            for _, param in {id(p): (n, p) for n, p in params}.values():
                if (
                    use_count[id(param)] > 1
                    or id(param) in root_direct
                    or id(module) in ancestors_of_blocks
                ):
                    persistent_params[id(param)] = param
                else:
                    kept.append(param)
            if is_block or kept:
                slots = [self._slot(canonical_name[id(p)], p, index_of[id(p)]) for p in kept]
                unit = _Unit(len(units), name or "<root>", [module], slots, is_block=is_block)
                unit.has_attention = is_block and _has_attention(module)
                unit.persistent = unit.provisional = not is_block
                units.append(unit)
            elif id(module) not in ancestors_of_blocks:
                persistent_modules.append(module)
        if persistent_params:
            slots = [
                self._slot(canonical_name[id(p)], p, index_of[id(p)])
                for p in persistent_params.values()
            ]
            units.append(
                _Unit(len(units), "<persistent>", persistent_modules, slots, persistent=True)
            )
        for unit in units:
            unit.slots.sort(key=lambda slot: slot.index)
        return units

    @staticmethod
    def _slot(name: str, param: nn.Parameter, index: int) -> _Slot:
        return _Slot(name, param, index, tuple(param.shape), param.dtype, 0, param.requires_grad)

    def _assign_dtypes(self) -> None:
        """fp32: parameters are stored and computed in float32. bf16: forward and backward see
        bfloat16 working copies; trainable parameters keep a float32 master next to their AdamW
        state, which only the optimizer reads (DeepSpeed's and Megatron's mixed precision)."""
        mixed = self.compute_dtype != torch.float32
        for unit in self.units:
            for slot in unit.slots:
                if slot.trainable and slot.dtype not in (torch.float32, self.compute_dtype):
                    raise ValueError(
                        f"parameter {slot.name} is {slot.dtype}; the offload engine trains "
                        f"float32 parameters (or {self.compute_dtype} ones with precision "
                        f"{self.precision}): load the model with dtype=float32"
                    )
                floating = slot.dtype.is_floating_point
                slot.compute_dtype = self.compute_dtype if mixed and floating else slot.dtype
                if slot.trainable:
                    slot.dtype = torch.float32  # the master copy (the parameter itself in fp32)
                else:
                    slot.dtype = slot.compute_dtype
            if mixed and unit.trainable:
                unit.num_state_sets = 3

    def _layout_and_budget(self, offload_config, aio_backend: str) -> None:
        for unit in self.units:
            p_bytes = state_bytes = 0
            for slot in unit.slots:
                slot.p_offset = p_bytes
                p_bytes += align_up(slot.compute_bytes, _TENSOR_ALIGNMENT)
                if slot.trainable:
                    slot.state_offset = state_bytes
                    state_bytes += align_up(slot.numel * 4, _TENSOR_ALIGNMENT)
            unit.p_bytes = align_up(p_bytes)
            unit.state_bytes = align_up(state_bytes) if state_bytes else 0
            # A layer whose optimizer state is more than two slices of it is updated in slices.
            slice_bytes = align_up(self.sub_group_size * 4)
            if unit.state_bytes > 2 * slice_bytes:
                unit.slice_bytes = slice_bytes

        limit_heap_retention(_REUSE_MMAP_THRESHOLD)
        self._heap_strict = False
        malloc_trim()
        self.baseline_rss_bytes = rss_bytes()
        largest = max(self.units, key=lambda u: u.working_set_bytes)
        # Counted at 4 bytes per parameter even with bf16 working copies, whose gradients take
        # 2: counting 2 lowered a small bf16 model's smallest budget by 0.08 GiB, and in a fresh
        # installation it then peaked 43 MB over that budget. What else this headroom covers
        # outside the pool has not been measured yet.
        largest_grad_bytes = max((u.state_bytes for u in self.units), default=0)
        self._largest_grad_bytes = largest_grad_bytes
        self.min_pool_bytes = self._smallest_pool_bytes()
        self.workspace_bytes, self.pool_budget_bytes, self.activation_allowance_bytes = (
            budget_split(
                self.max_host_bytes,
                self.baseline_rss_bytes,
                largest_grad_bytes,
                self.min_pool_bytes,
            )
        )
        available = self.max_host_bytes - self.baseline_rss_bytes - self.workspace_bytes
        if available < self.min_pool_bytes:
            sizes = (self.baseline_rss_bytes, largest_grad_bytes, self.min_pool_bytes)
            needed = smallest_budget_bytes(  # the pool's minimum fits: no negative allowance
                lambda budget: budget_split(budget, *sizes)[2] >= 0,
                self.max_host_bytes,
                2 * self.max_host_bytes + 4 * (self.baseline_rss_bytes + self.min_pool_bytes),
            )
            raise ValueError(
                f"offload.max_host_memory_gb={offload_config.max_host_memory_gb} is too small: the process "
                f"already uses {self.baseline_rss_bytes / GIB:.2f} GiB, and one step needs "
                f"{self.min_pool_bytes / GIB:.2f} GiB of host buffers (layer '{largest.name}' "
                f"moves {largest.working_set_bytes / GIB:.3f} GiB of parameters and optimizer state) "
                f"besides a workspace for gradients, activations and kernels; "
                f"set it to at least {math.ceil(needed / GIB * 100) / 100:.2f}"
            )

        if offload_config.device == "nvme":
            root = check_nvme_path(offload_config.nvme_path)
            _remove_abandoned_directories(root)
            self.nvme_directory = os.path.join(
                root, f"stalwart-offload-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            )
            os.makedirs(self.nvme_directory)
            # The directory goes when the engine does, even if close() is never called.
            self._cleanup = weakref.finalize(
                self, shutil.rmtree, self.nvme_directory, ignore_errors=True
            )
        else:
            self.nvme_directory = None
        self.aio = make_aio(
            AioSettings.from_config(getattr(offload_config, "aio", None)),
            backend=aio_backend,
            lockable_bytes=self.pool_budget_bytes,
        )
        self.store = TensorStore(
            self.aio, device=offload_config.device, directory=self.nvme_directory
        )
        for unit in self.units:
            record = unit.p_bytes + unit.mv_bytes
            first = self.store.reserve(record).offset
            second = self.store.reserve(record).offset
            unit.version_offsets = (first, second)
            unit.grad_offset = (
                self.store.reserve(unit.state_bytes).offset if unit.state_bytes else 0
            )
        try:
            self.store.open()
        except ValueError:
            self._remove_directory()
            raise
        self.pool = HostBufferPool(
            self.aio,
            self.pool_budget_bytes,
            pin_memory=bool(getattr(offload_config, "pin_memory", False)),
        )
        self.pool.before_growth = self._before_pool_growth
        self.swapper = (
            ActivationSwapper(self.aio, self.nvme_directory, self.pool)
            if self.nvme_directory
            else None
        )

    def _smallest_pool_bytes(self) -> int:
        """The smallest pool that can run a step: the units resident through it plus two units
        in flight. Until the first step has shown which modules run their own forward, every
        non-block unit stays resident (only blocks are in flight); after it, the modules seen
        running stream like blocks and only the rest stay."""

        def need(resident: list[_Unit], streaming: list[_Unit]) -> int:
            in_flight = max((u.working_set_bytes for u in streaming), default=0)
            return sum(u.working_set_bytes for u in resident) + 2 * in_flight

        first = need(
            [u for u in self.units if u.persistent], [u for u in self.units if not u.persistent]
        )
        later = need(
            [u for u in self.units if u.persistent and not u.provisional],
            [u for u in self.units if u.provisional or not u.persistent],
        )
        return max(first, later)

    @torch.no_grad()
    def _initialise_store(self, init_fn) -> None:
        """Write every unit's parameters (and zero optimizer state) to version 0, then free them."""
        for unit in self.units:
            # A sliced unit's buffer holds the parameters and the master only; its zero moments
            # are written from one zeroed slice.
            held = unit.p_bytes + (unit.state_bytes if unit.has_master else 0)
            buffer = self.pool.acquire(held if unit.slice_bytes else unit.p_bytes + unit.mv_bytes)
            buffer.tensor.zero_()
            for slot in unit.slots:
                working = buffer.view(slot.compute_dtype, slot.p_offset, slot.numel, slot.shape)
                if unit.has_master and slot.trainable:
                    target = self._master_view(unit, buffer, slot, base=unit.p_bytes)
                elif slot.compute_dtype != slot.param.dtype:
                    target = torch.empty(slot.shape, dtype=slot.param.dtype)
                else:
                    target = working
                param = slot.param
                if param.is_meta or param.numel() == 0:
                    if init_fn is None:
                        _default_init(slot.name, target)
                    else:
                        init_fn(slot.name, target)
                else:
                    target.copy_(param.detach())
                if target is not working:
                    working.copy_(target)  # round to the working dtype (nearest even)
            if unit.slice_bytes:
                self.store.write_span(unit.version_offsets[0], held, buffer).result()
                self._write_zero_moments(unit, unit.version_offsets[0] + held)
            else:
                self.store.write_span(
                    unit.version_offsets[0], unit.p_bytes + unit.mv_bytes, buffer
                ).result()
            buffer.release()
            for slot in unit.slots:
                self._detach(slot)
                self.param_steps[slot.name] = 0
        self.pool.shrink()
        malloc_trim()

    def _write_zero_moments(self, unit: _Unit, offset: int) -> None:
        """Zero the store from `offset` to the end of `unit`'s first version, a slice at a time."""
        end = unit.version_offsets[0] + unit.p_bytes + unit.mv_bytes
        zeros = self.pool.acquire(unit.slice_bytes)
        zeros.tensor.zero_()
        writes = [
            self.store.write(Region(begin, min(unit.slice_bytes, end - begin)), zeros)
            for begin in range(offset, end, unit.slice_bytes)
        ]
        for write in writes:
            write.result()
        zeros.release()

    def _detach(self, slot: _Slot) -> None:
        param = slot.param
        if param.is_meta:
            owner_name, _, attr = slot.name.rpartition(".")
            owner = self.model.get_submodule(owner_name) if owner_name else self.model
            replacement = nn.Parameter(
                _placeholder(slot.compute_dtype, self.compute_device), requires_grad=slot.trainable
            )
            setattr(owner, attr, replacement)
            slot.param = replacement
            for unit in self.units:
                for other in unit.slots:
                    if other.param is param:
                        other.param = replacement
            return
        param.data = _placeholder(slot.compute_dtype, self.compute_device)
        param.grad = None

    def _install_hooks(self) -> None:
        for unit in self.units:
            if unit.persistent and not unit.provisional:
                continue  # shared parameters: resident through every step
            # A provisional unit is resident through the first step; its hooks record whether
            # its module's own forward ran (`seen_in_forward`) and stream it from then on.
            module = unit.modules[0]
            if unit.is_block:
                module.forward = self._block_forward(unit, module.forward)
            else:
                module.register_forward_pre_hook(lambda _m, _a, u=unit: self._enter(u))
                module.register_forward_hook(lambda _m, _a, out, u=unit: self._exit(u, out))
        for unit in self.units:
            for slot in unit.trainable:
                slot.param.register_post_accumulate_grad_hook(
                    lambda _p, u=unit: self._grad_ready(u)
                )

    # ------------------------------------------------------------------------------------------
    # residency

    def _start_read(self, unit: _Unit, *, blocking: bool) -> bool:
        if unit.pending_update is not None:
            return self._start_update(unit, blocking=blocking)
        if unit.p_buffer is not None:
            return True
        if blocking:
            buffer = self.pool.acquire(unit.p_bytes)
        else:
            buffer = self.pool.try_acquire(unit.p_bytes, reserve_bytes=self._reserve_bytes())
            if buffer is None:
                return False
        unit.p_buffer = buffer
        unit.p_future = self.store.read_span(
            unit.version_offsets[unit.version], unit.p_bytes, buffer
        )
        return True

    def _reserve_bytes(self) -> int:
        return max(u.working_set_bytes for u in self.units)

    def _make_resident(self, unit: _Unit) -> None:
        self._start_read(unit, blocking=True)
        if unit.update_job is not None:
            self._finish_update(unit)
        if unit.p_future is not None:
            start = time.perf_counter()
            unit.p_future.result()
            self._stats["wait_s"] += time.perf_counter() - start
            unit.p_future = None
        if not unit.attached:
            unit.attached = True
            tensors = self.transfers.attach(unit.index, self._host_views(unit))
            for slot, tensor in zip(unit.slots, tensors):
                slot.param.data = tensor

    @staticmethod
    def _host_views(unit: _Unit) -> list[torch.Tensor]:
        return [
            unit.p_buffer.view(slot.compute_dtype, slot.p_offset, slot.numel, slot.shape)
            for slot in unit.slots
        ]

    def _stage_ready(self, unit: _Unit) -> None:
        """On a GPU, start copying `unit`'s parameters to the device if its host buffer is
        final: read from NVMe and no update pending on it."""
        if (
            not self.transfers.copies
            or unit.attached
            or unit.p_buffer is None
            or unit.update_job is not None
            or unit.pending_update is not None
            or self.transfers.staged(unit.index)
        ):
            return
        if unit.p_future is not None:
            if not unit.p_future.done():
                return
            unit.p_future.result()
            unit.p_future = None
        if self.transfers.stage(unit.index, self._host_views(unit)):
            self._stats["staged_ahead"] = self._stats.get("staged_ahead", 0) + 1

    def _unattach(self, unit: _Unit) -> None:
        """The unit's parameters stop pointing at its buffer's contents; on a GPU, wait until
        the buffer's copy to the device has run, so that the buffer may change or be reused."""
        unit.attached = False
        for slot in unit.slots:
            slot.param.data = _placeholder(slot.compute_dtype, self.compute_device)
        self.transfers.drop(unit.index)

    def _release(self, unit: _Unit) -> None:
        self._unattach(unit)
        if unit.update_job is not None:
            self._finish_update(unit)  # started ahead of a use that never came: still applied
        if unit.p_buffer is not None:
            if unit.p_future is not None:
                unit.p_future.result()
                unit.p_future = None
            if unit.p_write is not None:
                _release_after(unit.p_buffer, [unit.p_write])
                unit.p_write = None
            else:
                unit.p_buffer.release()
            unit.p_buffer = None

    def _start_state_read(self, unit: _Unit) -> None:
        if unit.mv_bytes and unit.mv_buffer is None and not unit.slice_bytes:
            unit.mv_buffer = self.pool.acquire(unit.mv_bytes)
            offset = unit.version_offsets[unit.version] + unit.p_bytes
            unit.mv_future = self.store.read_span(offset, unit.mv_bytes, unit.mv_buffer)

    def _start_grad_read(self, unit: _Unit) -> None:
        if unit.state_bytes and unit.g_buffer is None and not self._first_microbatch:
            if unit.g_write is not None:
                unit.g_write.result()  # reads and writes run on different threads
            unit.g_buffer = self.pool.acquire(unit.state_bytes)
            unit.g_future = self.store.read_span(unit.grad_offset, unit.state_bytes, unit.g_buffer)

    # ------------------------------------------------------------------------------------------
    # the optimizer step of a clipped or deferred step, applied where the next forward needs it

    def _queue_updates(self, clip_coef: torch.Tensor | None) -> None:
        """This step's updates (from the committed state and the stored gradients, clipped by
        `clip_coef` if given) wait until each unit's parameters are next needed.

        The next forward then streams each unit's optimizer state in ahead of use (as it would
        stream the parameters), the optimizer thread updates it while the forward of the unit
        before runs, and the new working parameters go straight into the forward: the sweep's
        I/O overlaps the next forward's compute, and the parameters are not read back. Anything
        that reads or replaces the committed state first calls `settle()`."""
        for unit in self.units:
            if unit.updated_slots:
                unit.pending_update = (list(unit.updated_slots), clip_coef, self._lr)
            unit.written = False
            unit.updated_slots = []

    def _start_update(self, unit: _Unit, *, blocking: bool) -> bool:
        """Read `unit`'s committed state and stored gradients and hand its pending update to
        the optimizer thread; the buffers come from the pool like a prefetch's."""
        if unit.update_job is not None:
            return True
        self.transfers.drop(unit.index)  # a copy of the old parameters is stale from here
        sizes = (unit.p_bytes, unit.update_buffer_bytes, unit.state_bytes)
        if blocking:
            buffers = [self.pool.acquire(size) for size in sizes]
        else:
            buffers = []
            for size in sizes:
                buffer = self.pool.try_acquire(size, reserve_bytes=self._reserve_bytes())
                if buffer is None:
                    for taken in buffers:
                        taken.release()
                    return False
                buffers.append(buffer)
        p_buffer, mv_buffer, g_buffer = buffers
        slots, clip_coef, lr = unit.pending_update
        base = unit.version_offsets[unit.version]
        target = unit.version_offsets[1 - unit.version]
        g_bytes = align_up(unit.state_bytes // 2) if unit.grad_half else unit.state_bytes
        reads = [self.store.read_span(unit.grad_offset, g_bytes, g_buffer)]
        if not unit.slice_bytes:
            reads.append(self.store.read_span(base + unit.p_bytes, unit.mv_bytes, mv_buffer))
        # With a master the update rewrites the working copies from it: no need to read them
        # unless some of the unit's parameters are not updated this step.
        if not unit.has_master or len(slots) < len(unit.slots):
            reads.append(self.store.read_span(base, unit.p_bytes, p_buffer))
        grad_half = unit.grad_half

        @torch.no_grad()
        def job():
            for read in reads:
                read.result()
            if grad_half:
                self._unpack_gradients(unit, g_buffer)
            grads = [g_buffer.view(torch.float32, s.state_offset, s.numel, s.shape) for s in slots]
            if clip_coef is not None:
                torch._foreach_mul_(grads, clip_coef)
            if unit.slice_bytes:
                self._sliced_update(unit, slots, grads, p_buffer, mv_buffer, base, target, lr)
                write_mv = completed_future()
                mv_buffer.release()
            else:
                self._update(unit, slots, grads, p_buffer, mv_buffer, lr)
            del grads
            g_buffer.release()
            write_p = self.store.write_span(target, unit.p_bytes, p_buffer)
            if not unit.slice_bytes:
                write_mv = self.store.write_span(target + unit.p_bytes, unit.mv_bytes, mv_buffer)
                write_mv.add_done_callback(lambda _f: mv_buffer.release())
            return write_p, write_mv

        unit.p_buffer, unit.p_future = p_buffer, None
        unit.update_job = self._optimizer_thread.submit(job)
        return True

    def _finish_update(self, unit: _Unit) -> None:
        """Wait for `unit`'s update; its new version is committed and p_buffer holds the new
        working parameters (released once their write to NVMe is done)."""
        started = time.perf_counter()
        job, unit.update_job = unit.update_job, None
        write_p, write_mv = job.result()
        self._stats["sweep_s"] = self._stats.get("sweep_s", 0.0) + time.perf_counter() - started
        self._writes.extend([write_p, write_mv])
        unit.p_write = write_p
        slots = unit.pending_update[0]
        unit.pending_update = None
        unit.version = 1 - unit.version
        for slot in slots:
            self.param_steps[slot.name] += 1

    def settle(self) -> None:
        """Apply every pending update (see `_queue_updates`) and wait for its writes: after
        this the committed state on NVMe is the whole last step's. Readers of the state call it."""
        pending = [unit for unit in self.units if unit.pending_update is not None]
        for position, unit in enumerate(pending):
            self._start_update(unit, blocking=True)
            if position + 1 < len(pending):
                self._start_update(pending[position + 1], blocking=False)
            self._release(unit)  # finishes the update first
        if pending:
            for future in self._writes:
                future.result()
            self._writes = []

    def _prefetch(self, order: Sequence[_Unit], after: _Unit) -> None:
        if self.prefetch_depth <= 0 or after not in order:
            return
        position = order.index(after)
        for unit in order[position + 1 : position + 1 + self.prefetch_depth]:
            if unit.persistent:
                continue
            if not self._start_read(unit, blocking=False):
                break
            self._stage_ready(unit)

    # ------------------------------------------------------------------------------------------
    # hooks

    def _enter(self, unit: _Unit) -> None:
        if self._bypass_head and unit is self._head_unit:
            return  # the head runs later, in chunks, inside the loss (_chunked_loss)
        unit.seen_in_forward = True
        if self._phase == "backward" or unit.persistent:
            return  # a non-checkpointed unit re-entered by recomputation of its parent
        if not self._traced and unit not in self._trace:
            self._trace.append(unit)
        self._make_resident(unit)
        self._prefetch(self._trace, unit)

    def _exit(self, unit: _Unit, output) -> None:
        if self._phase == "backward" or unit.persistent:
            return
        if self._bypass_head and unit is self._head_unit:
            return
        self._release(unit)
        if self._phase == "forward" and torch.is_grad_enabled():
            tensors = (
                [output]
                if isinstance(output, torch.Tensor)
                else [t for t in _flatten(output) if isinstance(t, torch.Tensor)]
            )
            hooked = False
            for tensor in tensors:
                if tensor.requires_grad:
                    tensor.register_hook(lambda _grad, u=unit: self._before_backward(u))
                    hooked = True
                    break
            if not hooked and unit.trainable:
                logger.debug("unit %s produced no differentiable output", unit.name)

    def _before_backward(self, unit: _Unit) -> None:
        self._phase = "backward"
        self._make_resident(unit)
        if unit.trainable:
            if self._last_microbatch and not self._defer:
                self._start_state_read(unit)
            self._start_grad_read(unit)
        unit.pending = len(unit.trainable)
        self._prefetch(self._backward_order, unit)

    def _block_forward(self, unit: _Unit, original_forward: Callable) -> Callable:
        engine = self
        dummy = torch.empty(0, requires_grad=True)

        def forward(hidden, *args, **kwargs):
            engine._enter(unit)
            try:
                if (
                    engine._phase == "forward"
                    and torch.is_grad_enabled()
                    and can_checkpoint(hidden, args, kwargs)
                ):
                    call = CheckpointedCall(
                        original_forward,
                        args,
                        kwargs,
                        make_stash=lambda tensor: engine._stash(unit, tensor),
                        before_recompute=lambda: engine._before_backward(unit),
                        after_backward=lambda: engine._after_block_backward(unit),
                    )
                    started = time.perf_counter()
                    output = BlockCheckpoint.apply(call, hidden, dummy)
                    if engine.plan is None and engine._auto_plan and hidden.dim() > 1:
                        # The profiling step: how fast this model's blocks really compute.
                        tokens = hidden.numel() // hidden.shape[-1]
                        engine._block_times.append(
                            (unit, tokens, time.perf_counter() - started, call)
                        )
                    if call.extras is not None:
                        output = (output, *call.extras)
                    engine._exit_block(unit)
                    return output
                output = original_forward(hidden, *args, **kwargs)
            except BaseException:
                engine._release(unit)
                raise
            engine._exit(unit, output)
            return output

        return forward

    # ------------------------------------------------------------------------------------------
    # the LM head and the loss, in chunks (loss.py)

    def _find_head(self):
        """The output projection a `TokenCrossEntropy` loss can run in chunks: the model's
        `get_output_embeddings()` when it is an `nn.Linear` the model calls as a module."""
        if not isinstance(self.loss_fn, TokenCrossEntropy):
            return None, None, None
        getter = getattr(self.model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        if not isinstance(head, nn.Linear):
            return None, None, None
        unit = next((u for u in self.units for slot in u.slots if slot.param is head.weight), None)
        if unit is None:
            return None, None, None
        transform = _logit_transform(self.model)
        if transform:
            logger.info("the LM head and loss run whole: the model %s", transform)
            return None, None, None
        original = head.forward
        engine = self

        def forward(hidden):
            # While the engine chunks the loss, the model's forward returns the final hidden
            # states in place of the logits.
            if not engine._bypass_head:
                return original(hidden)
            engine._bypassed = hidden
            return hidden

        head.forward = forward
        return head, unit, original

    def loss_chunk_tokens(self, num_tokens: int) -> int | None:
        """Rows of logits per chunk for a micro-batch of `num_tokens`, None when unchunked."""
        if self._head is None:
            return None
        requested = self.loss_fn.chunk_tokens
        if requested == 0:
            return None
        if requested:
            return min(requested, max(num_tokens, 1))
        # A logit costs about 16 bytes at once: its value in the head's dtype, the loss's
        # float32 copy, the softmax and its gradient.
        per_token = 16 * self._head.out_features
        limit = self.activation_allowance_bytes // 4
        if num_tokens * per_token <= limit:
            return None
        return max(16, limit // per_token)

    def _head_loss(self, hidden: torch.Tensor, targets, chunk_tokens: int) -> torch.Tensor:
        return chunked_head_loss(
            hidden,
            targets,
            self._head,
            self._head_forward,
            chunk_tokens,
            self.loss_fn.ignore_index,
        )

    def _chunked_loss(self, outputs, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
        hidden = self._take_bypassed(outputs)
        unit = self._head_unit
        self._enter(unit)
        try:
            loss = self._head_loss(hidden, targets, chunk_tokens)
        except BaseException:
            self._release(unit)
            raise
        self._exit(unit, loss)
        return loss

    def _take_bypassed(self, outputs) -> torch.Tensor:
        """The hidden states the head was bypassed with, checked against what the model
        returned in place of its logits."""
        returned = outputs.logits if hasattr(outputs, "logits") else outputs
        if isinstance(returned, (tuple, list)):
            returned = returned[0]
        hidden, self._bypassed = self._bypassed, None
        if hidden is None:
            raise RuntimeError(
                f"{type(self.model).__name__}.forward did not call its LM head "
                f"({type(self._head).__name__}) as a module; the loss cannot run in chunks: "
                "pass loss_fn=TokenCrossEntropy(chunk_tokens=0)"
            )
        if returned is not hidden and not _is_upcast_of(returned, hidden):
            # The model changed its logits after the head (soft-capping, scaling) in a way the
            # chunks would not reproduce. Nothing has been updated yet in this step.
            raise RuntimeError(
                f"{type(self.model).__name__} transforms the output of its LM head before "
                "returning the logits; the loss cannot run in chunks: pass "
                "loss_fn=TokenCrossEntropy(chunk_tokens=0)"
            )
        return hidden

    def _exit_block(self, unit: _Unit) -> None:
        self._release(unit)
        self._bound_heap()

    def _bound_heap(self) -> None:
        """Keep what the allocator holds inside the host budget, checked at block boundaries.

        Freed activations stay in the heap, and the next block reuses them without page faults
        (`limit_heap_retention`): 20-30% of a step's CPU time on a 2-core host at 2048 tokens
        per micro-batch. That is allowed while the process's RSS, one more block's
        recomputation and `_HEAP_MARGIN_BYTES` fit the budget, and the pool makes room the same
        way before it maps a new buffer (`_before_pool_growth`). When they do not, the heap's
        free pages go back to the OS and allocations above 256 KiB are mapped and unmapped one
        by one (no reuse, no fragmentation) until there is room again by another margin."""
        projected = rss_bytes() + self._room_checked_bytes + _HEAP_MARGIN_BYTES
        if projected > self.max_host_bytes:
            self._trim_heap()
        elif self._heap_strict and projected + _HEAP_MARGIN_BYTES <= self.max_host_bytes:
            limit_heap_retention(_REUSE_MMAP_THRESHOLD)
            self._heap_strict = False

    def _before_pool_growth(self, num_bytes: int) -> None:
        if rss_bytes() + num_bytes + _HEAP_MARGIN_BYTES > self.max_host_bytes:
            self._trim_heap()

    def _trim_heap(self) -> None:
        malloc_trim()
        self._stats["heap_trims"] = self._stats.get("heap_trims", 0) + 1
        if not self._heap_strict:
            limit_heap_retention(_STRICT_MMAP_THRESHOLD)
            self._heap_strict = True

    def _stash(self, unit: _Unit, tensor: torch.Tensor) -> StashedCheckpoint:
        num_bytes = tensor.numel() * tensor.element_size()
        target = self.activation_targets.get(unit.index)
        if target is None:
            target = self.default_activation_target
            if target == "keep" and self._forced_activation_target is None:
                # No plan yet (the profiling step): keep checkpoints while half the activation
                # allowance lasts, as the plan will, and swap the rest, so that a long sequence
                # does not break the budget before the planner has seen it.
                kept = sum(
                    stash.num_bytes
                    for stash in self._checkpoint_calls.values()
                    if stash.target == "keep"
                )
                if kept + num_bytes > self.activation_allowance_bytes // 2:
                    target = "nvme"
        if target == "nvme" and self.swapper is None:
            target = "keep"
        if target == "nvme":
            num_blocks = sum(1 for u in self.units if u.is_block)
            self.swapper.ensure(num_blocks, num_bytes)
        self._checkpoint_bytes[unit.index] = num_bytes
        if tensor.dim() and unit.has_attention:
            self._block_width[unit.index] = int(tensor.shape[-1])
        stash = StashedCheckpoint(tensor, target, unit.index, self.swapper)
        self._checkpoint_calls[unit.index] = stash
        return stash

    def _after_block_backward(self, unit: _Unit) -> None:
        if not unit.trainable and unit.p_buffer is not None:
            self._release(unit)
        self._bound_heap()
        # Bring the checkpoint of the next block in backward order in from NVMe ahead of use.
        order = self._backward_order
        if unit in order:
            position = order.index(unit)
            for following in order[position + 1 :]:
                stash = self._checkpoint_calls.get(following.index)
                if stash is not None:
                    stash.prefetch()
                    break

    def _grad_ready(self, unit: _Unit) -> None:
        if unit.persistent:
            return
        unit.pending -= 1
        if unit.pending == 0:
            self._unit_backward_done(unit)

    def _unit_backward_done(self, unit: _Unit) -> None:
        """All of `unit`'s gradients are final for this micro-batch: move them off the device."""
        device_grads: list[torch.Tensor | None] = []
        for slot in unit.trainable:
            grad = slot.param.grad
            slot.param.grad = None
            device_grads.append(None if grad is None else grad.detach())
        self._make_resident(unit)  # the persistent unit and stragglers may have been released
        if (
            self.transfers.copies
            and self._last_microbatch
            and unit.state_bytes
            and (self._first_microbatch or unit.g_buffer is None)
        ):
            self._gradients_off_device(unit, device_grads)
            return
        grads = [None if grad is None else grad.to("cpu") for grad in device_grads]
        del device_grads
        if not self._last_microbatch:
            self._accumulate(unit, grads)
            self._release(unit)
            return
        # The final gradients go into a pool buffer (counted against the budget) and, when
        # clipping is on, to the unit's gradient span, so that a clipped step can be redone by
        # the optimizer alone (see optimizer.py).
        if not self._first_microbatch and unit.g_buffer is not None:
            unit.g_future.result()
            g_buffer = unit.g_buffer
            for slot, grad in zip(unit.trainable, grads):
                if grad is not None:
                    g_buffer.view(torch.float32, slot.state_offset, slot.numel, slot.shape).add_(
                        grad
                    )
        elif unit.state_bytes:
            g_buffer = self.pool.acquire(unit.state_bytes)
            for slot, grad in zip(unit.trainable, grads):
                if grad is not None:
                    g_buffer.view(torch.float32, slot.state_offset, slot.numel, slot.shape).copy_(
                        grad
                    )
        else:
            g_buffer = None
        unit.g_buffer, unit.g_future = g_buffer, None
        updated = [
            (slot, g_buffer.view(torch.float32, slot.state_offset, slot.numel, slot.shape))
            for slot, grad in zip(unit.trainable, grads)
            if grad is not None
        ]
        del grads
        for (slot, _), norm in zip(updated, parameter_norms([g for _, g in updated])):
            self._norms[slot.index] = norm
        if self._defer:
            self._store_gradients_only(unit, [slot for slot, _ in updated])
            return
        self._hand_to_optimizer(unit, updated)

    def _gradients_off_device(self, unit: _Unit, device_grads: list[torch.Tensor | None]) -> None:
        """The last micro-batch's gradients, computed on a GPU, go straight into the unit's
        pool buffer on the gradient copy stream (`device.StagedCopies`); the optimizer thread
        waits for the copy, the backward of the layers below does not. Their norms are taken
        on the device, of the float32 values the buffer receives."""
        g_buffer = self.pool.acquire(unit.state_bytes)
        present = [(s, g) for s, g in zip(unit.trainable, device_grads) if g is not None]
        updated = [
            (slot, g_buffer.view(torch.float32, slot.state_offset, slot.numel, slot.shape))
            for slot, _ in present
        ]
        for slot, grad in present:
            self._norms[slot.index] = parameter_norms([grad.float()])[0]
        ready = self.transfers.gradients_to_host(
            [grad for _, grad in present], [target for _, target in updated]
        )
        del present, device_grads
        unit.g_buffer, unit.g_future = g_buffer, None
        if self._defer:
            self.transfers.wait(ready)
            self._store_gradients_only(unit, [slot for slot, _ in updated])
            return
        self._hand_to_optimizer(unit, updated, ready=ready)

    def _store_gradients_only(self, unit: _Unit, slots: list[_Slot]) -> None:
        """Deferred mode: the gradients go to NVMe; the update waits for the next forward."""
        g_buffer = unit.g_buffer
        unit.g_buffer = None
        self._release_all(unit)
        if not slots:
            if g_buffer is not None:
                g_buffer.release()
            return
        num_bytes = unit.state_bytes
        unit.grad_half = self.compute_dtype != torch.float32 and self._num_microbatches == 1
        if unit.grad_half:
            num_bytes = self._pack_gradients(unit, g_buffer)
        write_g = self.store.write_span(unit.grad_offset, num_bytes, g_buffer)
        self._writes.append(write_g)
        _release_after(g_buffer, [write_g])
        unit.updated_slots = slots
        unit.written = True

    def _pack_gradients(self, unit: _Unit, g_buffer) -> int:
        """Store bf16 gradients in 2 bytes: with one micro-batch they are exactly the bf16 values
        autograd produced, so the fp32 span holds nothing more. Packed in place into the first
        half of the buffer, in offset order (no slot's target overlaps a later slot's source);
        returns the bytes to write."""
        for slot in sorted(unit.trainable, key=lambda s: s.state_offset):
            source = g_buffer.view(torch.float32, slot.state_offset, slot.numel, slot.shape)
            packed = source.to(self.compute_dtype)
            g_buffer.view(self.compute_dtype, slot.state_offset // 2, slot.numel, slot.shape).copy_(
                packed
            )
        return align_up(unit.state_bytes // 2)

    def _unpack_gradients(self, unit: _Unit, g_buffer) -> None:
        """Undo `_pack_gradients` in place, in reverse offset order (exact: bf16 -> fp32)."""
        for slot in sorted(unit.trainable, key=lambda s: s.state_offset, reverse=True):
            packed = g_buffer.view(
                self.compute_dtype, slot.state_offset // 2, slot.numel, slot.shape
            )
            widened = packed.to(torch.float32)
            g_buffer.view(torch.float32, slot.state_offset, slot.numel, slot.shape).copy_(widened)

    def _accumulate(self, unit: _Unit, grads: list[torch.Tensor | None]) -> None:
        if not unit.state_bytes:
            return
        if self._first_microbatch:
            buffer = self.pool.acquire(unit.state_bytes)
            buffer.tensor.zero_()
        else:
            buffer = unit.g_buffer
            unit.g_future.result()
            unit.g_buffer = None
        for slot, grad in zip(unit.trainable, grads):
            if grad is None:
                continue
            total = buffer.view(torch.float32, slot.state_offset, slot.numel, slot.shape)
            if self._first_microbatch:
                total.copy_(grad)
            else:
                total.add_(grad)
        future = self.store.write_span(unit.grad_offset, unit.state_bytes, buffer)
        future.add_done_callback(lambda _f, b=buffer: b.release())
        self._writes.append(future)
        unit.g_write = future

    def _hand_to_optimizer(
        self, unit: _Unit, updated: list[tuple[_Slot, torch.Tensor]], ready=None
    ) -> None:
        """Update `unit` on the optimizer thread from its gradients in `unit.g_buffer` (`ready`:
        the event of their copy from the device, waited for there)."""
        p_buffer, mv_buffer, mv_future = unit.p_buffer, unit.mv_buffer, unit.mv_future
        g_buffer = unit.g_buffer
        self._unattach(unit)  # before the optimizer thread rewrites p_buffer
        unit.p_buffer = unit.mv_buffer = unit.mv_future = unit.g_buffer = unit.g_future = None
        if not updated:
            for buffer in (p_buffer, mv_buffer, g_buffer):
                if buffer is not None:
                    buffer.release()
            return
        lr = self._lr
        source = unit.version_offsets[unit.version]
        target = unit.version_offsets[1 - unit.version]
        if unit.slice_bytes:
            mv_buffer = self.pool.acquire(unit.update_buffer_bytes)
        self._job_slots.acquire()

        clipping = self.settings.grad_clip > 0
        if clipping:
            unit.grad_half = False

        def job():
            write_g = None
            try:
                self.transfers.wait(ready)
                # With clipping on the gradients also go to the unit's span, so that a clipped
                # step can be redone by the optimizer alone.
                write_g = (
                    self.store.write_span(unit.grad_offset, unit.state_bytes, g_buffer)
                    if clipping
                    else None
                )
                if mv_future is not None:
                    mv_future.result()
                grads = [grad for _, grad in updated]
                slots = [slot for slot, _ in updated]
                if unit.slice_bytes:
                    self._sliced_update(unit, slots, grads, p_buffer, mv_buffer, source, target, lr)
                    mv_buffer.release()
                    writes = []
                else:
                    self._update(unit, slots, grads, p_buffer, mv_buffer, lr)
                    write_mv = self.store.write_span(
                        target + unit.p_bytes, unit.mv_bytes, mv_buffer
                    )
                    write_mv.add_done_callback(lambda _f: mv_buffer.release())
                    writes = [write_mv]
                del grads
                write_p = self.store.write_span(target, unit.p_bytes, p_buffer)
                write_p.add_done_callback(lambda _f: p_buffer.release())
                unit.updated_slots = slots
                if write_g is not None:
                    writes.append(write_g)
                return [write_p, *writes]
            finally:
                self._job_slots.release()
                # The gradients' buffer outlives the update and the write of the span.
                if write_g is not None:
                    _release_after(g_buffer, [write_g])
                elif g_buffer is not None:
                    g_buffer.release()

        unit.written = True
        job_future = self._optimizer_thread.submit(job)
        self._jobs.append(job_future)

    @staticmethod
    def _master_view(unit: _Unit, buffer, slot: _Slot, base: int = 0) -> torch.Tensor:
        offset = base + unit.state_set_offset("master") + slot.state_offset
        return buffer.view(torch.float32, offset, slot.numel, slot.shape)

    def _update(self, unit: _Unit, slots: list[_Slot], grads, p_buffer, mv_buffer, lr) -> None:
        """AdamW on one unit's host buffers; with a master, refresh the working copies from it."""
        started = time.perf_counter()

        def state(kind: str) -> list[torch.Tensor]:
            offset = unit.state_set_offset(kind)
            return [
                mv_buffer.view(torch.float32, offset + s.state_offset, s.numel, s.shape)
                for s in slots
            ]

        if unit.has_master:
            params = state("master")
        else:
            params = [p_buffer.view(s.dtype, s.p_offset, s.numel, s.shape) for s in slots]
        self.optimizer.update(
            params,
            grads,
            state("exp_avg"),
            state("exp_avg_sq"),
            [self.param_steps[s.name] + 1 for s in slots],
            lr,
        )
        if unit.has_master:
            working = [p_buffer.view(s.compute_dtype, s.p_offset, s.numel, s.shape) for s in slots]
            for target, master in zip(working, params):
                target.copy_(master)  # round to nearest even, as master.to(dtype)
        self._stats["optimizer_s"] += time.perf_counter() - started

    def _sliced_update(
        self, unit: _Unit, slots: list[_Slot], grads, p_buffer, buffer, source: int, target: int, lr
    ) -> None:
        """AdamW on a unit too large to hold its optimizer state whole (`offload.sub_group_size`).

        The state sets ([master |] exp_avg | exp_avg_sq, laid out alike) go through `buffer`
        `unit.slice_bytes` of each set at a time, from version `source` to version `target` of
        the store: slice i+1 is read while slice i is updated, and a half of the buffer is
        refilled once its writes are done. Each slot is updated piece by piece, with the whole
        tensor's step and weight decay. Slice edges are 4 KiB apart and slots start 64 B apart,
        so every piece starts 16 elements apart from its slot's start, the same SIMD lanes as a
        whole update: the result is bit-identical to `_update` (tested). Returns when every
        write is done."""
        sets, step, total = unit.num_state_sets, unit.slice_bytes, unit.state_bytes
        half = sets * step
        kinds = ("master", "exp_avg", "exp_avg_sq")[3 - sets :]
        begins = list(range(0, total, step))

        def transfer(begin: int, side: int, base: int, write: bool) -> list[Future]:
            size = min(step, total - begin)
            move = self.store.write if write else self.store.read
            return [
                move(
                    Region(base + unit.p_bytes + k * unit.state_bytes + begin, size),
                    buffer,
                    side * half + k * step,
                )
                for k in range(sets)
            ]

        reads = transfer(0, 0, source, write=False)
        writes: list[list[Future]] = [[], []]
        compute_s = 0.0
        for index, begin in enumerate(begins):
            side = index % 2
            for future in reads:
                future.result()
            reads = []
            if index + 1 < len(begins):
                for future in writes[1 - side]:
                    future.result()
                reads = transfer(begins[index + 1], 1 - side, source, write=False)
            started = time.perf_counter()
            low, high = begin // 4, (begin + min(step, total - begin)) // 4
            params, pieces, exp_avgs, exp_avg_sqs, steps, decay, working = ([] for _ in range(7))
            for slot, grad in zip(slots, grads):
                first = slot.state_offset // 4
                a, b = max(low, first), min(high, first + slot.numel)
                if a >= b:
                    continue
                piece = {
                    kind: buffer.view(
                        torch.float32, side * half + k * step + (a - low) * 4, b - a, (b - a,)
                    )
                    for k, kind in enumerate(kinds)
                }
                pieces.append(grad.reshape(-1)[a - first : b - first])
                exp_avgs.append(piece["exp_avg"])
                exp_avg_sqs.append(piece["exp_avg_sq"])
                steps.append(self.param_steps[slot.name] + 1)
                decay.append(decays(slot.shape))
                if unit.has_master:
                    params.append(piece["master"])
                    flat = p_buffer.view(slot.compute_dtype, slot.p_offset, slot.numel, (-1,))
                    working.append(flat[a - first : b - first])
                else:
                    flat = p_buffer.view(slot.dtype, slot.p_offset, slot.numel, (-1,))
                    params.append(flat[a - first : b - first])
            if params:
                self.optimizer.update(params, pieces, exp_avgs, exp_avg_sqs, steps, lr, decay)
                for copy, master in zip(working, params):
                    copy.copy_(master)  # round to nearest even, as master.to(dtype)
            compute_s += time.perf_counter() - started
            writes[side] = transfer(begin, side, target, write=True)
        for future in writes[0] + writes[1]:
            future.result()
        self._stats["optimizer_s"] += compute_s

    # ------------------------------------------------------------------------------------------
    # the step

    @property
    def _backward_order(self) -> list[_Unit]:
        return list(reversed(self._trace))

    def train_step(
        self,
        micro_batches: Sequence[tuple],
        lr: float | None = None,
        *,
        on_phase: Callable[[str], None] | None = None,
    ) -> dict:
        """Forward, backward and AdamW over `micro_batches` (gradients averaged); see module doc.

        `lr` defaults to `param_groups[0]["lr"]`, which an LR schedule written for torch
        optimizers sets. `on_phase("backward")` runs before the last micro-batch's backward and
        `on_phase("optimizer")` once the global norm is known, before the step commits."""
        if not micro_batches:
            raise ValueError("train_step needs at least one (inputs, targets) micro-batch")
        if lr is None:
            lr = self.param_groups[0]["lr"]
        self._on_phase = on_phase or (lambda _phase: None)
        start = time.perf_counter()
        measured_peak = reset_peak_rss()
        read_before, written_before = self.store.bytes_read, self.store.bytes_written
        self._stats = dict.fromkeys(
            ("wait_s", "forward_s", "backward_s", "optimizer_s", "sweep_s", "drain_s"), 0.0
        )
        self._stats["heap_trims"] = 0
        self._stats["staged_ahead"] = 0
        self._lr = float(lr)
        self.check_activation_room(
            max(_num_tokens(inputs) for inputs, _ in micro_batches),
            max(_sequence_length(inputs) for inputs, _ in micro_batches),
        )
        deferred = self._defer = self.settings.grad_clip > 0 and self._last_decision == "clip"
        loss, norm = self._run_pass(micro_batches)
        self._on_phase("optimizer")
        decision = step_decision(norm, self.settings.grad_clip)
        redone = False
        if decision == "clip":
            self._queue_updates(clip_coefficient(norm, self.settings.grad_clip))
            redone = not deferred
        elif decision == "commit" and deferred:
            self._queue_updates(None)
        self._last_decision = decision
        self._defer = False
        if decision == "skip":
            self._discard_speculative()
        else:
            self._commit()
        malloc_trim()
        metrics = {
            "loss": loss,
            "grad_norm": float(norm),
            "skipped": decision == "skip",
            "clipped": decision == "clip",
            "redone": redone,
            "deferred": deferred,
            "bytes_read": self.store.bytes_read - read_before,
            "bytes_written": self.store.bytes_written - written_before,
            "io_wait_s": self._stats["wait_s"],
            # Where the step's time went (wall seconds on the training thread, except
            # optimizer_s: AdamW kernel time on the optimizer thread, overlapped with backward).
            "forward_s": self._stats["forward_s"],
            "backward_s": self._stats["backward_s"],
            "drain_s": self._stats["drain_s"],
            "sweep_s": self._stats["sweep_s"],
            "optimizer_s": self._stats["optimizer_s"],
            "step_time_s": time.perf_counter() - start,
            "pool_peak_bytes": self.pool.peak_bytes,
            # Block boundaries at which the heap's free pages were handed back (_bound_heap).
            "heap_trims": self._stats["heap_trims"],
            # Units whose parameters were copied to the device before their use (GPU only).
            "staged_ahead": self._stats["staged_ahead"],
            "loss_chunk_tokens": self._stats.get("loss_chunk_tokens"),
            "peak_rss_bytes": peak_rss_bytes() if measured_peak else None,
        }
        self._enforce_budget(metrics["peak_rss_bytes"])
        if self.plan is not None:
            metrics["predicted_step_s"] = self.plan.predicted_step_s
            metrics["lower_bound_s"] = self.plan.lower_bound_s
            logger.info(step_vs_plan(self.plan, metrics["step_time_s"]))
        elif self._auto_plan:
            tokens = sum(_num_tokens(inputs) for inputs, _ in micro_batches)
            self.make_plan(tokens_per_step=tokens, num_microbatches=len(micro_batches))
        if self.swapper is not None:
            metrics["activation_bytes_swapped"] = self.swapper.bytes_written
        self.last_metrics = metrics
        return metrics

    def unit_costs(self) -> list[UnitCost]:
        return [
            UnitCost(
                index=unit.index,
                name=unit.name,
                num_params=sum(slot.numel for slot in unit.slots),
                param_bytes=unit.p_bytes,
                state_bytes=unit.state_bytes,
                is_block=unit.is_block,
                checkpoint_bytes=self._checkpoint_bytes.get(unit.index, 0),
                attention_width=self._block_width.get(unit.index, 0),
                num_state_sets=unit.num_state_sets,
            )
            for unit in self.units
        ]

    def make_plan(self, *, tokens_per_step: int, num_microbatches: int = 1) -> OffloadPlan:
        """Measure the machine (once per process and drive) and choose depth and swaps."""
        self.pool.shrink()
        key = (
            self.compute_device.type,
            self.compute_dtype,
            self.config.device,
            self.aio.name,
            os.path.dirname(self.nvme_directory or ""),
        )
        if key not in _MACHINES:
            _MACHINES[key] = measure_machine(
                self.aio if self.nvme_directory else None,
                self.nvme_directory,
                self.compute_device,
                self.compute_dtype,
            )
        self.machine = _MACHINES[key]
        device_bytes = (
            int(float(getattr(self.config, "max_device_memory_gb", 0) or 0) * GIB) or None
        )
        self.plan = plan_offload(
            self.unit_costs(),
            self.machine,
            tokens_per_step=tokens_per_step,
            num_microbatches=num_microbatches,
            clipping=self.settings.grad_clip > 0,
            pool_budget_bytes=self.pool.budget_bytes,
            activation_allowance_bytes=self.activation_allowance_bytes,
            max_buffer_count=self._max_buffer_count,
            device_memory_bytes=device_bytes if self.compute_device.type == "cuda" else None,
            forced_prefetch_depth=self._forced_prefetch_depth,
            forced_activation_target=self._forced_activation_target,
            sequence_length=self._sequence_length,
            compute_efficiency=self._measured_compute_efficiency(),
        )
        self.prefetch_depth = self.plan.prefetch_depth
        self.activation_targets = dict(self.plan.activation_targets)
        logger.info(self.plan.describe())
        malloc_trim()
        return self.plan

    def _measured_compute_efficiency(self) -> float:
        """The blocks' measured speed over what the machine's matmul and attention rates
        predict for them (`planner.unit_flops`): forward, recomputation and backward
        (parameters resident), the median over the profiling step's blocks; 1.0 unmeasured. Normalisation, activations and the like run
        far below the matmul rate on a CPU."""
        ratios = []
        machine = self.machine
        attention_rate = machine.attention_flops_per_s or machine.compute_flops_per_s
        for unit, tokens, forward_s, call in self._block_times:
            if call.backward_s is None:
                continue
            matmul, attention = unit_flops(
                sum(slot.numel for slot in unit.slots),
                tokens,
                recomputed=True,
                sequence_length=self._sequence_length,
                attention_width=self._block_width.get(unit.index, 0),
            )
            predicted = matmul / machine.compute_flops_per_s + attention / attention_rate
            ratios.append(predicted / (forward_s + call.backward_s))
        self._block_times = []
        if not ratios:
            return 1.0
        return min(max(statistics.median(ratios), 0.05), 2.0)

    def recompute_estimate_bytes(self, num_tokens: int, sequence_length: int = 0) -> int:
        """What a micro-batch of `num_tokens` in sequences of `sequence_length` (0: one
        sequence) needs outside the pool and beyond what the allowance bounds: one block's
        recomputation with its backward, estimated from the block's linear layers (2.5 x the sum
        of their input and output widths per token, in the compute dtype: 0.9-2.3x of it
        measured on Llama blocks of 256-1024 wide, 2-8k tokens, fp32 and bf16, SDPA attention)
        and, for a model with eager attention, its score matrices (`_EAGER_SCORE_BYTES` per
        score); plus the hidden states the LM head takes and their gradient."""
        item = torch.empty(0, dtype=self.compute_dtype).element_size()
        recompute = int(2.5 * self._linear_width * num_tokens * item)
        if self._eager_heads:
            length = min(sequence_length or num_tokens, num_tokens)
            recompute += _EAGER_SCORE_BYTES * self._eager_heads * length * num_tokens
        hidden = 0
        if self._head is not None:  # the head's input, a float32 copy of it, their gradients
            hidden = 2 * num_tokens * self._head.in_features * (item + 4)
        return recompute + hidden

    def check_activation_room(self, num_tokens: int, sequence_length: int = 0) -> None:
        """Before a step with micro-batches of up to `num_tokens` (in sequences of
        `sequence_length`, 0 for one sequence): make room for the
        activations that grow with it and nothing bounds (`recompute_estimate_bytes`), taking
        it from the buffer pool down to the pool's minimum, or fail saying what is needed.

        Block checkpoints and logits are bounded by the allowance (swapped, chunked); the
        workspace beyond autograd's gradients and the kernels' spare, and a quarter of the
        allowance, are the room for the rest."""
        need = self.recompute_estimate_bytes(num_tokens, sequence_length)
        if need <= self._room_checked_bytes:
            return
        spare_workspace = max(
            self.workspace_bytes - 2 * self._largest_grad_bytes - _MIN_SPARE_BYTES, 0
        )
        room = spare_workspace + self.activation_allowance_bytes // 4
        room += self.activation_reserve_bytes
        if need > room:
            extra = need - room
            available = self.pool.budget_bytes - self.min_pool_bytes
            if extra > available:
                sizes = (self.baseline_rss_bytes, self._largest_grad_bytes, self.min_pool_bytes)
                high = smallest_budget_bytes(
                    lambda budget: activation_room_bytes(budget, *sizes) >= need,
                    self.max_host_bytes,
                    2 * self.max_host_bytes + 4 * (need + self.min_pool_bytes),
                )
                basis = "the block's linear layers" + (
                    " and eager attention's score matrices" if self._eager_heads else ""
                )
                raise ValueError(
                    f"a micro-batch of {num_tokens} tokens needs about {need / GIB:.2f} GiB for "
                    "one block's recomputation and the LM head's hidden states (estimated from "
                    f"{basis}), and offload.max_host_memory_gb="
                    f"{self.max_host_bytes / GIB:g} leaves {(room + available) / GIB:.2f} GiB "
                    "for them beside the smallest buffer pool: lower the batch size or the "
                    "sequence length, or set offload.max_host_memory_gb to at least "
                    f"{math.ceil(high / GIB * 100) / 100:.2f}"
                )
            self.pool.budget_bytes -= extra
            self.activation_reserve_bytes += extra
            self.pool.shrink()
            logger.info(
                "micro-batches of %d tokens: %.3f GiB moved from the buffer pool to activations "
                "(one block's recomputation needs about %.3f GiB); pool now %.3f GiB",
                num_tokens,
                extra / GIB,
                need / GIB,
                self.pool.budget_bytes / GIB,
            )
        self._room_checked_bytes = need

    def _enforce_budget(self, step_peak_bytes: int | None) -> None:
        """If a step's peak RSS overshot the budget, give the pool that much less from now on."""
        if step_peak_bytes is None or step_peak_bytes <= self.max_host_bytes:
            return
        overshoot = step_peak_bytes - self.max_host_bytes
        new_budget = max(self.min_pool_bytes, self.pool.budget_bytes - int(1.1 * overshoot))
        logger.warning(
            "step peak RSS %.3f GiB exceeded offload.max_host_memory_gb; host buffer pool %.3f -> %.3f GiB",
            step_peak_bytes / GIB,
            self.pool.budget_bytes / GIB,
            new_budget / GIB,
        )
        self.pool.budget_bytes = new_budget
        self.pool.shrink()

    def _run_pass(self, micro_batches):
        self._norms = {}
        self._num_microbatches = len(micro_batches)
        total_loss = 0.0
        persistent = [u for u in self.units if u.persistent]
        try:
            for position, (inputs, targets) in enumerate(micro_batches):
                self._first_microbatch = position == 0
                self._last_microbatch = position == len(micro_batches) - 1
                for unit in persistent:
                    self._make_resident(unit)
                self._phase = "forward"
                started = time.perf_counter()
                chunk_tokens = self.loss_chunk_tokens(_num_tokens(inputs))
                self._sequence_length = _sequence_length(inputs)
                self._bypass_head = chunk_tokens is not None
                try:
                    outputs = self.model(_to_device(inputs, self.compute_device))
                finally:
                    self._bypass_head = False
                targets = _to_device(targets, self.compute_device)
                if chunk_tokens is None:
                    loss = self.loss_fn(outputs, targets)
                else:
                    loss = self._chunked_loss(outputs, targets, chunk_tokens)
                    self._stats["loss_chunk_tokens"] = chunk_tokens
                loss = loss / len(micro_batches)
                del outputs
                self._phase = "backward"
                self.settle()  # units the forward did not use; their gradient spans are reused
                if self._last_microbatch:
                    self._on_phase("backward")
                backward_started = time.perf_counter()
                self._stats["forward_s"] += backward_started - started
                loss.backward()
                self._stats["backward_s"] += time.perf_counter() - backward_started
                self._traced = True
                total_loss += float(loss.detach())
                del loss
                self._finish_backward()
        finally:
            self._phase = "idle"
            self._checkpoint_calls.clear()
        started = time.perf_counter()
        self._drain()
        self._stats["drain_s"] += time.perf_counter() - started
        for unit in self.units:
            if unit.provisional:
                # The first step showed whether the unit's own forward runs; if it does, stream it.
                unit.provisional = False
                unit.persistent = not unit.seen_in_forward
        # Norms taken on a GPU come to the host here, once the backward has run.
        ordered = [self._norms[index].cpu() for index in sorted(self._norms)]
        return total_loss, total_norm(ordered)

    def _finish_backward(self) -> None:
        """Units whose gradients never all arrived (unused parameters, persistent unit)."""
        for unit in self.units:
            if unit.persistent:
                if unit.trainable:
                    if self._last_microbatch and not self._defer:
                        self._start_state_read(unit)
                    self._start_grad_read(unit)
                self._unit_backward_done(unit)
            elif unit.p_buffer is not None:
                if any(slot.param.grad is not None for slot in unit.trainable):
                    if self._last_microbatch and not self._defer:
                        self._start_state_read(unit)
                    self._start_grad_read(unit)
                    self._unit_backward_done(unit)
                else:
                    self._release_all(unit)

    def _release_all(self, unit: _Unit) -> None:
        self._release(unit)
        for name in ("mv_buffer", "g_buffer"):
            buffer = getattr(unit, name)
            if buffer is not None:
                future = getattr(unit, name.replace("buffer", "future"))
                if future is not None:
                    future.result()
                buffer.release()
                setattr(unit, name, None)
                setattr(unit, name.replace("buffer", "future"), None)

    def _drain(self) -> None:
        start = time.perf_counter()
        for job in self._jobs:
            self._writes.extend(job.result())
        self._jobs = []
        for future in self._writes:
            future.result()
        self._writes = []
        self._stats["wait_s"] += time.perf_counter() - start
        for unit in self.units:
            self._release_all(unit)

    def _discard_speculative(self) -> None:
        for unit in self.units:
            unit.written = False
            unit.updated_slots = []

    def _commit(self) -> None:
        for unit in self.units:
            if unit.written:
                unit.version = 1 - unit.version
                for slot in getattr(unit, "updated_slots", []):
                    self.param_steps[slot.name] += 1
            unit.written = False
            unit.updated_slots = []
        self.step_count += 1

    @torch.no_grad()
    def evaluate_loss(self, inputs, targets: torch.Tensor) -> torch.Tensor:
        """`loss_fn` of the model's output outside training (evaluation); with a
        `TokenCrossEntropy` and logits too large for a quarter of the activation allowance,
        the head and the loss run in chunks, as in a training step."""
        targets = _to_device(targets, self.compute_device)
        chunk_tokens = self.loss_chunk_tokens(_num_tokens(inputs))
        if chunk_tokens is None:
            return self.loss_fn(self.run_forward(inputs), targets)
        self._bypass_head = True
        try:
            outputs = self.run_forward(inputs)
        finally:
            self._bypass_head = False
        hidden = self._take_bypassed(outputs)
        try:
            self._make_resident(self._head_unit)
            return self._head_loss(hidden, targets, chunk_tokens)
        finally:
            self._release_all(self._head_unit)

    def run_forward(self, inputs):
        """The model's output for `inputs` outside training (evaluation, generation)."""
        try:
            for unit in self.units:
                if unit.persistent:
                    self._make_resident(unit)
            return self.model(_to_device(inputs, self.compute_device))
        finally:
            for unit in self.units:
                self._release_all(unit)

    # ------------------------------------------------------------------------------------------
    # inspection, checkpoints, export

    def _regions(self) -> list[_Region]:
        """Every tensor of the committed state: parameters (the fp32 master where there is one),
        AdamW state and, with bf16 working parameters, the working copies ("compute/")."""
        regions = []
        for unit in self.units:
            base = unit.version_offsets[unit.version]
            for slot in unit.slots:
                if unit.has_master and slot.trainable:
                    master = base + unit.p_bytes + unit.state_set_offset("master")
                    regions.append(
                        _Region(
                            f"param/{slot.name}",
                            slot,
                            master + slot.state_offset,
                            "param",
                            slot.dtype,
                        )
                    )
                    regions.append(
                        _Region(
                            f"compute/{slot.name}",
                            slot,
                            base + slot.p_offset,
                            "compute",
                            slot.compute_dtype,
                        )
                    )
                else:
                    regions.append(
                        _Region(
                            f"param/{slot.name}", slot, base + slot.p_offset, "param", slot.dtype
                        )
                    )
            for slot in unit.trainable:
                for kind in ("exp_avg", "exp_avg_sq"):
                    offset = base + unit.p_bytes + unit.state_set_offset(kind) + slot.state_offset
                    regions.append(
                        _Region(f"{kind}/{slot.name}", slot, offset, kind, torch.float32)
                    )
        return regions

    def _layout(self) -> tuple[dict, list[tuple[int, int, int]]]:
        entries, spans, offset = [], [], 0
        for region in self._regions():
            entries.append(
                {
                    "name": region.name,
                    "dtype": str(region.dtype).removeprefix("torch."),
                    "shape": list(region.slot.shape),
                    "offset": offset,
                    "nbytes": region.num_bytes,
                }
            )
            spans.append((offset, region.num_bytes, region.store_offset))
            offset += region.num_bytes
        extra = {
            "format": CHECKPOINT_FORMAT,
            "precision": self.precision,
            "step_count": self.step_count,
            "param_steps": dict(self.param_steps),
        }
        return {"entries": entries, "total_bytes": offset, "extra": extra}, spans

    def checkpoint_shards(self) -> Mapping[str, Shard]:
        """The committed state as one streaming shard (call between steps)."""
        if self._phase != "idle":
            raise RuntimeError("checkpoint_shards() must be called between training steps")
        self.settle()
        layout, spans = self._layout()
        store = self.store

        def read_into(offset: int, target: memoryview) -> None:
            target = memoryview(target).cast("B")
            end = offset + len(target)
            for start, length, store_offset in spans:
                lo, hi = max(start, offset), min(start + length, end)
                if lo < hi:
                    store.pread(store_offset + lo - start, target[lo - offset : hi - offset])

        return {"offload": Shard(layout, read_into)}

    def load_checkpoint_shards(self, shards: Mapping) -> None:
        """Restore the committed state from shards written by `checkpoint_shards`, streaming."""
        self.settle()
        if "offload" not in shards:
            raise ValueError(f"checkpoint has no 'offload' shard (found: {sorted(shards)})")
        shard = shards["offload"]
        if isinstance(shard, tuple):
            # (bytes, layout) as returned by the durable tier's in-memory load.
            data, layout = shard
            shard = Shard(layout, _array_reader(data))
        layout = shard.layout if isinstance(shard.layout, dict) else json.loads(shard.layout)
        extra = layout.get("extra", {})
        if extra.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"offload shard format {extra.get('format')!r} is not {CHECKPOINT_FORMAT!r}"
            )
        saved_precision = extra.get("precision", "fp32")
        if saved_precision != self.precision:
            raise ValueError(
                f"the offload checkpoint was written with precision {saved_precision!r}, this engine "
                f"trains with {self.precision!r}: resume with trainer.precision={saved_precision}"
            )
        by_name = {entry["name"]: entry for entry in layout["entries"]}
        regions = self._regions()
        missing = [region.name for region in regions if region.name not in by_name]
        if missing:
            raise ValueError(f"offload checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        chunk = bytearray(
            min(_CHECKPOINT_CHUNK_BYTES, max((r.num_bytes for r in regions), default=1))
        )
        view = memoryview(chunk)
        for region in regions:
            entry = by_name[region.name]
            dtype_name = str(region.dtype).removeprefix("torch.")
            if tuple(entry["shape"]) != region.slot.shape or entry["dtype"] != dtype_name:
                raise ValueError(
                    f"checkpoint tensor {region.name} is {entry['dtype']}{entry['shape']}, the "
                    f"model has {dtype_name}{list(region.slot.shape)}"
                )
            done = 0
            while done < region.num_bytes:
                length = min(len(chunk), region.num_bytes - done)
                shard.read_into(entry["offset"] + done, view[:length])
                self.store.pwrite(region.store_offset + done, view[:length])
                done += length
        self.step_count = int(extra.get("step_count", 0))
        self.param_steps.update({k: int(v) for k, v in extra.get("param_steps", {}).items()})

    @torch.no_grad()
    def gather_parameters(self, *, working_copies: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter as a host tensor (loads the whole model: tests and small models only):
        the fp32 masters, or with `working_copies` what forward and backward see."""
        self.settle()
        result = {}
        for region in self._regions():  # a slot's "compute/" region follows its "param/" one
            if region.kind == "param" or (working_copies and region.kind == "compute"):
                result[region.slot.name] = self._read_region(region)
        return result

    def _read_region(self, region: _Region) -> torch.Tensor:
        target = torch.empty(region.slot.shape, dtype=region.dtype)
        self.store.pread(region.store_offset, memoryview(target.view(-1).view(torch.uint8).numpy()))
        return target

    @torch.no_grad()
    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """AdamW state per parameter name, shaped like torch.optim.AdamW's (host tensors)."""
        self.settle()
        state: dict[str, dict[str, torch.Tensor]] = {}
        for region in self._regions():
            if region.kind in ("exp_avg", "exp_avg_sq"):
                name = region.slot.name
                entry = state.setdefault(
                    name, {"step": torch.tensor(float(self.param_steps[name]))}
                )
                entry[region.kind] = self._read_region(region)
        return {name: entry for name, entry in state.items() if entry["step"] > 0}

    @torch.no_grad()
    def load_parameters_and_state(
        self, params: Mapping[str, torch.Tensor], optim: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> None:
        """Write parameters (fp32 masters) and AdamW state into the committed version; working
        copies are rounded from the masters. A parameter without optimizer state starts fresh."""
        if self._phase != "idle":
            raise RuntimeError("load_parameters_and_state() must be called between training steps")
        self.settle()
        missing = [
            r.slot.name for r in self._regions() if r.kind == "param" and r.slot.name not in params
        ]
        if missing:
            raise ValueError(f"state has no values for parameters {sorted(missing)[:5]}")
        for region in self._regions():
            name = region.slot.name
            if region.kind == "param":
                source = params[name]
            elif region.kind == "compute":
                source = params[name].to(region.dtype)
            else:
                entry = optim.get(name)
                source = entry[region.kind] if entry else torch.zeros(region.slot.shape)
            source = source.detach().to("cpu", region.dtype).contiguous()
            if tuple(source.shape) != region.slot.shape:
                raise ValueError(
                    f"{region.name}: state has shape {tuple(source.shape)}, the model "
                    f"{region.slot.shape}"
                )
            self.store.pwrite(
                region.store_offset, memoryview(source.view(-1).view(torch.uint8).numpy())
            )
        for unit in self.units:
            for slot in unit.trainable:
                entry = optim.get(slot.name)
                self.param_steps[slot.name] = int(float(entry["step"])) if entry else 0

    def export_safetensors(
        self, path: str | os.PathLike, metadata: dict[str, str] | None = None
    ) -> None:
        """Write the committed parameters as one safetensors file, one tensor in memory at a time."""
        self.settle()
        dtype_codes = {
            torch.float32: "F32",
            torch.bfloat16: "BF16",
            torch.float16: "F16",
            torch.int64: "I64",
        }
        params = [region for region in self._regions() if region.kind == "param"]
        header, offset = {}, 0
        for region in params:
            header[region.slot.name] = {
                "dtype": dtype_codes[region.dtype],
                "shape": list(region.slot.shape),
                "data_offsets": [offset, offset + region.num_bytes],
            }
            offset += region.num_bytes
        if metadata:
            header["__metadata__"] = metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        temporary = f"{path}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little"))
            handle.write(encoded)
            chunk = bytearray(_CHECKPOINT_CHUNK_BYTES)
            view = memoryview(chunk)
            for region in params:
                done = 0
                while done < region.num_bytes:
                    length = min(len(chunk), region.num_bytes - done)
                    self.store.pread(region.store_offset + done, view[:length])
                    handle.write(view[:length])
                    done += length
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    def describe(self) -> dict:
        return {
            "num_units": len(self.units),
            "num_blocks": sum(u.is_block for u in self.units),
            "state_bytes": self.store.capacity_bytes,
            "pool_budget_bytes": self.pool_budget_bytes,
            "baseline_rss_bytes": self.baseline_rss_bytes,
            "aio_backend": self.aio.name,
            "optimizer_kernel": self.optimizer.kernel,
            "prefetch_depth": self.prefetch_depth,
        }

    def _remove_directory(self) -> None:
        if self.nvme_directory and os.path.isdir(self.nvme_directory):
            shutil.rmtree(self.nvme_directory, ignore_errors=True)

    def close(self) -> None:
        """Free buffers and remove the NVMe files (the durable checkpoint is elsewhere)."""
        self._optimizer_thread.shutdown(wait=True)
        self.transfers.close()
        if self.swapper is not None:
            self.swapper.close()
        self.pool.close()
        self.store.close(remove=True)
        self.aio.close()
        self.optimizer.close()
        self._remove_directory()


_MACHINES: dict[tuple, Machine] = {}
_COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _remove_abandoned_directories(root: str) -> None:
    """Remove store directories whose process is gone (killed before it could clean up)."""
    for entry in os.scandir(root):
        parts = entry.name.split("-")
        if len(parts) != 4 or parts[:2] != ["stalwart", "offload"] or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.info("removing %s, left behind by process %d", entry.path, pid)
            shutil.rmtree(entry.path, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def _token_tensor(inputs) -> torch.Tensor | None:
    """The [batch, length] token tensor of a micro-batch's inputs (a tensor, the first value of
    a dict, the first item of a sequence)."""
    if isinstance(inputs, torch.Tensor):
        return inputs
    if isinstance(inputs, dict) and inputs:
        return _token_tensor(next(iter(inputs.values())))
    if isinstance(inputs, tuple | list) and inputs:
        return _token_tensor(inputs[0])
    return None


def _num_tokens(inputs) -> int:
    tokens = _token_tensor(inputs)
    return 0 if tokens is None else tokens.numel()


def _logit_transform(model: nn.Module) -> str | None:
    """What a Hugging Face model does to its logits after the LM head, per its config (Gemma 2
    and 3 soft-cap them, Granite and Cohere scale them), or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if getattr(config, "final_logit_softcapping", None):
        return f"soft-caps its logits (final_logit_softcapping={config.final_logit_softcapping})"
    for key in ("logits_scaling", "logit_scale"):
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            return f"scales its logits ({key}={value})"
    return None


def _is_upcast_of(returned, hidden: torch.Tensor) -> bool:
    """Whether `returned` is `hidden` cast to another dtype and nothing else (a wrapper's
    `.float()` on what it takes for the logits)."""
    if not isinstance(returned, torch.Tensor) or returned.shape != hidden.shape:
        return False
    node = returned.grad_fn
    if node is None or type(node).__name__ != "ToCopyBackward0":
        return False
    source = node.next_functions[0][0] if node.next_functions else None
    return source is not None and source is hidden.grad_fn


def _has_attention(module: nn.Module) -> bool:
    """Whether a block holds an attention layer (by the names every transformer library uses)."""
    return any(
        "attention" in type(m).__name__.lower() or name.rpartition(".")[2].startswith("attn")
        for name, m in module.named_modules()
    )


def _eager_attention_heads(model: nn.Module) -> int:
    """Attention heads of a Hugging Face model that runs eager attention (which builds its score
    matrices), else 0: SDPA and flash kernels, and our GPT, do not."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            continue
        if config._attn_implementation != "eager":
            return 0
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(getattr(text, "num_attention_heads", 0) or 0)
    return 0


def _sequence_length(inputs) -> int:
    """Tokens per sequence (0 when the inputs say nothing)."""
    tokens = _token_tensor(inputs)
    return int(tokens.shape[-1]) if tokens is not None and tokens.dim() else 0


def _array_reader(data) -> Callable[[int, memoryview], None]:
    source = memoryview(data).cast("B")

    def read_into(offset: int, target: memoryview) -> None:
        target = memoryview(target).cast("B")
        target[:] = source[offset : offset + len(target)]

    return read_into


def _release_after(buffer, futures: list[Future]) -> None:
    """Return `buffer` to its pool once every future in `futures` has completed."""
    if buffer is None:
        return
    remaining = [len(futures)]
    lock = threading.Lock()

    def one_done(_future):
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            buffer.release()

    for future in futures:
        future.add_done_callback(one_done)


def _flatten(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flatten(item)
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _flatten(item)
    elif hasattr(value, "to_tuple"):
        yield from _flatten(value.to_tuple())


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple | list):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _default_init(name: str, tensor: torch.Tensor) -> None:
    """Initialisation for parameters built on the meta device: gains 1, others N(0, 0.02)."""
    if tensor.dim() == 1:
        if name.endswith("bias"):
            tensor.zero_()
        else:
            tensor.fill_(1.0)
        return
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    tensor.normal_(0.0, 0.02, generator=generator)

"""The run configuration: one typed, validated tree loaded from YAML plus dotted overrides.

Every component owns one section class here. Unknown keys, wrong types and out-of-range
values fail in `load_config` before any work starts, with a one-line `ConfigError` that names
the dotted key, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A user error in the run configuration; the message names the key and the fix."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors; numeric strings such as `1e-3`
    (which YAML reads as text) are accepted as numbers."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=False)


# ---------------------------------------------------------------------------------------------
# Model, data, optimisation, trainer


class ModelConfig(Section):
    kind: Literal["gpt", "hf"] = "gpt"
    depth: int = Field(2, ge=1, le=96, description="GPT size dial: width, heads derive from it")
    width: int | None = Field(
        None, ge=8, description="override the derived width (multiple of heads)"
    )
    num_heads: int | None = Field(None, ge=1)
    context_length: int = Field(64, ge=2, le=131072)
    vocab_size: int = Field(259, ge=2, description="259 = the built-in byte tokenizer")
    tie_embeddings: bool = False
    rope_theta: float = Field(10000.0, gt=0)
    # Hugging Face: a local directory with config.json (+ weights), or an inline config dict.
    path: str | None = None
    hf_config: dict[str, Any] | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _hf_needs_source(self) -> ModelConfig:
        if self.kind == "hf" and not (self.path or self.hf_config):
            raise ValueError(
                "model.kind is 'hf' but neither model.path (a local model directory) nor "
                "model.hf_config (an inline transformers config) is set"
            )
        return self


class DataConfig(Section):
    kind: Literal["parquet", "arithmetic", "synthetic"] = "arithmetic"
    path: str | None = Field(None, description="parquet file, directory or glob (kind=parquet)")
    eval_path: str | None = Field(
        None, description="held-out parquet file, directory or glob (kind=parquet); None = path"
    )
    tokenizer: str = Field("byte", description="'byte' or a local Hugging Face tokenizer directory")
    num_examples: int = Field(
        20000, ge=1, description="arithmetic: problems in the corpus; synthetic: windows"
    )
    max_operand: int = Field(99, ge=1, description="arithmetic operands are 0..max_operand")
    num_operands: int = Field(2, ge=2, le=8, description="arithmetic operands per problem")
    ops: str = Field("+-", description="arithmetic operators, distinct characters of '+-*'")
    shuffle: bool = True
    drop_last: bool = Field(
        True, description="skip an epoch tail shorter than a global batch (else wrap into next)"
    )
    seed: int = Field(0, ge=0, description="sample order (and generated corpora)")
    cache_mb: int = Field(256, ge=0, description="decoded row groups kept in memory per rank")

    @field_validator("ops")
    @classmethod
    def _ops_allowed(cls, value: str) -> str:
        if not value or any(op not in "+-*" for op in value) or len(set(value)) != len(value):
            raise ValueError("must be distinct characters from '+-*', e.g. '+-'")
        return value

    @model_validator(mode="after")
    def _parquet_needs_path(self) -> DataConfig:
        if self.kind == "parquet" and not self.path:
            raise ValueError("data.kind is 'parquet' but data.path is not set")
        return self


class OptimConfig(Section):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(3e-3, gt=0, le=10)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="global-norm clip; 0 disables")
    fused: bool | None = Field(None, description="fused AdamW; None = where available")


class TrainerConfig(Section):
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1, description="global batch in sequences per optimizer step")
    grad_accum_steps: int = Field(1, ge=1)
    eval_every: int = Field(0, ge=0, description="0 disables periodic evaluation")
    eval_batches: int = Field(4, ge=1)
    log_every: int = Field(1, ge=1)
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int = Field(0, ge=0, description="torch intra-op threads per worker; 0 = leave")
    deterministic: bool = True


class ParallelConfig(Section):
    strategy: Literal["none", "ddp", "fsdp"] = "ddp"
    world_size: int = Field(1, ge=1, le=4096)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    fixed_buckets: bool = Field(
        True,
        description="DDP keeps its constructor's gradient buckets (no rebuild after step 1), so a "
        "restarted worker group reduces in the same order: bit-identical recovery at any world "
        "size, for one autograd-graph traversal per step",
    )


class ClusterConfig(Section):
    address: str | None = Field(None, description="Ray address; None starts an embedded instance")
    num_nodes: int = Field(1, ge=1, description="embedded: simulated nodes (ray.cluster_utils)")
    num_spare_nodes: int = Field(0, ge=0)
    workers_per_node: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    hang_timeout_s: float = Field(60.0, gt=0)
    capacity_timeout_s: float = Field(60.0, gt=0)
    elastic: bool = Field(
        False,
        description="when a node is lost and no spare node is free, continue data-parallel on "
        "the surviving nodes (same global batch; results match to rounding, not bit for bit) "
        "instead of waiting capacity_timeout_s for a node",
    )
    max_recoveries: int = Field(100, ge=0)
    standby_workers: bool = Field(
        False,
        description="keep workers_per_node standby workers on every node (spares included), "
        "each with its Trainer already built, and a standby snapshot manager on every spare "
        "node, so a recovery only joins the new process group and loads the state; standby "
        "workers need CPU jobs with DDP or no parallel wrapper (otherwise fresh processes)",
    )


# ---------------------------------------------------------------------------------------------
# Fault tolerance


class ErasureConfig(Section):
    """Cross-node Reed-Solomon parity of the in-memory snapshots (docs/erasure.md).

    Nodes form groups of `group_size`; any `parity` node losses per group are recoverable
    at a memory overhead of parity / (group_size - parity) of a shard per node.
    """

    group_size: int = Field(4, ge=1, le=16, description="nodes per erasure group (g)")
    parity: int = Field(
        1, ge=0, le=8, description="parity pieces per stripe (m) = node losses tolerated per group"
    )

    @model_validator(mode="after")
    def _parity_fits(self) -> ErasureConfig:
        if self.parity >= self.group_size:
            raise ValueError(
                f"snapshot.erasure.parity ({self.parity}) must be smaller than "
                f"snapshot.erasure.group_size ({self.group_size}): set parity to at most "
                f"{self.group_size - 1}, or parity=0 to disable erasure coding"
            )
        return self

    @property
    def memory_overhead(self) -> float:
        """Parity bytes each node holds, as a fraction of its own shard."""
        return self.parity / (self.group_size - self.parity)


class SnapshotConfig(Section):
    enabled: bool = True
    every_steps: int = Field(1, ge=1)
    persist_every: int = Field(0, ge=0, description="persist every P-th committed version; 0 = off")
    keep: int = Field(2, ge=1, description="durable checkpoints kept")
    erasure: ErasureConfig = Field(default_factory=ErasureConfig)
    manager_num_threads: int = Field(1, ge=1, description="CPU threads a snapshot manager may use")
    shm_dir: str = Field(
        "",
        description="directory of the managers' shared-memory regions on every node; empty: "
        "$STALWART_SHM_DIR, else /dev/shm. A tmpfs mounted with huge=within_size (2 MiB pages) "
        "allocates, restores and frees snapshots faster (docs/snapshot_state.md)",
    )

    @field_validator("shm_dir")
    @classmethod
    def _absolute_shm_dir(cls, value: str) -> str:
        if value and not value.startswith("/"):
            raise ValueError(
                f"must be an absolute path (every node resolves it alike), got {value!r}"
            )
        return value


FaultKind = Literal[
    "kill_worker", "kill_node", "kill_manager", "stall_manager", "hang_worker", "corrupt_fragment"
]
FaultPhase = Literal["forward", "backward", "optimizer", "snapshot", "exchange"]


class FaultEvent(Section):
    kind: FaultKind
    step: int = Field(ge=1)
    phase: FaultPhase = "forward"
    rank: int = Field(0, ge=0)
    node: int | None = Field(None, ge=0, description="node index for kill_node/kill_manager")
    duration_s: float = Field(
        8.0, gt=0, description="stall_manager: how long the manager answers nothing"
    )


class FaultsConfig(Section):
    events: list[FaultEvent] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Offload, quantization, RL


class AioConfig(Section):
    block_size: int = Field(1 << 20, ge=4096)
    queue_depth: int = Field(8, ge=1)
    thread_count: int = Field(1, ge=1)
    single_submit: bool = False
    overlap_events: bool = True


class OffloadConfig(Section):
    device: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str | None = Field(None, description="existing directory on a fast local SSD")
    max_host_memory_gb: float = Field(
        4.0, gt=0, description="hard cap on the process's host memory"
    )
    max_device_memory_gb: float = Field(0.0, ge=0, description="0 = no device budget")
    pin_memory: bool = True
    buffer_count: int = Field(
        4, ge=1, description="parameter buffers in flight (prefetch depth + 1)"
    )
    prefetch_depth: int | None = Field(None, ge=0, description="None = chosen by the planner")
    activation_swap: Literal["auto", "keep", "host", "nvme"] = Field(
        "auto", description="where block checkpoints live; auto = the planner decides per block"
    )
    optimizer_kernel: Literal["auto", "deepspeed", "torch"] = Field(
        "auto", description="auto = DeepSpeed CPU Adam when it builds, else torch's fused AdamW"
    )
    sub_group_size: int = Field(
        1 << 23,
        ge=1024,
        description="elements of optimizer state updated at a time: a layer with more is "
        "updated in slices, so its whole optimizer state never sits in host memory",
    )
    aio: AioConfig = Field(default_factory=AioConfig)

    @model_validator(mode="after")
    def _nvme_needs_path(self) -> OffloadConfig:
        if self.device == "nvme" and not self.nvme_path:
            raise ValueError("offload.device is 'nvme' but offload.nvme_path is not set")
        return self


class QuantConfig(Section):
    """Low-precision recipe (stalwart.quant.recipes) plus per-GEMM overrides; docs/quant.md."""

    recipe: str = Field(
        "bf16",
        description="bf16 (no conversion), mxfp8, mxint8, mxfp4, nvfp4, nvint4_rht, fp4_ue5m3, "
        "fp8_tensorwise",
    )
    forward: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides for Y = X W^T: QuantSpec fields for both operands, "
        "hadamard_size, or 'input' / 'weight': {field: value}",
    )
    dgrad: dict[str, Any] = Field(
        default_factory=dict, description="overrides for dX = dY W ('grad_output' / 'weight')"
    )
    wgrad: dict[str, Any] = Field(
        default_factory=dict, description="overrides for dW = dY^T X ('grad_output' / 'input')"
    )
    keep_modules: list[str] | None = Field(
        None, description="fnmatch patterns of module names kept in high precision; None = lm_head"
    )
    keep_first_blocks: int | None = Field(
        None, ge=0, description="the first N transformer blocks stay in high precision"
    )
    keep_last_blocks: int | None = Field(
        None, ge=0, description="the last N transformer blocks stay in high precision"
    )
    native_fp8: bool = Field(
        True, description="torch._scaled_mm for FP8 tensor-scaled GEMMs on capable GPUs"
    )
    seed: int = Field(0, ge=0, description="seeds stochastic rounding (per layer and call)")

    @field_validator("recipe")
    @classmethod
    def _recipe_known(cls, value: str) -> str:
        from stalwart.quant.recipes import RECIPE_NAMES

        if value not in RECIPE_NAMES:
            raise ValueError(f"unknown recipe {value!r}; allowed: {', '.join(RECIPE_NAMES)}")
        return value

    @model_validator(mode="after")
    def _overrides_resolve(self) -> QuantConfig:
        from stalwart.quant.recipes import recipe_from_config

        recipe_from_config(self)  # raises ValueError naming the bad key and the allowed values
        return self


class RLConfig(Section):
    """RL with verifiable rewards (docs/rl.md). `recipe: scalerl` fills every key it names that
    the file leaves unset: CISPO, prompt-level aggregation, batch advantage normalisation,
    zero-variance filtering, no-positive-resampling, FP32 LM head, PipelineRL-8, length cap."""

    recipe: Literal["scalerl"] | None = None
    loss: Literal["grpo", "dapo", "cispo"] = "grpo"
    aggregation: Literal["sample", "token", "prompt"] | None = Field(
        None, description="None: the loss's own (grpo: sample, dapo/cispo: token)"
    )
    advantage_norm: Literal["group", "batch", "none"] = "group"
    clip_eps: float = Field(0.2, gt=0, description="GRPO symmetric clip")
    clip_eps_low: float = Field(0.2, gt=0, description="DAPO lower clip")
    clip_eps_high: float = Field(0.28, gt=0, description="DAPO upper clip")
    cispo_eps_max: float = Field(4.0, gt=0, description="CISPO cap of the importance weight")
    num_samples: int = Field(8, ge=1, description="completions per prompt (group size)")
    prompts_per_step: int = Field(16, ge=1, description="prompt groups per learner step")
    max_staleness: int = Field(0, ge=0, description="PipelineRL-k; 0 = synchronous on-policy")
    num_rollout_workers: int = Field(1, ge=1)
    rollout_chunk_prompts: int = Field(4, ge=1, description="prompts per generation call")
    rollout_num_threads: int = Field(1, ge=1, description="torch threads per rollout actor")
    learner_num_threads: int = Field(1, ge=1, description="torch threads of the learner")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(8, ge=1)
    stop_token_ids: list[int] = Field(default_factory=lambda: [257])
    fp32_lm_head: bool = False
    zero_variance_filter: bool = False
    no_positive_resampling: bool = False
    positive_pass_rate: float = Field(0.9, gt=0, le=1)
    interrupt_at: tuple[int, int] | None = Field(
        None, description="[min, max] generated tokens at which a running sample is interrupted"
    )
    interrupt_text: str = " Answer: "
    answer_tokens: int = Field(4, ge=1, description="tokens sampled after the interruption")
    reward: str = Field("arithmetic", description="'arithmetic' or a dotted path module:function")
    reward_timeout_s: float = Field(5.0, gt=0)
    reward_on_error: Literal["raise", "zero"] = "raise"
    warmup_sft_steps: int = Field(0, ge=0, description="supervised steps before RL starts")
    warmup_sft_lr: float = Field(3e-3, gt=0)
    warmup_sft_batch_size: int = Field(64, ge=1)
    eval_every: int = Field(10, ge=1, description="learner steps between held-out checkpoints")
    eval_prompts: int = Field(200, ge=1)
    eval_num_samples: int = Field(4, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, values: Any) -> Any:
        if not isinstance(values, dict) or values.get("recipe") != "scalerl":
            return values
        preset = {
            "loss": "cispo",
            "aggregation": "prompt",
            "advantage_norm": "batch",
            "zero_variance_filter": True,
            "no_positive_resampling": True,
            "fp32_lm_head": True,
            "max_staleness": 8,
        }
        merged = {**preset, **values}
        if "interrupt_at" not in values:
            budget = int(merged.get("max_new_tokens", 8))
            # ScaleRL interrupts at a random point in the last ~20% of the thinking budget.
            merged["interrupt_at"] = (max(1, round(0.8 * budget)), budget)
        return merged

    @model_validator(mode="after")
    def _interrupt_range(self) -> RLConfig:
        if self.interrupt_at is not None and not 1 <= self.interrupt_at[0] <= self.interrupt_at[1]:
            raise ValueError(
                f"rl.interrupt_at is {list(self.interrupt_at)}; give [min, max] with "
                "1 <= min <= max"
            )
        if self.interrupt_at is not None and not self.interrupt_text:
            raise ValueError("rl.interrupt_text is empty but rl.interrupt_at is set")
        return self


class MetricsConfig(Section):
    progress: Literal["auto", "bar", "lines", "off"] = Field(
        "auto", description="rank 0 stdout: tqdm bar, plain lines, auto (bar on a terminal), off"
    )
    progress_keys: list[str] | None = Field(
        None, description="extra metrics on the progress line; None = all without a '/'"
    )
    tensorboard: bool = Field(False, description="also write TensorBoard events (pip tensorboard)")
    tensorboard_dir: str | None = Field(None, description="None = <run_dir>/tensorboard")
    fsync: bool = Field(False, description="fsync metrics.jsonl per line (survives power loss)")


# ---------------------------------------------------------------------------------------------


class RunConfig(Section):
    name: str = "run"
    run_dir: str = "runs/{name}"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    snapshot: SnapshotConfig = Field(default_factory=SnapshotConfig)
    offload: OffloadConfig = Field(default_factory=OffloadConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @field_validator("name")
    @classmethod
    def _name_is_a_path_part(cls, value: str) -> str:
        if not value or "/" in value or value.startswith("."):
            raise ValueError("name must be a non-empty file name without '/' or a leading '.'")
        return value

    @model_validator(mode="after")
    def _elastic_needs_ddp(self) -> RunConfig:
        if self.cluster.elastic and self.parallel.strategy == "fsdp":
            raise ValueError(
                "cluster.elastic: true needs parallel.strategy: ddp (every rank holds the whole "
                "state); FSDP shards cannot be re-split over fewer ranks, so set cluster.elastic: "
                "false and register spare nodes (cluster.num_spare_nodes) instead"
            )
        return self

    @model_validator(mode="after")
    def _batch_divides(self) -> RunConfig:
        per_step = self.parallel.world_size * self.trainer.grad_accum_steps
        if self.trainer.batch_size % per_step:
            raise ValueError(
                f"trainer.batch_size ({self.trainer.batch_size}) must be divisible by "
                f"parallel.world_size x trainer.grad_accum_steps ({per_step})"
            )
        return self

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir.format(name=self.name))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    """One line: PyYAML's own messages span several lines with a caret drawing."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _parse_override_value(text: str) -> Any:
    """`key=value` values are YAML scalars/lists (`3`, `1e-3`, `true`, `[a, b]`, `null`)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"cannot parse override value {text!r}: {_describe_yaml_error(error)}"
        ) from None


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict (in place) and return it."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} is not of the form key.path=value")
        parts = key.strip().split(".")
        node = tree
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                dotted = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {override!r}: {dotted} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_override_value(raw)
    return tree


def _section_fields(location: tuple) -> list[str]:
    """The allowed keys at a location of the config tree (for 'did you mean')."""
    model: Any = RunConfig
    for part in location:
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields) if hasattr(model, "model_fields") else []


def _format_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = tuple(part for part in item["loc"] if isinstance(part, str | int))
        dotted = ".".join(str(part) for part in location) or "<root>"
        kind = item["type"]
        if kind == "extra_forbidden":
            allowed = _section_fields(location[:-1])
            guess = difflib.get_close_matches(str(location[-1]), allowed, n=1)
            hint = f"; did you mean '{guess[0]}'?" if guess else ""
            lines.append(f"unknown key '{dotted}'{hint} (allowed: {', '.join(allowed)})")
        elif kind == "missing":
            lines.append(f"missing required key '{dotted}'")
        else:
            value = item.get("input")
            shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"bad value for '{dotted}': {shown} ({message})")
    return "; ".join(lines)


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_error(error)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or start from defaults), apply overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {_describe_yaml_error(error)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    apply_overrides(tree, overrides or [])
    return config_from_dict(tree)


def save_config(config: RunConfig, run_dir: str | Path) -> Path:
    """Write the resolved config into the run directory (what `stalwart resume` reads back)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.yaml"
    temporary = target.with_suffix(".yaml.tmp")
    temporary.write_text(config.to_yaml())
    temporary.replace(target)
    return target

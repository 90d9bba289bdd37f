"""The Trainer: what one rank does. Build the components, step, evaluate, expose the state.

The step loop stays short and delegates: the model comes from `models`, parallel wrapping from
`trainer.parallel`, the optimizer and schedule from `trainer.optim`, batches from `data`,
low-precision conversion from `quant`, out-of-core steps from `offload`. Everything stateful is
reachable through `state_dict()` / `load_state_dict()`, which is what snapshots capture.

Hooks let the layers above act at precise points of a step without the loop knowing them:
`phase_hooks` run at "forward", "backward" and "optimizer" (fault injection);
`before_optimizer_hooks` run right before parameters change (a snapshot of the previous step
must have finished copying by then); `after_step_hooks` run when a step is complete (a new
snapshot starts copying).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from stalwart.config import RunConfig
from stalwart.models import build_model
from stalwart.trainer import parallel
from stalwart.trainer.data import build_datasets
from stalwart.trainer.optim import WarmupCosine, build_optimizer
from stalwart.trainer.rng import load_rng_state, rng_state, seed_everything


def pick_device(requested: str, rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("trainer.device is 'cuda' but no CUDA device is visible")
    return torch.device("cuda", rank % torch.cuda.device_count())


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        run_dir: str | Path | None = None,
        sync_parameters: bool = True,
    ):
        """`sync_parameters=False`: DDP skips its broadcast of rank 0's parameters at
        construction, for a group whose every rank loads the same snapshot right after (all
        ranks of a group must agree on it: it is a collective)."""
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.run_dir = Path(run_dir) if run_dir is not None else config.resolved_run_dir()
        trainer_config = config.trainer
        if trainer_config.num_threads:
            torch.set_num_threads(trainer_config.num_threads)
        if trainer_config.deterministic:
            # cuBLAS needs a fixed workspace for reproducible GEMMs (ignored on CPU).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = pick_device(trainer_config.device, rank)
        # Every rank starts from the same global seed: identical init, identical data order.
        seed_everything(trainer_config.seed)

        model = build_model(config.model, seed=trainer_config.seed)
        # Offloaded training: parameters and AdamW state live in the offload engine's store, and
        # the engine (hooks on the model + out-of-core optimizer) does the whole step.
        self.offload = None
        if config.offload.device != "none":
            self.offload = _offload_engine(model, config, world_size, self.run_dir)
            self.model = model
            self.optimizer = self.offload  # the LR schedule sets its param_groups
        else:
            if config.quant.recipe not in ("bf16", "none"):
                from stalwart.quant.recipes import convert

                model = convert(model, config.quant)
            self.model = parallel.parallelize(
                model.to(self.device),
                config.parallel.strategy,
                self.device,
                fixed_buckets=config.parallel.fixed_buckets,
                init_sync=sync_parameters,
            )
            self.optimizer = build_optimizer(self.model, config.optim)
        self.schedule = WarmupCosine(
            self.optimizer,
            peak_lr=config.optim.lr,
            warmup_steps=config.optim.warmup_steps,
            max_steps=trainer_config.max_steps,
            min_lr_ratio=config.optim.min_lr_ratio,
        )
        self.train_data, self.eval_data, self.sampler = build_datasets(
            config, cache_dir=self.run_dir / "data", rank=rank
        )
        self.step = 0
        self.totals = {"tokens": 0, "skipped_steps": 0}
        # Optimizer-state memory a standby touched ahead of a restore, by (shape, dtype).
        self._reserved_state: dict[tuple, list[torch.Tensor]] = {}
        self.phase_hooks: list[Callable[[str, int], None]] = []
        self.before_optimizer_hooks: list[Callable[[int], None]] = []
        self.after_step_hooks: list[Callable[[int], None]] = []
        self._autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if trainer_config.precision == "bf16" and self.offload is None
            else contextlib.nullcontext()
        )

    @staticmethod
    def can_attach_later(config: RunConfig) -> bool:
        """Whether a Trainer built before its process group exists can join one later
        (`attach_process_group`): DDP and no wrapper can, FSDP (which shards the parameters
        when it wraps) and the offload engine cannot, nor can a GPU rank (its device
        depends on its rank)."""
        return (
            config.offload.device == "none"
            and config.parallel.strategy in ("ddp", "none")
            and pick_device(config.trainer.device, 0).type == "cpu"
        )

    def attach_process_group(
        self, rank: int, world_size: int, *, sync_parameters: bool = True
    ) -> None:
        """Take rank `rank` of `world_size` in the process group initialised since this Trainer
        was built without one (a standby worker). Only wraps the model: the optimizer holds the
        same parameters, and the rest of the state comes from the snapshot loaded next.
        `sync_parameters=False` skips DDP's broadcast of rank 0's parameters (the whole model
        over the process group) when that snapshot sets every rank's to the same bytes; every
        rank of the group must pass the same (see `__init__`)."""
        if not self.can_attach_later(self.config):
            raise RuntimeError(
                "attach_process_group needs a CPU Trainer with parallel.strategy ddp or none and "
                "no offload"
            )
        if parallel.unwrap(self.model) is not self.model:
            raise RuntimeError("this Trainer is already part of a process group")
        self.rank, self.world_size = rank, world_size
        self.model = parallel.parallelize(
            self.model,
            self.config.parallel.strategy,
            self.device,
            fixed_buckets=self.config.parallel.fixed_buckets,
            init_sync=sync_parameters,
        )

    # -----------------------------------------------------------------------------------------
    # One step

    def _phase(self, phase: str) -> None:
        for hook in self.phase_hooks:
            hook(phase, self.step + 1)

    def _micro_batches(self):
        trainer_config = self.config.trainer
        indices = self.sampler.next_indices(trainer_config.batch_size, self.rank, self.world_size)
        per_micro = len(indices) // trainer_config.grad_accum_steps
        for start in range(0, len(indices), per_micro):
            windows = self.train_data.get_batch(indices[start : start + per_micro])
            windows = windows.to(self.device, non_blocking=True)
            yield windows[:, :-1], windows[:, 1:]

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.offload is not None:  # evaluation: the engine may chunk the head and the loss
            with self._autocast:
                return self.offload.evaluate_loss(inputs, targets)
        with self._autocast:
            logits = self.model(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def _sync_context(self, last_micro: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if last_micro:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(False)
            return _restore_gradient_sync(self.model)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        if self._reserved_state:
            self._reserved_state = {}  # no restore came: the optimizer allocates its own state
        if self.offload is not None:
            return self._offloaded_train_step()
        started = time.perf_counter()
        accum = self.config.trainer.grad_accum_steps
        loss_sum = torch.zeros((), device=self.device)
        num_tokens = 0
        self._phase("forward")
        for index, (inputs, targets) in enumerate(self._micro_batches()):
            with self._sync_context(last_micro=index == accum - 1):
                loss = self._loss(inputs, targets)
                if index == accum - 1:
                    self._phase("backward")
                (loss / accum).backward()
            loss_sum += loss.detach()
            num_tokens += targets.numel()
        max_norm = self.config.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        grad_norm = float(
            grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        )
        for hook in self.before_optimizer_hooks:
            hook(self.step + 1)
        self._phase("optimizer")
        lr = self.schedule.lr
        skipped = not torch.isfinite(torch.tensor(grad_norm))
        if skipped:  # the norm is global, so every rank skips together
            self.totals["skipped_steps"] += 1
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.step += 1
        self.totals["tokens"] += num_tokens * self.world_size
        loss_value = float(parallel.all_reduce_mean(loss_sum / accum))
        for hook in self.after_step_hooks:
            hook(self.step)
        elapsed_s = time.perf_counter() - started
        return {
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": num_tokens * self.world_size / elapsed_s,
            "step_time_s": elapsed_s,
            "skipped": float(skipped),
        }

    def _offloaded_train_step(self) -> dict[str, float]:
        """The same step through the offload engine: forward, backward, clipping and AdamW."""
        started = time.perf_counter()
        self._phase("forward")
        micro_batches = list(self._micro_batches())
        # The engine updates parameters during the backward (into a version it commits only
        # when the step is known to be good), so a snapshot copy must be done before it starts.
        for hook in self.before_optimizer_hooks:
            hook(self.step + 1)
        lr = self.schedule.lr
        metrics = self.offload.train_step(micro_batches, lr, on_phase=self._phase)
        if metrics["skipped"]:
            self.totals["skipped_steps"] += 1
        self.schedule.step()
        self.step += 1
        num_tokens = sum(targets.numel() for _, targets in micro_batches)
        self.totals["tokens"] += num_tokens
        for hook in self.after_step_hooks:
            hook(self.step)
        elapsed_s = time.perf_counter() - started
        return {
            "loss": metrics["loss"],
            "lr": lr,
            "grad_norm": metrics["grad_norm"],
            "tokens_per_s": num_tokens / elapsed_s,
            "step_time_s": elapsed_s,
            "skipped": float(metrics["skipped"]),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over a fixed set of held-out windows (the same ones every time)."""
        self.model.eval()
        batch = max(1, self.config.trainer.batch_size // self.world_size)
        losses = []
        for number in range(self.config.trainer.eval_batches):
            start = (number * self.world_size + self.rank) * batch
            indices = [(start + offset) % len(self.eval_data) for offset in range(batch)]
            windows = self.eval_data.get_batch(indices).to(self.device)
            losses.append(self._loss(windows[:, :-1], windows[:, 1:]))
        self.model.train()
        return {"eval_loss": float(parallel.all_reduce_mean(torch.stack(losses).mean()))}

    # -----------------------------------------------------------------------------------------
    # State

    def named_local_parameters(self):
        """(name, local tensor) for every parameter and buffer this rank holds."""
        if self.offload is not None:  # host copies read from the store (fp32 masters)
            yield from self.offload.gather_parameters().items()
            yield from self.model.named_buffers()
            return
        model = parallel.unwrap(self.model)
        for name, tensor in model.state_dict(keep_vars=True).items():
            yield name, parallel.local_tensor(tensor.detach() if tensor.requires_grad else tensor)

    def _optimizer_state(self) -> dict:
        if self.offload is not None:
            return self.offload.optimizer_state()
        names = {id(p): n for n, p in parallel.unwrap(self.model).named_parameters()}
        state = {}
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                entries = self.optimizer.state.get(parameter)
                if entries:
                    state[names[id(parameter)]] = {
                        key: parallel.local_tensor(value) for key, value in entries.items()
                    }
        return state

    def state_dict(self) -> dict:
        """The whole state of this rank: tensors are local (sharded under FSDP), the rest JSON."""
        return {
            "model": dict(self.named_local_parameters()),
            "optim": self._optimizer_state(),
            "schedule": self.schedule.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "step": self.step,
            "totals": dict(self.totals),
            # Stochastic-rounding counters of quantized layers (JSON); empty without a recipe.
            "quant": self._quant_state(),
        }

    def _quant_state(self) -> dict:
        if self.config.quant.recipe in ("bf16", "none"):
            return {}
        from stalwart.quant.recipes import quant_state_dict

        return quant_state_dict(parallel.unwrap(self.model))

    def reserve_restore_memory(
        self, fits: Callable[[int], bool] = lambda nbytes: True, tensors_per_parameter: int = 2
    ) -> int:
        """Allocate and touch, ahead of a restore, the memory the optimizer state will need
        (`tensors_per_parameter` tensors shaped like each CPU parameter without state: AdamW's
        two moments), if `fits(bytes)` allows it. A standby worker calls it while idle, so that
        `restore_targets` fills memory that is already mapped instead of page-faulting a
        gigabyte inside a recovery. Released at the first `train_step` if no restore comes.
        Returns the bytes reserved."""
        if self.offload is not None:
            return 0
        parameters = [
            parameter
            for parameter in parallel.unwrap(self.model).parameters()
            if parameter.device.type == "cpu"
            and parallel.local_tensor(parameter) is parameter
            and not self.optimizer.state.get(parameter)
        ]
        nbytes = tensors_per_parameter * sum(parameter.nbytes for parameter in parameters)
        if not fits(nbytes):
            return 0
        pool: dict[tuple, list[torch.Tensor]] = {}
        for parameter in parameters:
            key = (tuple(parameter.shape), parameter.dtype)
            for _ in range(tensors_per_parameter):
                pool.setdefault(key, []).append(torch.zeros(parameter.shape, dtype=parameter.dtype))
        self._reserved_state = pool
        return nbytes

    @torch.no_grad()
    def restore_targets(self, entries: Iterable = ()) -> dict[str, torch.Tensor]:
        """The live tensors `load_state_dict` copies a snapshot's entries into, by snapshot
        entry name ("model/<param>", "optim/<param>/<key>"), so that a restore can verify and
        write each entry in one pass (`snapshot.agent.load_snapshot`, `snapshot.restore`).

        `entries` (the snapshot's layout entries: name, shape, torch_dtype): AdamW state this
        Trainer has not created yet (a fresh one) is allocated for them now, uninitialised, in
        the snapshot's order, dtype and shape (as `load_state_dict` would, so a later snapshot
        has the same layout). CPU parameters only. Empty when offloaded (its state lives in
        the offload store)."""
        if self.offload is not None:
            return {}
        named = dict(parallel.unwrap(self.model).named_parameters())
        for entry in entries:
            kind, _, rest = entry.name.partition("/")
            name, _, key = rest.rpartition("/")
            parameter = named.get(name)
            if kind != "optim" or parameter is None or parameter.device.type != "cpu":
                continue
            if parallel.local_tensor(parameter) is not parameter:
                continue  # sharded: load_state_dict builds its state
            slot = self.optimizer.state.setdefault(parameter, {})
            if key not in slot:
                pool = self._reserved_state.get((tuple(entry.shape), entry.torch_dtype))
                slot[key] = (
                    pool.pop() if pool else torch.empty(entry.shape, dtype=entry.torch_dtype)
                )
        self._reserved_state = {}
        targets = {f"model/{name}": tensor for name, tensor in self.named_local_parameters()}
        for name, state in self._optimizer_state().items():
            for key, value in state.items():
                targets[f"optim/{name}/{key}"] = value
        return targets

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Copy a state into this rank's tensors in place (same world size and strategy)."""
        if self.offload is not None:
            self.offload.load_parameters_and_state(state["model"], state["optim"])
            for name, buffer in self.model.named_buffers():
                buffer.copy_(state["model"][name])
        else:
            self._load_model_and_optimizer(state)
        self.schedule.load_state_dict(state["schedule"])
        self.sampler.load_state_dict(state["sampler"])
        load_rng_state(state["rng"])
        self.step = int(state["step"])
        self.totals = {key: int(value) for key, value in state["totals"].items()}
        if state.get("quant"):
            from stalwart.quant.recipes import load_quant_state_dict

            load_quant_state_dict(parallel.unwrap(self.model), state["quant"])

    def _load_model_and_optimizer(self, state: dict) -> None:
        local = dict(self.named_local_parameters())
        missing = set(local) - set(state["model"])
        if missing:
            raise ValueError(f"state has no values for parameters {sorted(missing)[:5]}")
        for name, tensor in local.items():
            tensor.copy_(state["model"][name])
        named = dict(parallel.unwrap(self.model).named_parameters())
        for name, entries in state["optim"].items():
            parameter = named[name]
            slot = self.optimizer.state.setdefault(parameter, {})
            for key, value in entries.items():
                if key not in slot:
                    template = parameter if value.dim() else None
                    slot[key] = (
                        torch.empty_like(template) if template is not None else value.clone()
                    )
                parallel.local_tensor(slot[key]).copy_(value)


@contextlib.contextmanager
def _restore_gradient_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _offload_engine(model, config: RunConfig, world_size: int, run_dir: Path):
    """The offload engine for `offload.device: cpu|nvme` (one rank, no quantization recipe);
    `trainer.precision: bf16` selects bf16 working parameters with fp32 master weights."""
    from stalwart.offload.engine import OffloadEngine
    from stalwart.offload.loss import TokenCrossEntropy

    if world_size > 1:
        raise ValueError(
            f"offload.device={config.offload.device!r} with parallel.world_size={world_size}: "
            "offloaded training runs on one rank; set parallel.world_size: 1"
        )
    if config.quant.recipe not in ("bf16", "none"):
        raise ValueError(
            f"offload.device={config.offload.device!r} with quant.recipe={config.quant.recipe!r}: "
            "the offload engine trains unquantized layers; set quant.recipe: bf16"
        )
    engine = OffloadEngine(
        model,
        config.offload,
        config.optim,
        loss_fn=TokenCrossEntropy(),  # the engine may run the LM head and loss in chunks
        run_dir=run_dir,
        precision=config.trainer.precision,
    )
    micro_batch = config.trainer.batch_size // config.trainer.grad_accum_steps
    try:  # a micro-batch too long for the host budget fails here, before any step
        engine.check_activation_room(
            micro_batch * config.model.context_length, config.model.context_length
        )
    except ValueError:
        engine.close()
        raise
    return engine

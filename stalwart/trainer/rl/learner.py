"""The RL learner: policy + optimizer, one policy-gradient step per batch of scored groups.

Its whole state is small and explicit: model parameters, AdamW moments, the schedule position,
the weights version and the count of supervised warm-up steps. `RLLearner` speaks the snapshot
agent's trainer protocol (`state_dict()` / `load_state_dict()`, `before_optimizer_hooks`,
`after_step_hooks`), so a `stalwart.snapshot.agent.SnapshotAgent` copies it into the node's
`SnapshotManager` off the hot path exactly as it does for a training rank, and
`stalwart.snapshot.restore.load_from_manager` rebuilds an identical learner from the manager's
memory; stepping the rebuilt learner on the same batch gives bit-identical weights. The AdamW
state is materialised at construction, so the snapshot layout is the same from version 0 on.
`state()` packs the same tree into one flat buffer (tests, single-process use).

A step: optionally drop zero-variance groups (identical rewards teach nothing; not resampled),
compute advantages (group mean baseline, group or batch std), recompute the sampled tokens'
log-probabilities under the current weights, apply the configured loss (GRPO, DAPO, CISPO) and
aggregation, clip gradients, step AdamW. The version increases by one every step, also when
filtering left nothing to learn from, so versions count learner steps. The before-optimizer
hooks run right before the parameters change (a snapshot of the previous version must have
finished copying), the after-step hooks with the new version once the step is complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from stalwart.config import RunConfig
from stalwart.data.tokenizer import ByteTokenizer
from stalwart.trainer.optim import WarmupCosine, build_optimizer
from stalwart.trainer.rl.losses import (
    LossSettings,
    aggregation_denominator,
    group_advantages,
    policy_loss,
    zero_variance_groups,
)
from stalwart.trainer.rl.packing import Packed, pack, pack_model, unpack
from stalwart.trainer.rl.rollout import build_policy, train_problems
from stalwart.trainer.rl.sampling import sequence_logprobs


def loss_settings(config: RunConfig) -> LossSettings:
    rl = config.rl
    return LossSettings(
        name=rl.loss,
        aggregation=rl.aggregation,
        clip_eps=rl.clip_eps,
        clip_eps_low=rl.clip_eps_low,
        clip_eps_high=rl.clip_eps_high,
        cispo_eps_max=rl.cispo_eps_max,
    )


def collate(groups: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Stack groups of different completion lengths into one right-padded batch."""
    width = max(g["tokens"].shape[1] for g in groups)

    def padded(key: str, fill) -> torch.Tensor:
        parts = []
        for g in groups:
            array = g[key]
            pad = np.full((array.shape[0], width - array.shape[1]), fill, dtype=array.dtype)
            parts.append(np.concatenate([array, pad], axis=1))
        return torch.from_numpy(np.concatenate(parts))

    return {
        "prompts": [g["prompt_ids"] for g in groups for _ in range(g["tokens"].shape[0])],
        "tokens": padded("tokens", pad_token_id).long(),
        "token_mask": padded("token_mask", False).bool(),
        "loss_mask": padded("loss_mask", False).bool(),
        "logprobs": padded("logprobs", 0.0).float(),
        "rewards": torch.from_numpy(np.concatenate([g["rewards"] for g in groups])).float(),
        "group_ids": torch.cat(
            [torch.full((g["tokens"].shape[0],), i) for i, g in enumerate(groups)]
        ),
    }


class RLLearner:
    def __init__(
        self,
        config: RunConfig,
        state: Packed | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
    ):
        torch.set_num_threads(config.rl.learner_num_threads)
        self.config = config
        self.tokenizer = ByteTokenizer()
        self.model = build_policy(config)
        self.model.train()
        self.optimizer = build_optimizer(self.model, config.optim)
        # RL runs at a constant learning rate after a linear warm-up (ScaleRL, verl, TRL).
        self.schedule = WarmupCosine(
            self.optimizer,
            peak_lr=config.optim.lr,
            warmup_steps=config.optim.warmup_steps,
            max_steps=config.trainer.max_steps,
            min_lr_ratio=1.0,
        )
        self.settings = loss_settings(config)
        self.version = 0
        self.num_sft_steps = 0
        self.rank, self.world_size = rank, world_size
        self.before_optimizer_hooks: list[Callable[[int], None]] = []
        self.after_step_hooks: list[Callable[[int], None]] = []
        self._materialise_optimizer_state()
        if state is not None:
            self.load_state(state)

    def attach_process_group(
        self, rank: int, world_size: int, *, sync_parameters: bool = True
    ) -> None:
        """A learner built before it had a rank (a standby) takes its place in a group."""
        self.rank, self.world_size = rank, world_size

    # -- state ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _materialise_optimizer_state(self) -> None:
        """Create AdamW's moments and step counters now, as torch itself would on the first step.

        A snapshot's size may not change between versions (the manager's slots are sized once),
        and version 0 is snapshotted before any step. One step at learning rate 0 on zero
        gradients lets torch build its own state; parameters are put back bit for bit and the
        state is zeroed, so the first real step sees exactly what a fresh optimizer would."""
        saved = [p.detach().clone() for p in self.model.parameters()]
        learning_rates = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        for parameter in self.model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for group, lr in zip(self.optimizer.param_groups, learning_rates):
            group["lr"] = lr
        for parameter, value in zip(self.model.parameters(), saved):
            parameter.copy_(value)
        for entries in self.optimizer.state.values():
            for value in entries.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()

    def weights(self) -> Packed:
        return pack_model(self.model, self.version)

    def state_dict(self) -> dict[str, Any]:
        """The learner's whole state as a tree of live tensors and JSON values (no copies)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        optimizer_state = {
            names[id(parameter)]: dict(entries)
            for parameter, entries in self.optimizer.state.items()
        }
        return {
            "model": {k: v.detach() for k, v in self.model.state_dict().items()},
            "optimizer": optimizer_state,
            "schedule": self.schedule.state_dict(),
            "version": self.version,
            "num_sft_steps": self.num_sft_steps,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy a state tree into the live tensors (the tree may be views over snapshot memory)."""
        self.model.load_state_dict(state["model"])
        named = dict(self.model.named_parameters())
        missing = set(named) - set(state["optimizer"])
        if missing:
            raise ValueError(
                f"learner state has no optimizer entries for {sorted(missing)[:3]}: it was "
                "saved by a different model configuration"
            )
        for name, entries in state["optimizer"].items():
            slot = self.optimizer.state[named[name]]
            for key, value in entries.items():
                slot[key].copy_(value)
        self.schedule.load_state_dict(state["schedule"])
        self.version = int(state["version"])
        self.num_sft_steps = int(state["num_sft_steps"])

    def state(self) -> Packed:
        """`state_dict()` copied into one flat buffer plus JSON layout."""
        return pack(self.state_dict(), self.version)

    def load_state(self, packed: Packed) -> None:
        self.load_state_dict(unpack(packed))

    # -- supervised warm-up ----------------------------------------------------------------------

    def warmup(self, num_steps: int, on_step=None) -> dict[str, float]:
        """Teacher-forced training on "prompt answer<EOS>" (loss on the answer tokens): a policy
        that already solves some problems, as RL starts from a pretrained model. `on_step()`
        runs after each step (the worker reports progress with it)."""
        rl = self.config.rl
        for hook in self.before_optimizer_hooks:  # a snapshot in flight must finish copying
            hook(self.version)
        problems = train_problems(self.config)
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=rl.warmup_sft_lr, weight_decay=0.0
        )
        rng = np.random.default_rng([self.config.trainer.seed, 0x5F7])
        eos = self.tokenizer.eos_id
        start = time.perf_counter()
        losses = []
        for step in range(num_steps):
            lr = rl.warmup_sft_lr * min(1.0, (step + 1) / 20) * (1 - 0.9 * step / max(1, num_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            chosen = [problems[i] for i in rng.integers(0, len(problems), rl.warmup_sft_batch_size)]
            prompts = [self.tokenizer.encode(p.prompt) for p in chosen]
            targets = [self.tokenizer.encode(p.answer) + [eos] for p in chosen]
            width = max(len(t) for t in targets)
            tokens = torch.full((len(targets), width), self.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros((len(targets), width), dtype=torch.bool)
            for row, target in enumerate(targets):
                tokens[row, : len(target)] = torch.tensor(target)
                mask[row, : len(target)] = True
            logprobs = sequence_logprobs(self.model, prompts, tokens, mask)
            loss = -(logprobs.sum() / mask.sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step()
        self.num_sft_steps += num_steps
        return {
            "sft_steps": float(num_steps),
            "sft_final_loss": float(np.mean(losses[-10:])) if losses else 0.0,
            "sft_time_s": time.perf_counter() - start,
        }

    # -- RL step ---------------------------------------------------------------------------------

    def step(self, groups: list[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step on a batch of scored groups; returns metrics."""
        start = time.perf_counter()
        rl = self.config.rl
        metrics: dict[str, float] = {
            "num_groups": float(len(groups)),
            "reward_mean": float(np.mean(np.concatenate([g["rewards"] for g in groups]))),
        }
        if rl.zero_variance_filter:
            kept = [g for g in groups if np.ptp(g["rewards"]) > 0]
            metrics["num_zero_variance_groups"] = float(len(groups) - len(kept))
            groups = kept
        if groups:
            batch = collate(groups, self.tokenizer.pad_id)
            advantages = group_advantages(batch["rewards"], batch["group_ids"], rl.advantage_norm)
            self.optimizer.zero_grad(set_to_none=True)
            output = self._backward(batch, advantages)
            if self.world_size > 1:
                metrics.update(self._all_reduce(output))
            else:
                metrics.update(output.metrics)
            if self.config.optim.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(
                    self.model.parameters(), self.config.optim.grad_clip
                )
                metrics["grad_norm"] = float(norm)
            for hook in self.before_optimizer_hooks:
                hook(self.version + 1)
            self.optimizer.step()
            metrics["zero_variance_fraction"] = float(
                zero_variance_groups(batch["rewards"], batch["group_ids"]).float().mean()
            )
        self.schedule.step()
        self.version += 1
        metrics["version"] = float(self.version)
        metrics["learner_step_s"] = time.perf_counter() - start
        for hook in self.after_step_hooks:
            hook(self.version)
        return metrics

    def _backward(self, batch: dict[str, Any], advantages: torch.Tensor):
        """Loss and gradients of this rank's share of the batch (None: an empty share).

        Data parallel: every rank holds the whole batch (advantages need its statistics) and
        takes the groups ``rank, rank + world_size, ...``; its loss is divided by the whole
        batch's token / sample / group count, so the shares' gradients sum to the gradient of
        the whole batch (`_all_reduce` sums them)."""
        rows = torch.arange(len(batch["prompts"]))
        denominator = None
        if self.world_size > 1:
            denominator = aggregation_denominator(
                batch["loss_mask"], batch["group_ids"], self.settings.resolved_aggregation
            )
            rows = rows[batch["group_ids"] % self.world_size == self.rank]
            if rows.numel() == 0:
                return None
        logprobs = sequence_logprobs(
            self.model,
            [batch["prompts"][i] for i in rows.tolist()],
            batch["tokens"][rows],
            batch["token_mask"][rows],
            temperature=self.config.rl.temperature,
            pad_token_id=self.tokenizer.pad_id,
        )
        output = policy_loss(
            logprobs,
            batch["logprobs"][rows],
            advantages[rows],
            batch["loss_mask"][rows],
            batch["group_ids"][rows],
            self.settings,
            denominator,
        )
        output.loss.backward()
        return output

    def _all_reduce(self, output) -> dict[str, float]:
        """Sum the ranks' gradients (one flat buffer per dtype) and their loss statistics."""
        import torch.distributed as dist

        parameters = list(self.model.parameters())
        for parameter in parameters:
            if parameter.grad is None:  # an empty share, or a parameter outside the graph
                parameter.grad = torch.zeros_like(parameter)
        for dtype in sorted({p.dtype for p in parameters}, key=str):
            same = [p for p in parameters if p.dtype == dtype]
            flat = torch.cat([p.grad.reshape(-1) for p in same])
            dist.all_reduce(flat)
            offset = 0
            for parameter in same:
                size = parameter.numel()
                parameter.grad.copy_(flat[offset : offset + size].view_as(parameter))
                offset += size
        local = output.metrics if output is not None else {}
        tokens = local.get("num_tokens", 0.0)
        sums = torch.tensor(
            [
                local.get("loss", 0.0),
                local.get("clip_fraction", 0.0) * tokens,
                local.get("ratio_mean", 0.0) * tokens,
                local.get("kl_generator_learner", 0.0) * tokens,
                tokens,
            ],
            dtype=torch.float64,
        )
        dist.all_reduce(sums)
        peak = torch.tensor([local.get("ratio_max", 0.0)], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        total = max(float(sums[4]), 1.0)
        return {
            "loss": float(sums[0]),
            "clip_fraction": float(sums[1]) / total,
            "ratio_mean": float(sums[2]) / total,
            "kl_generator_learner": float(sums[3]) / total,
            "num_tokens": float(sums[4]),
            "ratio_max": float(peak[0]),
            "learner_ranks": float(self.world_size),
        }

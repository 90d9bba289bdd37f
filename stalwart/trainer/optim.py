"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, optim_config) -> torch.optim.Optimizer:
    """AdamW; weight decay applies to 2-D+ weights, never to norms, biases or gains.

    The fused kernel is used where the device and the parameter types allow it; its result is
    deterministic for a fixed world size like the foreach one.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": optim_config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = dict(
        lr=optim_config.lr, betas=(optim_config.beta1, optim_config.beta2), eps=optim_config.eps
    )
    fused = optim_config.fused
    if fused is None:
        fused = _fused_supported(decay + no_decay)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def _fused_supported(parameters) -> bool:
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in parameters):
        return False
    return all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in parameters)


class WarmupCosine:
    """Linear warmup to the peak LR, then cosine decay to `min_lr_ratio` x peak at max_steps."""

    def __init__(
        self, optimizer, *, peak_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float
    ):
        self.optimizer = optimizer
        self.peak_lr = peak_lr
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr_ratio = min_lr_ratio
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.peak_lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)

    @property
    def lr(self) -> float:
        return self.lr_at(self.step_count)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()

"""Policy-gradient losses for RL with verifiable rewards: GRPO, DAPO and CISPO.

This file owns the arithmetic of one learner step: group advantages (group mean baseline,
group- or batch-std normalisation), the per-token surrogate of each loss, and the three
aggregation modes that turn per-token terms into one scalar:

- ``sample``: mean over a sequence's tokens, then mean over sequences (GRPO's original form);
- ``token``: sum over every token of the batch divided by the number of tokens (DAPO);
- ``prompt``: mean over the tokens of each prompt's group, then mean over prompts, so every
  prompt weighs the same whatever its sample lengths (ScaleRL).

Token ratio: ``rho = exp(logp_learner - logp_generator)``. GRPO and DAPO clip the ratio inside a
``min(rho*A, clip(rho)*A)`` surrogate, so a clipped token gets no gradient. CISPO multiplies the
log-probability by a detached, capped weight ``min(rho, eps_max) * A``: every token keeps its
gradient, the cap only bounds its size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_NAMES = ("grpo", "dapo", "cispo")
AGGREGATIONS = ("sample", "token", "prompt")
ADVANTAGE_NORMS = ("group", "batch", "none")
DEFAULT_AGGREGATION = {"grpo": "sample", "dapo": "token", "cispo": "token"}


@dataclass(frozen=True)
class LossSettings:
    """What defines a policy loss. Bad values raise ``ValueError`` naming the field."""

    name: str = "grpo"
    aggregation: str | None = None  # None: the loss's own default (DEFAULT_AGGREGATION)
    clip_eps: float = 0.2  # GRPO: symmetric clip [1 - eps, 1 + eps]
    clip_eps_low: float = 0.2  # DAPO: lower clip 1 - eps_low
    clip_eps_high: float = 0.28  # DAPO: upper clip 1 + eps_high ("clip-higher")
    cispo_eps_max: float = 4.0  # CISPO: cap of the detached importance weight

    def __post_init__(self) -> None:
        if self.name not in LOSS_NAMES:
            raise ValueError(f"rl.loss is {self.name!r}; choose one of {', '.join(LOSS_NAMES)}")
        if self.aggregation is not None and self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"rl.aggregation is {self.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}"
            )
        for field in ("clip_eps", "clip_eps_low", "clip_eps_high", "cispo_eps_max"):
            if not getattr(self, field) > 0:
                raise ValueError(f"rl.{field} is {getattr(self, field)!r}; it must be > 0")

    @property
    def resolved_aggregation(self) -> str:
        return self.aggregation or DEFAULT_AGGREGATION[self.name]


# ---------------------------------------------------------------------------------------------
# Advantages


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, norm: str = "group", eps: float = 1e-6
) -> torch.Tensor:
    """Per-sample advantages: reward minus its group's mean, then normalised.

    ``norm="group"`` divides by the group's standard deviation (GRPO), ``"batch"`` by the standard
    deviation of all advantages in the batch (ScaleRL), ``"none"`` leaves the centred reward.
    Standard deviations are population ones (ddof=0), so a group of identical rewards has
    advantage exactly 0 whatever the normalisation.
    """
    if norm not in ADVANTAGE_NORMS:
        raise ValueError(
            f"rl.advantage_norm is {norm!r}; choose one of {', '.join(ADVANTAGE_NORMS)}"
        )
    rewards = rewards.to(torch.float32)
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be "
            "1-D tensors of the same length"
        )
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = torch.zeros(num_groups).index_add_(0, inverse, torch.ones_like(rewards))
    means = torch.zeros(num_groups).index_add_(0, inverse, rewards) / counts
    centred = rewards - means[inverse]
    if norm == "group":
        variances = torch.zeros(num_groups).index_add_(0, inverse, centred**2) / counts
        return centred / (variances.sqrt()[inverse] + eps)
    if norm == "batch":
        return centred / (centred.std(correction=0) + eps)
    return centred


def zero_variance_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask over samples: True where the sample's group has identical rewards."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    group_max = torch.full((num_groups,), -torch.inf).scatter_reduce(
        0, inverse, rewards.float(), reduce="amax"
    )
    group_min = torch.full((num_groups,), torch.inf).scatter_reduce(
        0, inverse, rewards.float(), reduce="amin"
    )
    return (group_max == group_min)[inverse]


# ---------------------------------------------------------------------------------------------
# Aggregation


def aggregation_denominator(mask: torch.Tensor, group_ids: torch.Tensor, mode: str) -> float:
    """What `aggregate` divides by in ``mode``: the batch's count of tokens (``token``),
    samples (``sample``) or prompt groups (``prompt``)."""
    if mode == "token":
        return float(mask.sum())
    if mode == "sample":
        return float(group_ids.numel())
    if mode == "prompt":
        return float(torch.unique(group_ids).numel())
    raise ValueError(f"rl.aggregation is {mode!r}; choose one of {', '.join(AGGREGATIONS)}")


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    mode: str,
    denominator: float | None = None,
) -> torch.Tensor:
    """Reduce per-token terms [N, T] under ``mask`` to one scalar (see the module docstring).

    ``denominator``: the whole batch's `aggregation_denominator` when these rows are one rank's
    share of a data-parallel batch. The result is then this share's contribution, and the
    shares' contributions sum to the value of the whole batch (whole groups per rank: a
    prompt's mean needs all of its samples).
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"rl.aggregation is {mode!r}; choose one of {', '.join(AGGREGATIONS)}")
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if mode == "token":
        if denominator is not None:
            return masked.sum() / max(float(denominator), 1.0)
        return masked.sum() / mask.sum().clamp_min(1.0)
    if mode == "sample":
        per_sample = masked.sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        if denominator is not None:
            return per_sample.sum() / max(float(denominator), 1.0)
        return per_sample.mean()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1
    group_sums = torch.zeros(num_groups, dtype=per_token.dtype).index_add(
        0, inverse, masked.sum(dim=1)
    )
    group_tokens = torch.zeros(num_groups, dtype=per_token.dtype).index_add(
        0, inverse, mask.sum(dim=1)
    )
    group_means = group_sums / group_tokens.clamp_min(1.0)
    if denominator is not None:
        return group_means.sum() / max(float(denominator), 1.0)
    return group_means.mean()


# ---------------------------------------------------------------------------------------------
# Losses


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float]


def policy_loss(
    logprobs: torch.Tensor,
    generator_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    settings: LossSettings,
    denominator: float | None = None,
) -> LossOutput:
    """The loss to minimise for one batch.

    logprobs: [N, T] learner log-probabilities of the sampled tokens (with grad).
    generator_logprobs: [N, T] log-probabilities under the weights that generated them.
    advantages: [N] per-sample advantages. mask: [N, T] tokens that count (generated ones).
    group_ids: [N] prompt index of each sample (for prompt-level aggregation).
    denominator: see `aggregate` (one rank's share of a data-parallel batch).
    """
    if logprobs.shape != generator_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, generator_logprobs "
            f"{tuple(generator_logprobs.shape)} and mask {tuple(mask.shape)} must match"
        )
    mask = mask.to(torch.bool)
    log_ratio = (logprobs - generator_logprobs.detach()).masked_fill(~mask, 0.0)
    ratio = torch.exp(log_ratio)
    token_advantages = advantages.detach().to(logprobs.dtype)[:, None].expand_as(logprobs)

    if settings.name == "cispo":
        weight = ratio.detach().clamp(max=settings.cispo_eps_max)
        per_token = -(weight * token_advantages * logprobs)
        capped = ratio.detach() > settings.cispo_eps_max
    else:
        if settings.name == "grpo":
            low, high = 1.0 - settings.clip_eps, 1.0 + settings.clip_eps
        else:
            low, high = 1.0 - settings.clip_eps_low, 1.0 + settings.clip_eps_high
        unclipped = ratio * token_advantages
        clipped = ratio.clamp(low, high) * token_advantages
        per_token = -torch.minimum(unclipped, clipped)
        # A token is clipped (no gradient) where the clipped branch is the active minimum.
        capped = clipped < unclipped

    loss = aggregate(per_token, mask, group_ids, settings.resolved_aggregation, denominator)
    num_tokens = mask.sum().clamp_min(1)
    with torch.no_grad():
        metrics = {
            "loss": float(loss.detach()),
            "clip_fraction": float((capped & mask).sum() / num_tokens),
            "ratio_mean": float((ratio * mask).sum() / num_tokens),
            "ratio_max": float(ratio.masked_fill(~mask, 0.0).max()) if mask.any() else 0.0,
            # k3 estimator of KL(generator || learner), a staleness/mismatch signal.
            "kl_generator_learner": float(((ratio - 1.0 - log_ratio) * mask).sum() / num_tokens),
            "num_tokens": float(mask.sum()),
        }
    return LossOutput(loss=loss, metrics=metrics)

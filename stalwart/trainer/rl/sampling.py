"""Batched sampling with a KV cache, and the log-probabilities the learner needs.

`generate` samples completions for a batch of prompts from our GPT (its `new_kv_cache` API) or
from any Hugging Face causal LM (its own `past_key_values`), with temperature, top-p, a
maximum number of new tokens and stop tokens. Prompts are left-padded; every row keeps its own
positions, so a padded row generates exactly what it would alone.

Each sampled token comes with its log-probability under the generating weights, taken from the
temperature-scaled distribution (top-p only restricts which tokens may be drawn, as in vLLM).
`sequence_logprobs` recomputes the same quantity with a full forward pass for the learner, so
on-policy ratios are 1 up to floating-point rounding.

Length cap with a forced answer (ScaleRL): a row still going at a random point between
`interrupt_min_tokens` and `interrupt_max_tokens` gets `interrupt_token_ids` appended (not
sampled, excluded from the loss) and then `answer_tokens` more sampled tokens before it is cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = (257,)
    pad_token_id: int = 258
    interrupt_min_tokens: int | None = None  # None: no forced-answer interruption
    interrupt_max_tokens: int | None = None
    interrupt_token_ids: tuple[int, ...] = ()
    answer_tokens: int = 8

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"rl.temperature is {self.temperature}; it must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rl.top_p is {self.top_p}; it must lie in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"rl.max_new_tokens is {self.max_new_tokens}; it must be >= 1")
        if self.interrupt_min_tokens is not None:
            low, high = self.interrupt_min_tokens, self.interrupt_max_tokens
            if high is None or not 1 <= low <= high:
                raise ValueError(
                    f"rl.interrupt_at is [{low}, {high}]; give [min, max] with 1 <= min <= max"
                )
            if not self.interrupt_token_ids:
                raise ValueError("rl.interrupt_text is empty; the forced answer needs a prompt")

    @property
    def max_completion_tokens(self) -> int:
        if self.interrupt_max_tokens is None:
            return self.max_new_tokens
        return self.interrupt_max_tokens + len(self.interrupt_token_ids) + self.answer_tokens


@dataclass
class Generation:
    """Completions of a batch, one row per sample, right-padded to a common length."""

    tokens: torch.Tensor  # [N, L] int64 completion tokens (pad after the end)
    logprobs: torch.Tensor  # [N, L] float32 log p_generator(token); 0 where not sampled
    loss_mask: torch.Tensor  # [N, L] bool: sampled by the policy (not forced, not padding)
    token_mask: torch.Tensor  # [N, L] bool: real tokens (sampled or forced)
    entropies: torch.Tensor  # [N, L] float32 per-step entropy of the sampling distribution
    finished: torch.Tensor  # [N] bool: ended with a stop token
    interrupted: torch.Tensor  # [N] bool: received the forced answer prompt
    extra: dict = field(default_factory=dict)

    def completion_ids(self, row: int) -> list[int]:
        return self.tokens[row][self.token_mask[row]].tolist()


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, P] and real-token mask [B, P] of left-padded prompts."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = True
    return tokens, mask


# ---------------------------------------------------------------------------------------------
# Model adapters: one incremental step for our GPT and for Hugging Face models


def _hf_model(model: nn.Module) -> nn.Module | None:
    """The transformers model inside (or equal to) ``model``, or None for our GPT."""
    inner = getattr(model, "model", None)
    for candidate in (inner, model):
        if candidate is not None and hasattr(candidate, "generation_config"):
            return candidate
    return None


class _GPTStepper:
    def __init__(self, model: nn.Module, batch_size: int, max_length: int):
        context = model.config.context_length
        if max_length > context:
            raise ValueError(
                f"prompt + completion needs {max_length} positions but model.context_length is "
                f"{context}; lower rl.max_new_tokens (or the interruption budget) or raise it"
            )
        self.model = model
        self.cache = model.new_kv_cache(batch_size, max_length)

    def __call__(self, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, kv_cache=self.cache, padding_mask=padding_mask)[:, -1].float()


class _HFStepper:
    """Incremental decoding through the model's own cache (``cache`` in transformers >= 5.x,
    ``past_key_values`` before)."""

    def __init__(self, model: nn.Module, batch_size: int, max_length: int):
        import inspect

        self.model = model
        parameters = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.cache = None

    def __call__(self, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        positions = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -tokens.shape[1] :]
        output = self.model(
            input_ids=tokens,
            attention_mask=padding_mask.long(),
            position_ids=positions,
            use_cache=True,
            **{self.cache_argument: self.cache},
        )
        self.cache = getattr(output, self.cache_argument)
        return output.logits[:, -1].float()


def _stepper(model: nn.Module, batch_size: int, max_length: int):
    hf = _hf_model(model)
    if hf is not None:
        return _HFStepper(hf, batch_size, max_length)
    if not hasattr(model, "new_kv_cache"):
        raise ValueError(
            f"{type(model).__name__} is neither a stalwart GPT (new_kv_cache) nor a "
            "transformers causal LM (past_key_values); it cannot generate"
        )
    return _GPTStepper(model, batch_size, max_length)


def cast_lm_head_to_fp32(model: nn.Module) -> nn.Module:
    """Keep the LM head (and so logits and log-probabilities) in FP32 in a low-precision model.

    Our GPT already computes its head in FP32. For a Hugging Face model the head's weight is
    cast to FP32 and its input is upcast by a pre-hook, so generator and learner see the same
    FP32 logits whatever the body's dtype (ScaleRL: A 0.52 -> 0.61).
    """
    hf = _hf_model(model)
    if hf is None:
        return model
    head = hf.get_output_embeddings()
    if head is None or getattr(head, "_stalwart_fp32", False):
        return model
    head.float()
    head.register_forward_pre_hook(lambda module, args: tuple(a.float() for a in args))
    head._stalwart_fp32 = True
    return model


# ---------------------------------------------------------------------------------------------
# Sampling


def _filter_top_p(probabilities: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return probabilities
    sorted_probs, order = probabilities.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # keeps the top token always
    filtered = torch.zeros_like(probabilities).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(-1, keepdim=True)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
) -> Generation:
    """Sample one completion per prompt (repeat a prompt n times for n samples)."""
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompts, settings, generator)
    finally:
        model.train(was_training)


def _generate(model, prompts, settings: SamplingSettings, generator) -> Generation:
    device = next(model.parameters()).device
    prompt_tokens, prompt_mask = left_pad(prompts, settings.pad_token_id)
    prompt_tokens, prompt_mask = prompt_tokens.to(device), prompt_mask.to(device)
    batch, prompt_width = prompt_tokens.shape
    limit = settings.max_completion_tokens
    step = _stepper(model, batch, prompt_width + limit)

    stop_ids = torch.tensor(list(settings.stop_token_ids) or [-1], device=device)
    forced_ids = torch.tensor(list(settings.interrupt_token_ids) or [0], device=device)
    num_forced = len(settings.interrupt_token_ids)
    if settings.interrupt_min_tokens is not None:
        cut_at = torch.randint(
            settings.interrupt_min_tokens,
            settings.interrupt_max_tokens + 1,
            (batch,),
            generator=generator,
        ).to(device)
        thinking_budget = cut_at
    else:
        cut_at = torch.full((batch,), limit + 1, device=device)
        thinking_budget = torch.full((batch,), settings.max_new_tokens, device=device)

    tokens = torch.full((batch, limit), settings.pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, limit), device=device)
    entropies = torch.zeros((batch, limit), device=device)
    loss_mask = torch.zeros((batch, limit), dtype=torch.bool, device=device)
    token_mask = torch.zeros((batch, limit), dtype=torch.bool, device=device)
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    interrupted = torch.zeros(batch, dtype=torch.bool, device=device)
    forced_position = torch.full((batch,), -1, device=device)  # index into forced ids, -1 = none
    answered = torch.zeros(batch, dtype=torch.long, device=device)  # tokens after the forcing

    padding_mask = prompt_mask
    logits = step(prompt_tokens, padding_mask)
    for position in range(limit):
        # Rows that reach their cut point start (or continue) the forced answer prompt.
        start_forcing = alive & (forced_position < 0) & (position == cut_at) & ~finished
        forced_position = torch.where(
            start_forcing, torch.zeros_like(forced_position), forced_position
        )
        interrupted |= start_forcing
        forcing = alive & (forced_position >= 0) & (forced_position < num_forced)

        scaled = logits / settings.temperature if settings.temperature > 0 else logits
        log_distribution = F.log_softmax(scaled, dim=-1)
        distribution = log_distribution.exp()
        if settings.temperature > 0:
            sampled = torch.multinomial(
                _filter_top_p(distribution, settings.top_p), 1, generator=generator
            ).squeeze(1)
        else:
            sampled = logits.argmax(-1)
        forced_token = forced_ids[forced_position.clamp(0, num_forced - 1)]
        chosen = torch.where(forcing, forced_token, sampled)
        chosen = torch.where(alive, chosen, torch.full_like(chosen, settings.pad_token_id))

        sampled_here = alive & ~forcing
        tokens[:, position] = chosen
        token_mask[:, position] = alive
        loss_mask[:, position] = sampled_here
        logprobs[:, position] = torch.where(
            sampled_here, log_distribution.gather(1, chosen[:, None]).squeeze(1), 0.0
        )
        entropies[:, position] = torch.where(
            sampled_here, -(distribution * log_distribution).nan_to_num().sum(-1), 0.0
        )

        # Advance each row's state machine.
        hit_stop = sampled_here & torch.isin(chosen, stop_ids)
        finished |= hit_stop
        forced_position = torch.where(forcing, forced_position + 1, forced_position)
        answering = sampled_here & (forced_position >= num_forced)
        answered += answering.long()
        generated = position + 1
        out_of_budget = (forced_position < 0) & (generated >= thinking_budget) & (cut_at > limit)
        out_of_answer = (forced_position >= num_forced) & (answered >= settings.answer_tokens)
        alive = alive & ~hit_stop & ~out_of_budget & ~out_of_answer
        if not alive.any():
            break
        padding_mask = torch.cat(
            [padding_mask, alive[:, None] | token_mask[:, position : position + 1]], 1
        )
        logits = step(chosen[:, None], padding_mask)

    used = int(token_mask.sum(1).max().item()) if token_mask.any() else 0
    return Generation(
        tokens=tokens[:, :used].cpu(),
        logprobs=logprobs[:, :used].cpu(),
        loss_mask=loss_mask[:, :used].cpu(),
        token_mask=token_mask[:, :used].cpu(),
        entropies=entropies[:, :used].cpu(),
        finished=finished.cpu(),
        interrupted=interrupted.cpu(),
    )


# ---------------------------------------------------------------------------------------------
# Learner side


def sequence_logprobs(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    pad_token_id: int = 258,
) -> torch.Tensor:
    """log p(completion token) [N, L] under ``model`` (with grad), temperature-scaled.

    ``completions`` [N, L] and ``completion_mask`` [N, L] (real tokens, sampled or forced) come
    from `generate`; positions outside the mask hold 0.
    """
    prompt_tokens, prompt_mask = left_pad(prompts, pad_token_id)
    device = next(model.parameters()).device
    completions = completions.to(device)
    completion_mask = completion_mask.to(device)
    tokens = torch.cat([prompt_tokens.to(device), completions], dim=1)
    mask = torch.cat([prompt_mask.to(device), completion_mask], dim=1)
    hf = _hf_model(model)
    if hf is not None:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = hf(input_ids=tokens, attention_mask=mask.long(), position_ids=positions).logits
    else:
        logits = model(tokens, padding_mask=mask)
    prompt_width = prompt_tokens.shape[1]
    # The logits at position t predict token t + 1.
    predicting = logits[:, prompt_width - 1 : -1].float()
    if temperature > 0:
        predicting = predicting / temperature
    log_distribution = F.log_softmax(predicting, dim=-1)
    chosen = log_distribution.gather(-1, completions[..., None]).squeeze(-1)
    return chosen.masked_fill(~completion_mask, 0.0)

"""Next-token cross-entropy whose logits never exist all at once.

A language model's logits are the largest activation of a step whose vocabulary is large: one
micro-batch of T tokens holds T x V of them, and the loss's float32 copy, its softmax and its
gradient hold three more (at T = 4096 and V = 128k, about 6 GiB). Under a host-memory budget
of a few GiB that term alone would not fit.

`TokenCrossEntropy` is the loss the offload engine knows how to split: mean cross-entropy of
logits [..., V] against integer targets, positions equal to `ignore_index` left out. Called on
logits it is plain `F.cross_entropy` on their float32 copy. When the engine trains with it, it
routes the LM head around the model's forward (the model returns its final hidden states) and
calls `chunked_head_loss`: the head runs on `chunk_tokens` rows at a time, each chunk's loss is
summed in float32 and its logits dropped; the backward recomputes each chunk's logits and turns
them into that chunk's gradients at once. Memory for the head and loss: one chunk's logits in
place of all of them, plus the hidden states [T, H] that the head needs anyway.

Arithmetic: each chunk runs the head's own forward (its dtype and casts), so the logits are the
ones the unchunked model computes (row by row; matrix kernels may block rows differently, so
within float rounding). The loss is the sum of chunk sums divided by the count, and the head's
weight gradient a sum of per-chunk products, each as the head's own backward gives it (for a
bf16 head, rounded to bf16), summed in float32 and cast once: equal to the unchunked loss and
gradients within float tolerance, not bit for bit (tests/offload/test_chunked_loss.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class TokenCrossEntropy:
    """Mean cross-entropy over tokens; the offload engine may compute it in chunks.

    `chunk_tokens`: rows of logits per chunk; None lets the engine choose from its activation
    allowance (chunking only when the whole logits would take more than a quarter of it); 0
    turns chunking off."""

    def __init__(self, chunk_tokens: int | None = None, ignore_index: int = -100):
        if chunk_tokens is not None and chunk_tokens < 0:
            raise ValueError(f"chunk_tokens must be >= 0 (0 = never chunk), got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens
        self.ignore_index = ignore_index

    def __call__(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=self.ignore_index,
        )


def chunked_head_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Linear,
    head_forward: Callable[[torch.Tensor], torch.Tensor],
    chunk_tokens: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of `head_forward(hidden)` against `targets`, `chunk_tokens` rows of
    logits at a time. `head` is the module whose parameters `head_forward` uses: their
    gradients are returned through this function's autograd node, once, after every chunk."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
    return _ChunkedHeadLoss.apply(
        hidden, targets, head_forward, params, chunk_tokens, ignore_index, *params
    )


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, targets, head_forward, params, chunk_tokens, ignore_index, *_tensors):
        flat = hidden.reshape(-1, hidden.shape[-1])
        flat_targets = targets.reshape(-1).to(flat.device)
        if flat_targets.shape[0] != flat.shape[0]:
            raise ValueError(
                f"targets hold {flat_targets.shape[0]} tokens but the hidden states "
                f"{flat.shape[0]}: pass targets of shape {tuple(hidden.shape[:-1])}"
            )
        total = torch.zeros((), dtype=torch.float32, device=flat.device)
        for start in range(0, flat.shape[0], chunk_tokens):
            logits = head_forward(flat[start : start + chunk_tokens])
            total += F.cross_entropy(
                logits.float(),
                flat_targets[start : start + chunk_tokens],
                ignore_index=ignore_index,
                reduction="sum",
            )
            del logits
        count = int((flat_targets != ignore_index).sum())
        ctx.save_for_backward(hidden, flat_targets)
        ctx.head_forward, ctx.params = head_forward, params
        ctx.chunk_tokens, ctx.ignore_index, ctx.count = chunk_tokens, ignore_index, count
        # An all-ignored batch gives NaN, as F.cross_entropy's mean does.
        return total / count if count else total * float("nan")

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, flat_targets = ctx.saved_tensors
        params = ctx.params
        flat = hidden.detach().reshape(-1, hidden.shape[-1])
        want_hidden = ctx.needs_input_grad[0]
        want = [ctx.needs_input_grad[6 + i] for i in range(len(params))]
        grad_hidden = torch.empty_like(flat) if want_hidden else None
        # Summed over chunks in float32 whatever the parameters' dtype, cast once at the end.
        grad_params = [
            torch.zeros_like(p, dtype=torch.float32) if w else None for p, w in zip(params, want)
        ]
        scale = grad_loss.float() / ctx.count if ctx.count else grad_loss.float() * float("nan")
        wanted = [p for p, w in zip(params, want) if w]
        for start in range(0, flat.shape[0], ctx.chunk_tokens):
            rows = flat[start : start + ctx.chunk_tokens].detach().requires_grad_(want_hidden)
            with torch.enable_grad():
                logits = ctx.head_forward(rows)
                chunk_loss = F.cross_entropy(
                    logits.float(),
                    flat_targets[start : start + ctx.chunk_tokens],
                    ignore_index=ctx.ignore_index,
                    reduction="sum",
                )
                inputs = ([rows] if want_hidden else []) + wanted
                grads = torch.autograd.grad(chunk_loss * scale, inputs) if inputs else []
            del logits, chunk_loss
            position = 0
            if want_hidden:
                grad_hidden[start : start + ctx.chunk_tokens] = grads[0]
                position = 1
            for index, needed in enumerate(want):
                if needed:
                    grad_params[index] += grads[position]
                    position += 1
        if grad_hidden is not None:
            grad_hidden = grad_hidden.view(hidden.shape)
        grad_params = [None if g is None else g.to(p.dtype) for g, p in zip(grad_params, params)]
        return (grad_hidden, None, None, None, None, None, *grad_params)

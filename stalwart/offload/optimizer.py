"""The out-of-core AdamW: its kernels, its settings, and the clipping/overflow rule.

The engine (`engine.py`) calls `OutOfCoreAdamW.update_unit` for one layer as soon as that layer's
gradients are complete, while the backward of the remaining layers goes on; the layer's
optimizer state (exp_avg, exp_avg_sq) has been streamed NVMe -> host by then, is updated in
place here, and the engine streams it back with the new parameters.

Kernels: DeepSpeed's CPU Adam (AVX, OpenMP) when the op builds, else torch's fused AdamW CPU
kernel. The torch kernel is the one `torch.optim.AdamW(fused=True)` runs, so the offloaded step
is bit-identical to the in-memory one; DeepSpeed's kernel orders its arithmetic differently and
agrees to float32 rounding (about 1e-7 relative per step).

Clipping and non-finite gradients, overlapped with backward. Every layer is updated
*speculatively* with its unclipped gradient and written to the other of two state versions on
NVMe; the committed version is untouched. With clipping on, the layer's final gradient is also
written to its gradient span (4 extra bytes per parameter). When the backward ends the global
norm is known:
- finite and at most `grad_clip` (or clipping off): the speculative version is committed;
- not finite: the step is skipped (the committed version stays; the step counter does not move);
- above `grad_clip`: the speculative version is discarded and every layer is updated again,
  from the committed state and the stored gradients times the clip coefficient, giving exactly
  `clip_grad_norm_` followed by AdamW. A clipped step costs one more pass of optimizer I/O
  (14 bytes read and 14 written per parameter with bf16 working copies), not another forward
  and backward.
Because clipping tends to persist, the step after a clipped one does not speculate: it only
writes gradients during backward (DeepSpeed's order). The update of a clipped or deferred step
is not a separate pass after the backward: each layer's update waits until the next forward
reaches that layer (or anything reads the state, `OffloadEngine.settle`), streams in ahead of it
like a prefetch, runs on the optimizer thread beside the forward of the layer before, and hands
its new working parameters straight to the forward, so they are not read back from NVMe. The
step after an unclipped one speculates again. Every path gives the same bits as
`clip_grad_norm_` + AdamW in memory.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import torch

from stalwart.offload.ops import load_op

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdamWSettings:
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    @classmethod
    def from_config(cls, optim_config) -> AdamWSettings:
        if optim_config is None:
            return cls()
        name = getattr(optim_config, "name", "adamw")
        if name != "adamw":
            raise ValueError(
                f"optim.name={name!r}: the offload engine implements AdamW only; set optim.name: adamw"
            )
        return cls(
            beta1=float(optim_config.beta1),
            beta2=float(optim_config.beta2),
            eps=float(optim_config.eps),
            weight_decay=float(optim_config.weight_decay),
            grad_clip=float(getattr(optim_config, "grad_clip", 0.0) or 0.0),
        )


def decays(parameter: torch.Tensor | tuple[int, ...]) -> bool:
    """Weight decay applies to matrices only, never to norms, gains or biases (as the trainer).
    A shape answers for the tensor it describes (a caller updating pieces of one)."""
    return len(getattr(parameter, "shape", parameter)) >= 2


_DEEPSPEED_ADAM = None
_DEEPSPEED_FAILURE: str | None = None


def load_deepspeed_adam():
    """DeepSpeed's compiled CPU Adam op, or None (the reason is logged once)."""
    global _DEEPSPEED_ADAM, _DEEPSPEED_FAILURE
    if _DEEPSPEED_ADAM is not None or _DEEPSPEED_FAILURE is not None:
        return _DEEPSPEED_ADAM
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        from deepspeed.ops.op_builder import CPUAdamBuilder

        _DEEPSPEED_ADAM = load_op(CPUAdamBuilder())
    except Exception as error:  # any build/import failure degrades to the torch kernel
        _DEEPSPEED_FAILURE = f"{type(error).__name__}: {error}"
        logger.warning(
            "DeepSpeed CPU Adam unavailable (%s); using torch's fused AdamW", _DEEPSPEED_FAILURE
        )
    return _DEEPSPEED_ADAM


_next_optimizer_id = 0
_id_lock = threading.Lock()


class OutOfCoreAdamW:
    """AdamW applied one layer at a time to host views of streamed state."""

    def __init__(self, settings: AdamWSettings, kernel: str = "auto"):
        if kernel not in ("auto", "deepspeed", "torch"):
            raise ValueError(
                f"offload.optimizer_kernel={kernel!r} is not one of auto, deepspeed, torch"
            )
        self.settings = settings
        self._deepspeed = None
        if kernel in ("auto", "deepspeed"):
            self._deepspeed = load_deepspeed_adam()
            if self._deepspeed is None and kernel == "deepspeed":
                raise RuntimeError(
                    f"offload.optimizer_kernel=deepspeed but the op is unavailable: {_DEEPSPEED_FAILURE}"
                )
        self.kernel = "deepspeed" if self._deepspeed is not None else "torch"
        if self._deepspeed is not None:
            global _next_optimizer_id
            with _id_lock:
                self._optimizer_id = 10_000 + _next_optimizer_id
                _next_optimizer_id += 1
            s = settings
            self._deepspeed.create_adam(
                self._optimizer_id, 1e-3, s.beta1, s.beta2, s.eps, s.weight_decay, True, False
            )

    @torch.no_grad()
    def update(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        steps: list[int],
        lr: float,
        decay: list[bool] | None = None,
    ) -> None:
        """One AdamW step, in place, for tensors whose new step numbers are `steps` (1-based).

        `decay` says which tensors get weight decay; by default the matrices (`decays`). A
        caller updating flat pieces of a tensor passes the whole tensor's answer."""
        s = self.settings
        if decay is None:
            decay = [decays(param) for param in params]
        if self._deepspeed is not None:
            for param, grad, exp_avg, exp_avg_sq, step, decayed in zip(
                params, grads, exp_avgs, exp_avg_sqs, steps, decay
            ):
                weight_decay = s.weight_decay if decayed else 0.0
                self._deepspeed.adam_update(
                    self._optimizer_id, step, lr, s.beta1, s.beta2, s.eps, weight_decay, True,
                    param, grad, exp_avg, exp_avg_sq,
                )  # fmt: skip
            return
        for decayed in (True, False):
            chosen = [i for i in range(len(params)) if decay[i] == decayed]
            if not chosen:
                continue
            step_tensors = [torch.tensor(float(steps[i])) for i in chosen]
            torch._fused_adamw_(
                [params[i] for i in chosen],
                [grads[i] for i in chosen],
                [exp_avgs[i] for i in chosen],
                [exp_avg_sqs[i] for i in chosen],
                [],
                step_tensors,
                amsgrad=False,
                lr=lr,
                beta1=s.beta1,
                beta2=s.beta2,
                weight_decay=s.weight_decay if decayed else 0.0,
                eps=s.eps,
                maximize=False,
            )

    def close(self) -> None:
        if self._deepspeed is not None:
            self._deepspeed.destroy_adam(self._optimizer_id)
            self._deepspeed = None


def total_norm(per_parameter_norms: list[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm from per-parameter norms, combined as `clip_grad_norm_` combines them."""
    if not per_parameter_norms:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack(per_parameter_norms), 2.0)


def parameter_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch._foreach_norm(grads, 2.0)) if grads else []


def clip_coefficient(norm: torch.Tensor, grad_clip: float) -> torch.Tensor:
    """`clip_grad_norm_`'s clamped coefficient, computed the same way (bit for bit)."""
    return torch.clamp(grad_clip / (norm + 1e-6), max=1.0)


def step_decision(norm: torch.Tensor, grad_clip: float) -> str:
    """'commit', 'skip' (non-finite gradients) or 'clip' (redo with the clip coefficient)."""
    if not bool(torch.isfinite(norm)):
        return "skip"
    if grad_clip > 0 and float(clip_coefficient(norm, grad_clip)) < 1.0:
        return "clip"
    return "commit"

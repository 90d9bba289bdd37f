"""Shared pieces of the offload tests: tiny models, data, the in-memory reference loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stalwart.config import OffloadConfig, OptimConfig
from stalwart.models.gpt import GPT, GPTConfig


def logits_of(outputs) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs


def lm_loss(outputs, targets) -> torch.Tensor:
    logits = logits_of(outputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def tiny_gpt(depth: int = 2, seed: int = 0, **overrides) -> GPT:
    return GPT(GPTConfig(context_length=16, depth=depth, seed=seed, **overrides))


def llama_config(**overrides):
    """A tiny Llama's config (3 layers of 64, 4 heads, a 96-token vocabulary), with overrides."""
    transformers = __import__("transformers")
    values = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaConfig(**{**values, **overrides})


def tiny_llama(seed: int = 0, **overrides):
    transformers = __import__("transformers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(llama_config(**overrides)).float()


def batches(
    num_steps: int, num_micro: int, vocab: int, batch: int = 2, length: int = 12, seed: int = 0
):
    generator = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(num_steps):
        micro = []
        for _ in range(num_micro):
            tokens = torch.randint(0, vocab, (batch, length + 1), generator=generator)
            micro.append((tokens[:, :-1], tokens[:, 1:]))
        steps.append(micro)
    return steps


def optim_config(grad_clip: float = 1.0, lr: float = 1e-2) -> OptimConfig:
    return OptimConfig(
        lr=lr, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=grad_clip
    )


def offload_config(tmp_path, device: str = "nvme", **overrides) -> OffloadConfig:
    values = dict(device=device, max_host_memory_gb=4.0, buffer_count=3)
    if device == "nvme":
        values["nvme_path"] = str(tmp_path)
    values.update(overrides)
    return OffloadConfig(**values)


def reference_train(model, steps, optim: OptimConfig, lrs) -> list[dict]:
    """The same steps in memory: mean loss over micro-batches, clip_grad_norm_, fused AdamW."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lrs[0],
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        fused=True,
    )
    history = []
    for micro_batches, lr in zip(steps, lrs):
        total = 0.0
        for inputs, targets in micro_batches:
            loss = lm_loss(model(inputs), targets) / len(micro_batches)
            loss.backward()
            total += float(loss)
        params = [p for p in model.parameters() if p.requires_grad]
        if optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"loss": total, "grad_norm": float(norm)})
    return history


def named_parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def reference_train_mixed(model, steps, optim: OptimConfig, lrs, dtype=torch.bfloat16):
    """The mixed-precision steps in memory: forward and backward on `dtype` working parameters,
    gradients summed over micro-batches in fp32, clip_grad_norm_ and fused AdamW on fp32 master
    copies, working parameters rounded from the masters after each step.

    Returns the fp32 masters by name (the model's parameters hold the working copies)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    masters = {n: p.detach().clone().float() for n, p in named}
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    decay = [masters[n] for n, p in named if p.dim() >= 2]
    no_decay = [masters[n] for n, p in named if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lrs[0],
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        fused=True,
    )
    for micro_batches, lr in zip(steps, lrs):
        for inputs, targets in micro_batches:
            loss = lm_loss(model(inputs), targets) / len(micro_batches)
            loss.backward()
            for name, parameter in named:
                if parameter.grad is None:
                    continue
                master = masters[name]
                if master.grad is None:
                    master.grad = parameter.grad.float()
                else:
                    master.grad.add_(parameter.grad.float())
                parameter.grad = None
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(masters.values()), optim.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, parameter in named:
                parameter.copy_(masters[name])
    return masters

"""A compact modern decoder: RMSNorm, rotary embeddings, SwiGLU MLP, optional tied embeddings.

One dial, `depth`, derives the rest (width = 64 * depth, heads of 64 dims), so configs stay
short. Initialisation draws from a generator seeded by `GPTConfig.seed`, independent of the
global RNG, so two processes build bit-identical models. The model never mentions parallelism
or precision recipes: `trainer/parallel.py` and `quant/` wrap it from outside.

Generation uses a KV cache (`new_kv_cache`) and a padding mask for left-padded prompt batches;
rotary positions come from the mask's cumulative sum, so padded rows see the same positions as
unpadded ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True)
class GPTConfig:
    vocab_size: int = 259
    context_length: int = 64
    depth: int = 2
    width: int | None = None  # default 64 * depth
    num_heads: int | None = None  # default width // 64 (at least 1)
    mlp_hidden: int | None = None  # default 8/3 * width rounded up to a multiple of 32
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        self.width = self.width or 64 * self.depth
        self.num_heads = self.num_heads or max(1, self.width // 64)
        if self.width % self.num_heads or (self.width // self.num_heads) % 2:
            raise ValueError(
                f"width ({self.width}) must split into num_heads ({self.num_heads}) heads of an "
                "even size (rotary embeddings rotate pairs)"
            )
        self.mlp_hidden = self.mlp_hidden or 32 * math.ceil(8 * self.width / 3 / 32)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


class KVCache:
    """Keys and values of every layer for a batch of sequences being generated."""

    def __init__(self, config: GPTConfig, batch_size: int, max_length: int, device, dtype):
        shape = (config.depth, batch_size, config.num_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_length = max_length
        self.length = 0

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        end = self.length + keys.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache of {self.max_length} positions is full (need {end})")
        self.keys[layer, :, :, self.length : end] = keys
        self.values[layer, :, :, self.length : end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float):
    """cos/sin of shape [B, 1, T, head_dim/2] for integer positions [B, T]."""
    inverse_frequency = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions.to(torch.float32)[..., None] * inverse_frequency
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
    return rotated.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.width, config.width, bias=False)
        self.wk = nn.Linear(config.width, config.width, bias=False)
        self.wv = nn.Linear(config.width, config.width, bias=False)
        self.wo = nn.Linear(config.width, config.width, bias=False)

    def forward(self, x, cos, sin, attn_mask, kv_cache: KVCache | None, layer: int):
        batch, length, _ = x.shape

        def heads(t):
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = apply_rotary(heads(self.wq(x)), cos, sin)
        k = apply_rotary(heads(self.wk(x)), cos, sin)
        v = heads(self.wv(x))
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.wo(y.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.w_gate = nn.Linear(config.width, config.mlp_hidden, bias=False)
        self.w_up = nn.Linear(config.width, config.mlp_hidden, bias=False)
        self.w_down = nn.Linear(config.mlp_hidden, config.width, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask, kv_cache, layer):
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, kv_cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class LMHead(nn.Linear):
    """The output projection, in FP32 whatever the autocast policy: logits feed losses and
    sampling. A module call (not a bare F.linear on its weight) so that wrappers that act per
    module see it run (the offload engine streams it and can run it in chunks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.lm_head = LMHead(config.width, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deterministic init from config.seed (GPT-2 style, residual projections scaled by depth)."""
        generator = torch.Generator(device="cpu").manual_seed(self.config.seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.depth)
        for name, parameter in self.named_parameters():
            if parameter.dim() == 1:  # norm gains
                parameter.fill_(1.0)
                continue
            std = residual_std if name.endswith(("wo.weight", "w_down.weight")) else 0.02
            values = torch.randn(parameter.shape, generator=generator) * std
            parameter.copy_(values)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_kv_cache(self, batch_size: int, max_length: int) -> KVCache:
        weight = self.token_embedding.weight
        device_type = weight.device.type
        # is_autocast_enabled() without a device type reports CUDA only; ask for this device.
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
        return KVCache(self.config, batch_size, max_length, weight.device, dtype)

    def forward(
        self,
        tokens: torch.Tensor,
        kv_cache: KVCache | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] (float32) for tokens [B, T].

        With a cache, the tokens continue the cached sequences; `padding_mask` [B, cached + T]
        marks real tokens (False = left padding).
        """
        batch, length = tokens.shape
        start = kv_cache.length if kv_cache is not None else 0
        total = start + length
        if total > self.config.context_length and kv_cache is None:
            raise ValueError(
                f"sequence of {total} tokens exceeds model.context_length {self.config.context_length}"
            )
        device = tokens.device
        attn_mask = None
        if padding_mask is None:
            positions = torch.arange(start, total, device=device).expand(batch, length)
            if start:  # cached keys are all visible to every new token; new tokens are causal
                attn_mask = torch.ones(length, total, dtype=torch.bool, device=device).tril(start)
        else:
            if padding_mask.shape != (batch, total):
                raise ValueError(
                    f"padding_mask must have shape {(batch, total)} (batch, cached + new), "
                    f"got {tuple(padding_mask.shape)}"
                )
            padding_mask = padding_mask.to(device=device, dtype=torch.bool)
            positions = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            causal = torch.ones(length, total, dtype=torch.bool, device=device).tril(start)
            attn_mask = causal[None] & padding_mask[:, None, :]
            # a padding query would see no key at all; let it see itself so softmax stays finite
            query_index = torch.arange(start, total, device=device)
            attn_mask |= (torch.arange(total, device=device)[None, :] == query_index[:, None])[None]
            attn_mask = attn_mask[:, None]
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
        x = self.token_embedding(tokens)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, attn_mask, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.length = total
        return self.lm_head(self.norm(x))

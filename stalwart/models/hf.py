"""Any `transformers` causal LM, from a local directory or from an inline config.

Nothing is downloaded: `from_pretrained` runs with `local_files_only=True`. `HFCausalLM` gives
the HF model the same call signature as our GPT (`model(tokens) -> float32 logits`), so the
trainer, the offload engine and the RL rollout treat both alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def _transformers():
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "model.kind 'hf' needs transformers: pip install 'stalwart[hf]'"
        ) from error
    return transformers


class HFCausalLM(nn.Module):
    """Wraps an `AutoModelForCausalLM` so that `forward(tokens)` returns float32 logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None, **kwargs):
        output = self.model(
            input_ids=tokens, attention_mask=padding_mask, use_cache=False, **kwargs
        )
        return output.logits.float()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_hf_model(
    path: str | None = None, config: dict[str, Any] | None = None, seed: int = 0
) -> HFCausalLM:
    """Load weights from a local directory, or build a randomly initialised model from a config dict.

    An inline config needs `model_type` (e.g. "llama", "qwen2") plus that family's sizes.
    """
    transformers = _transformers()
    if path is not None:
        directory = Path(path)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"model.path {path!r} is not a local Hugging Face model directory (no config.json)"
            )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, dtype=torch.float32
        )
        return HFCausalLM(model)
    if not config or "model_type" not in config:
        raise ValueError("model.hf_config needs a 'model_type' key (e.g. 'llama', 'qwen2')")
    settings = dict(config)
    model_type = settings.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return HFCausalLM(model)

"""Models: our reference GPT and any Hugging Face causal LM, built from the run config."""

from __future__ import annotations

from torch import nn

from stalwart.models.gpt import GPT, GPTConfig


def build_model(model_config, seed: int = 0) -> nn.Module:
    """Build the model a `ModelConfig` describes (deterministic given the seed)."""
    if model_config.kind == "gpt":
        return GPT(
            GPTConfig(
                vocab_size=model_config.vocab_size,
                context_length=model_config.context_length,
                depth=model_config.depth,
                width=model_config.width,
                num_heads=model_config.num_heads,
                tie_embeddings=model_config.tie_embeddings,
                rope_theta=model_config.rope_theta,
                seed=seed,
            )
        )
    from stalwart.models.hf import build_hf_model

    return build_hf_model(model_config.path, model_config.hf_config, seed=seed)


__all__ = ["GPT", "GPTConfig", "build_model"]

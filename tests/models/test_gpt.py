"""Our reference GPT: deterministic init, the depth dial, tied embeddings, KV-cache decoding."""

import pytest
import torch

from stalwart.config import load_config
from stalwart.models import build_model
from stalwart.models.gpt import GPT, GPTConfig

PAD = 258


def small_gpt(**overrides) -> GPT:
    settings = dict(depth=2, context_length=32, seed=0) | overrides
    return GPT(GPTConfig(**settings)).eval()


def random_tokens(shape, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=generator)


# ---------------------------------------------------------------------------------------------
# Initialisation


def test_same_seed_builds_bit_identical_models():
    first, second = small_gpt(seed=3), small_gpt(seed=3)
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    for name in first_state:
        assert torch.equal(first_state[name], second_state[name]), name


def test_init_ignores_the_global_rng():
    torch.manual_seed(1)
    first = small_gpt(seed=5)
    torch.manual_seed(2)
    second = small_gpt(seed=5)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_different_seeds_give_different_weights():
    first, second = small_gpt(seed=0), small_gpt(seed=1)
    for (name, a), b in zip(first.named_parameters(), second.parameters()):
        if a.dim() >= 2:  # norm gains start at 1.0 whatever the seed
            assert not torch.equal(a, b), name


def test_init_scale_follows_the_gpt2_recipe():
    model = small_gpt(depth=4)
    block = model.blocks[0]
    assert block.attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.1)
    residual_std = 0.02 / (2 * 4) ** 0.5
    assert block.attn.wo.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert block.mlp.w_down.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert torch.equal(block.attn_norm.weight, torch.ones_like(block.attn_norm.weight))


# ---------------------------------------------------------------------------------------------
# The depth dial and its validation


@pytest.mark.parametrize(
    "depth, width, num_heads, mlp_hidden", [(1, 64, 1, 192), (2, 128, 2, 352), (3, 192, 3, 512)]
)
def test_width_and_heads_derive_from_depth(depth, width, num_heads, mlp_hidden):
    config = GPTConfig(depth=depth)
    assert (config.width, config.num_heads, config.head_dim) == (width, num_heads, 64)
    assert config.mlp_hidden == mlp_hidden and mlp_hidden % 32 == 0
    model = GPT(config)
    assert len(model.blocks) == depth
    assert model.blocks[0].attn.wq.weight.shape == (width, width)
    assert model.blocks[0].mlp.w_gate.weight.shape == (mlp_hidden, width)
    assert model.token_embedding.weight.shape == (259, width)
    assert model.lm_head.weight.shape == (259, width)


def test_explicit_width_and_heads_override_the_dial():
    config = GPTConfig(depth=2, width=96, num_heads=3)
    assert (config.width, config.num_heads, config.head_dim) == (96, 3, 32)


@pytest.mark.parametrize(
    "settings, fragment",
    [
        (dict(width=100, num_heads=3), r"width \(100\)"),  # 100 does not split into 3 heads
        (dict(width=96, num_heads=32), "even size"),  # heads of 3 dims: rotary needs pairs
        (dict(depth=0), "depth"),
    ],
)
def test_bad_shapes_raise_value_error(settings, fragment):
    with pytest.raises(ValueError, match=fragment):
        GPTConfig(**settings)


def test_bad_shapes_from_the_run_config_raise_value_error():
    config = load_config(None, ["model.width=100", "model.num_heads=3"])
    with pytest.raises(ValueError, match="num_heads"):
        build_model(config.model)


def test_sequences_longer_than_the_context_are_refused():
    model = small_gpt(context_length=8)
    with pytest.raises(ValueError, match="context_length"):
        model(random_tokens((1, 9)))


# ---------------------------------------------------------------------------------------------
# Tied embeddings


def test_tied_embeddings_share_storage():
    model = small_gpt(tie_embeddings=True)
    assert model.lm_head.weight is model.token_embedding.weight
    assert model.lm_head.weight.data_ptr() == model.token_embedding.weight.data_ptr()
    untied = small_gpt(tie_embeddings=False)
    assert untied.num_params() - model.num_params() == 259 * 128
    # A training step moves both views together: there is one tensor, not two copies.
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(random_tokens((2, 8))).logsumexp(-1).mean().backward()
    optimizer.step()
    assert torch.equal(model.lm_head.weight, model.token_embedding.weight)
    assert model.lm_head.weight.data_ptr() == model.token_embedding.weight.data_ptr()


# ---------------------------------------------------------------------------------------------
# Precision


def test_logits_are_float32_under_bf16_autocast():
    model = small_gpt()
    tokens = random_tokens((2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
        cache = model.new_kv_cache(2, 8)
    assert logits.dtype == torch.float32 and logits.shape == (2, 8, 259)
    assert cache.keys.dtype == torch.bfloat16
    assert torch.allclose(logits, model(tokens), atol=0.1)


# ---------------------------------------------------------------------------------------------
# KV cache


@torch.no_grad()
def test_incremental_decoding_equals_the_full_forward():
    model = small_gpt()
    tokens = random_tokens((2, 12))
    full = model(tokens)
    cache = model.new_kv_cache(batch_size=2, max_length=12)
    pieces = [model(tokens[:, :5], kv_cache=cache)]
    for position in range(5, 12):
        pieces.append(model(tokens[:, position : position + 1], kv_cache=cache))
    assert cache.length == 12
    incremental = torch.cat(pieces, dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_chunked_prefill_equals_the_full_forward():
    model = small_gpt()
    tokens = random_tokens((1, 12), seed=1)
    cache = model.new_kv_cache(1, 12)
    pieces = [model(tokens[:, :4], kv_cache=cache), model(tokens[:, 4:], kv_cache=cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(tokens), atol=1e-5, rtol=0)


@torch.no_grad()
def test_left_padded_batch_decodes_like_each_sequence_alone():
    model = small_gpt()
    prompts = [
        random_tokens((7,), seed=2),
        random_tokens((4,), seed=3),
        random_tokens((1,), seed=4),
    ]
    continuation = random_tokens((3, 5), seed=5)  # fixed "generated" tokens, one row per prompt
    prompt_length = max(len(p) for p in prompts)
    batch = torch.full((3, prompt_length), PAD)
    mask = torch.zeros((3, prompt_length), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        batch[row, prompt_length - len(prompt) :] = prompt
        mask[row, prompt_length - len(prompt) :] = True

    cache = model.new_kv_cache(3, prompt_length + continuation.shape[1])
    prompt_logits = model(batch, kv_cache=cache, padding_mask=mask)
    step_logits = []
    for position in range(continuation.shape[1]):
        mask = torch.cat([mask, torch.ones((3, 1), dtype=torch.bool)], dim=1)
        step_logits.append(
            model(continuation[:, position : position + 1], kv_cache=cache, padding_mask=mask)
        )
    decoded = torch.cat(step_logits, dim=1)

    for row, prompt in enumerate(prompts):
        alone = model(torch.cat([prompt, continuation[row]])[None])[0]
        torch.testing.assert_close(
            prompt_logits[row, prompt_length - len(prompt) :],
            alone[: len(prompt)],
            atol=1e-5,
            rtol=0,
        )
        torch.testing.assert_close(decoded[row], alone[len(prompt) :], atol=1e-5, rtol=0)


@torch.no_grad()
def test_left_padded_full_forward_without_cache_matches_unpadded_rows():
    model = small_gpt()
    short, long = random_tokens((3,), seed=6), random_tokens((6,), seed=7)
    batch = torch.stack([torch.cat([torch.full((3,), PAD), short]), long])
    mask = batch != PAD
    logits = model(batch, padding_mask=mask)
    assert torch.isfinite(logits).all()  # padding queries still see one key
    torch.testing.assert_close(logits[0, 3:], model(short[None])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1], model(long[None])[0], atol=1e-5, rtol=0)


def test_cache_overflow_and_bad_mask_shape_raise_value_error():
    model = small_gpt()
    cache = model.new_kv_cache(1, 4)
    with pytest.raises(ValueError, match="full"):
        model(random_tokens((1, 5)), kv_cache=cache)
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        model(random_tokens((2, 4)), padding_mask=torch.ones((2, 3), dtype=torch.bool))

"""Sampling with a KV cache (GPT and Hugging Face): padding invariance, log-probabilities that
match a full forward pass, stop tokens, top-p, and the forced-answer length cap."""

import math

import pytest
import torch

from stalwart.models.gpt import GPT, GPTConfig
from stalwart.trainer.rl.sampling import (
    SamplingSettings,
    _filter_top_p,
    cast_lm_head_to_fp32,
    generate,
    sequence_logprobs,
)

PROMPTS = [[49, 50, 43, 55, 61], [55, 61], [57, 43, 57, 61]]


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=259, context_length=48, depth=1, seed=3))


@pytest.fixture(scope="module")
def hf_model():
    pytest.importorskip("transformers")
    from stalwart.models.hf import build_hf_model

    config = {
        "model_type": "llama",
        "vocab_size": 259,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    return build_hf_model(config=config, seed=1)


@pytest.mark.parametrize("model_name", ["gpt", "hf_model"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(model_name, request):
    model = request.getfixturevalue(model_name)
    settings = SamplingSettings(temperature=0.0, max_new_tokens=6, stop_token_ids=())
    batched = generate(model, PROMPTS, settings)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], settings)
        assert batched.completion_ids(row) == alone.completion_ids(0)
        torch.testing.assert_close(batched.logprobs[row], alone.logprobs[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_name", ["gpt", "hf_model"])
def test_generator_logprobs_match_the_learner_forward_pass(model_name, request):
    model = request.getfixturevalue(model_name)
    settings = SamplingSettings(temperature=0.7, max_new_tokens=8, stop_token_ids=(257, 10))
    generator = torch.Generator().manual_seed(0)
    prompts = [p for p in PROMPTS for _ in range(4)]
    generation = generate(model, prompts, settings, generator)
    learner = sequence_logprobs(
        model, prompts, generation.tokens, generation.token_mask, temperature=0.7
    )
    mask = generation.loss_mask
    assert mask.sum() > 0
    torch.testing.assert_close(learner[mask], generation.logprobs[mask], atol=1e-4, rtol=0)


def test_stop_tokens_end_rows_and_padding_follows(gpt):
    # Make token 7 overwhelmingly likely after anything: every row stops at once.
    model = GPT(gpt.config)
    model.load_state_dict(gpt.state_dict())
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.norm.weight.fill_(1.0)
        model.lm_head.weight[7] = 50.0 * torch.sign(torch.randn(model.config.width))
    settings = SamplingSettings(temperature=1.0, max_new_tokens=5, stop_token_ids=(7,))
    generation = generate(model, PROMPTS, settings, torch.Generator().manual_seed(1))
    # Each row either stopped with token 7 (then nothing follows) or ran to the budget.
    for row in range(len(PROMPTS)):
        ids = generation.completion_ids(row)
        if generation.finished[row]:
            assert ids[-1] == 7 and 7 not in ids[:-1]
        else:
            assert len(ids) == 5
    assert generation.finished.any()


def test_sampling_frequencies_follow_temperature_and_top_p(gpt):
    prompt = PROMPTS[0]
    with torch.no_grad():
        logits = gpt(torch.tensor([prompt]))[0, -1]
    # Sharpen the model's distribution so a few tokens carry most mass (temperature 0.05).
    temperature = 0.05
    probabilities = torch.softmax(logits / temperature, -1)
    settings = SamplingSettings(temperature=temperature, max_new_tokens=1, stop_token_ids=())
    draws = generate(gpt, [prompt] * 4000, settings, torch.Generator().manual_seed(2))
    counts = torch.bincount(draws.tokens[:, 0], minlength=259).float() / 4000
    top = probabilities.argmax()
    assert abs(counts[top] - probabilities[top]) < 0.03
    torch.testing.assert_close(
        draws.logprobs[:, 0], probabilities.log()[draws.tokens[:, 0]], atol=1e-4, rtol=0
    )
    # A nucleus smaller than the top token's mass leaves only the top token.
    nucleus = SamplingSettings(
        temperature=temperature, top_p=1e-6, max_new_tokens=1, stop_token_ids=()
    )
    narrow = generate(gpt, [prompt] * 200, nucleus, torch.Generator().manual_seed(3))
    assert (narrow.tokens[:, 0] == top).all()


def test_top_p_keeps_the_smallest_nucleus():
    probabilities = torch.tensor([[0.2, 0.5, 0.3]])
    kept = _filter_top_p(probabilities, 0.7)
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.5 / 0.8, 0.3 / 0.8]]))
    torch.testing.assert_close(_filter_top_p(probabilities, 0.8), kept)
    torch.testing.assert_close(_filter_top_p(probabilities, 0.81), probabilities)


def test_forced_answer_interruption(gpt):
    forced = tuple(b"Answer:")
    settings = SamplingSettings(
        temperature=1.0,
        max_new_tokens=50,
        stop_token_ids=(),
        interrupt_min_tokens=3,
        interrupt_max_tokens=6,
        interrupt_token_ids=forced,
        answer_tokens=2,
    )
    generation = generate(gpt, PROMPTS * 4, settings, torch.Generator().manual_seed(4))
    assert generation.interrupted.all()
    cut_points = set()
    for row in range(generation.tokens.shape[0]):
        ids = generation.completion_ids(row)
        sampled = generation.loss_mask[row][generation.token_mask[row]].tolist()
        cut = len(ids) - len(forced) - 2
        assert 3 <= cut <= 6
        cut_points.add(cut)
        assert tuple(ids[cut : cut + len(forced)]) == forced
        assert sampled == [True] * cut + [False] * len(forced) + [True, True]
        assert generation.logprobs[row][cut : cut + len(forced)].abs().sum() == 0
    assert len(cut_points) > 1  # the cut point is random per row


def test_context_overflow_and_bad_settings_are_clear(gpt):
    with pytest.raises(ValueError, match="context_length"):
        generate(gpt, PROMPTS, SamplingSettings(max_new_tokens=100))
    with pytest.raises(ValueError, match="rl.top_p"):
        SamplingSettings(top_p=0.0)
    with pytest.raises(ValueError, match="rl.interrupt_at"):
        SamplingSettings(interrupt_min_tokens=5, interrupt_max_tokens=2, interrupt_token_ids=(1,))


def test_fp32_lm_head_for_a_bf16_hf_model(hf_model):
    from stalwart.models.hf import HFCausalLM

    model = HFCausalLM(type(hf_model.model)(hf_model.model.config)).to(torch.bfloat16)
    model.model.load_state_dict(hf_model.model.state_dict())
    model = model.to(torch.bfloat16)
    cast_lm_head_to_fp32(model)
    head = model.model.get_output_embeddings()
    assert head.weight.dtype == torch.float32
    tokens = torch.tensor([PROMPTS[0]])
    output = model.model(input_ids=tokens)
    assert output.logits.dtype == torch.float32
    # Same logits as the FP32 head applied to the bf16 hidden states.
    hidden = model.model.model(input_ids=tokens).last_hidden_state
    reference = hidden.float() @ hf_model.model.get_output_embeddings().weight.float().T
    torch.testing.assert_close(output.logits, reference, atol=1e-3, rtol=1e-3)
    assert not math.isnan(output.logits.sum().item())

"""The LM head and cross-entropy in chunks of tokens (stalwart/offload/loss.py)."""

import pytest
import torch
import torch.nn.functional as F
from offload_helpers import (
    batches,
    named_parameters,
    offload_config,
    optim_config,
    reference_train,
    tiny_gpt,
    tiny_llama,
)

from stalwart.offload.engine import OffloadEngine
from stalwart.offload.loss import TokenCrossEntropy, chunked_head_loss


def _full_and_chunked(chunk_tokens, bias, ignore, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(24, 97, bias=bias).to(dtype)
    hidden = torch.randn(3, 11, 24, generator=generator).to(dtype).requires_grad_()
    targets = torch.randint(0, 97, (3, 11), generator=generator)
    targets[0, :4] = -100 if ignore else targets[0, :4]
    logits = head(hidden)
    full = F.cross_entropy(logits.reshape(-1, 97).float(), targets.reshape(-1))
    full.backward()
    expected = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    chunked = chunked_head_loss(hidden, targets, head, head.forward, chunk_tokens)
    chunked.backward()
    actual = [hidden.grad] + [p.grad for p in head.parameters()]
    return full, chunked, expected, actual


@pytest.mark.parametrize("chunk_tokens", [1, 5, 33, 1000])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ignore", [False, True])
def test_chunked_loss_and_gradients_match_the_whole_logits(chunk_tokens, bias, ignore):
    full, chunked, expected, actual = _full_and_chunked(chunk_tokens, bias, ignore)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    for want, got in zip(expected, actual):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_bf16_head_gradients_are_summed_in_float32():
    """Each chunk's weight gradient comes out of the bf16 head's own backward, rounded to bf16
    once; the chunks are summed in float32 and rounded once more. So each element is within
    one bf16 rounding (2^-8 relative, with slack) of every chunk's part and of the total."""
    torch.manual_seed(0)
    full, chunked, expected, actual = _full_and_chunked(4, True, False, dtype=torch.bfloat16)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-3)
    # The per-chunk parts, exactly (float32 arithmetic on the same bf16 values).
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 24, generator=generator).to(torch.bfloat16).float().reshape(-1, 24)
    targets = torch.randint(0, 97, (3, 11), generator=generator).reshape(-1)
    torch.manual_seed(0)
    head = torch.nn.Linear(24, 97).to(torch.bfloat16).float()
    dlogits = torch.softmax(head(hidden), -1).detach()
    dlogits[torch.arange(len(targets)), targets] -= 1
    dlogits /= len(targets)
    parts = [dlogits[i : i + 4].T @ hidden[i : i + 4] for i in range(0, len(targets), 4)]
    bound = 2.0**-8 * (sum(part.abs() for part in parts) + expected[1].float().abs()) + 1e-7
    difference = (actual[1].float() - expected[1].float()).abs()
    assert actual[1].dtype == torch.bfloat16
    assert bool((difference <= bound).all()), float((difference - bound).max())
    # Without the per-chunk rounding the bound would be that of the total alone; it is not
    # vacuous: it is well below the gradient itself.
    assert float(bound.mean()) < 0.05 * float(expected[1].float().abs().mean())
    for want, got in ((expected[0], actual[0]), (expected[2], actual[2])):
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-4)


def test_all_ignored_targets_give_nan_like_cross_entropy():
    head = torch.nn.Linear(8, 10)
    hidden = torch.randn(2, 3, 8)
    targets = torch.full((2, 3), -100)
    assert torch.isnan(F.cross_entropy(head(hidden).reshape(-1, 10), targets.reshape(-1)))
    assert torch.isnan(chunked_head_loss(hidden, targets, head, head.forward, 2))


def test_a_bad_chunk_size_or_shape_is_refused():
    head = torch.nn.Linear(8, 10)
    with pytest.raises(ValueError, match="chunk_tokens"):
        TokenCrossEntropy(chunk_tokens=-1)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_head_loss(torch.randn(2, 8), torch.zeros(2, dtype=torch.long), head, head, 0)
    with pytest.raises(ValueError, match="targets hold 3 tokens"):
        chunked_head_loss(torch.randn(2, 8), torch.zeros(3, dtype=torch.long), head, head, 1)


def _engine(model, tmp_path, loss_fn, **config):
    return OffloadEngine(
        model,
        offload_config(tmp_path, **config),
        optim_config(grad_clip=1.0),
        loss_fn=loss_fn,
        optimizer_kernel="torch",
        aio_backend="threadpool",
    )


def _tied_gpt():
    return tiny_gpt(vocab_size=96, tie_embeddings=True)  # the head is the persistent unit


@pytest.mark.parametrize(
    "make_model",
    [lambda: tiny_gpt(vocab_size=96), _tied_gpt, tiny_llama],
    ids=["gpt", "gpt-tied", "llama"],
)
def test_engine_with_chunked_loss_trains_like_in_memory_adamw(tmp_path, make_model):
    steps = batches(3, num_micro=2, vocab=96)
    lrs = [1e-2, 5e-3, 2e-3]
    reference = make_model()
    expected = reference_train(reference, steps, optim_config(grad_clip=1.0), lrs)
    model = make_model()
    engine = _engine(model, tmp_path, TokenCrossEntropy(chunk_tokens=5))
    history = [engine.train_step(micro, lr) for micro, lr in zip(steps, lrs)]
    assert [h["loss_chunk_tokens"] for h in history] == [5, 5, 5]
    for ours, theirs in zip(history, expected):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    # Loss and global norm agree to float rounding; AdamW's m / sqrt(v) can blow a rounding
    # difference in a near-zero gradient up to a fraction of the learning rate (1e-2 here).
    params = engine.gather_parameters()
    for name, want in named_parameters(reference).items():
        torch.testing.assert_close(params[name], want, rtol=0, atol=1e-3, msg=name)
    engine.close()


def test_chunking_off_is_bit_identical_to_in_memory_adamw(tmp_path):
    steps = batches(2, num_micro=1, vocab=259)
    lrs = [1e-2, 5e-3]
    reference = tiny_gpt()
    reference_train(reference, steps, optim_config(grad_clip=1.0), lrs)
    engine = _engine(tiny_gpt(), tmp_path, TokenCrossEntropy(chunk_tokens=0))
    history = [engine.train_step(micro, lr) for micro, lr in zip(steps, lrs)]
    assert all(h["loss_chunk_tokens"] is None for h in history)
    params = engine.gather_parameters()
    for name, want in named_parameters(reference).items():
        assert torch.equal(params[name], want), name
    engine.close()


def test_the_engine_chunks_only_logits_that_would_crowd_its_allowance(tmp_path):
    engine = _engine(tiny_gpt(vocab_size=4096), tmp_path, TokenCrossEntropy())
    per_token = 16 * 4096
    fits = engine.activation_allowance_bytes // 4 // per_token
    assert engine.loss_chunk_tokens(fits) is None
    chunk = engine.loss_chunk_tokens(fits + 1)
    assert 16 <= chunk <= fits
    engine.close()
    # Another loss: the engine never reaches into it.
    other = _engine(tiny_gpt(vocab_size=4096), tmp_path, lambda out, t: out.sum())
    assert other.loss_chunk_tokens(10**9) is None
    other.close()


class _SoftCapped(torch.nn.Module):
    """A model that changes its logits after the head (Gemma 2's soft-capping), without a
    config that says so."""

    def __init__(self):
        super().__init__()
        self.gpt = tiny_gpt(vocab_size=96)

    def get_output_embeddings(self):
        return self.gpt.lm_head

    def forward(self, tokens):
        return torch.tanh(self.gpt(tokens) / 30.0) * 30.0


def test_a_model_that_transforms_its_logits_is_refused_before_any_update(tmp_path):
    engine = _engine(_SoftCapped(), tmp_path, TokenCrossEntropy(chunk_tokens=4))
    before = engine.gather_parameters()
    with pytest.raises(RuntimeError, match="transforms the output of its LM head"):
        engine.train_step(batches(1, num_micro=1, vocab=96)[0], 1e-2)
    after = engine.gather_parameters()
    assert all(torch.equal(before[name], after[name]) for name in before)
    engine.close()


def test_a_config_that_soft_caps_or_scales_logits_turns_chunking_off(tmp_path):
    model = _SoftCapped()
    model.config = type("Config", (), {"final_logit_softcapping": 30.0})()
    engine = _engine(model, tmp_path, TokenCrossEntropy(chunk_tokens=4))
    assert engine.loss_chunk_tokens(10**6) is None
    engine.close()
    scaled = tiny_gpt(vocab_size=96)
    scaled.config.logits_scaling = 8.0  # Granite's key
    engine = _engine(scaled, tmp_path, TokenCrossEntropy(chunk_tokens=4))
    assert engine.loss_chunk_tokens(10**6) is None
    engine.close()


def test_a_wrapper_that_upcasts_the_logits_is_chunked_from_the_bf16_hidden_states(tmp_path):
    """HFCausalLM returns `logits.float()`; in bf16 the engine takes the hidden states from
    before that cast, so the chunks see what the head would have seen."""
    from stalwart.models.hf import HFCausalLM

    steps = batches(2, num_micro=1, vocab=96)
    results = []
    for chunk in (0, 5):
        directory = tmp_path / str(chunk)
        directory.mkdir()
        engine = OffloadEngine(
            HFCausalLM(tiny_llama()),
            offload_config(directory),
            optim_config(grad_clip=1.0),
            loss_fn=TokenCrossEntropy(chunk_tokens=chunk),
            optimizer_kernel="torch",
            aio_backend="threadpool",
            precision="bf16",
        )
        history = [engine.train_step(micro, 1e-2) for micro in steps]
        results.append((history, engine.gather_parameters()))
        engine.close()
    (whole, whole_params), (chunked, chunked_params) = results
    assert [h["loss_chunk_tokens"] for h in chunked] == [5, 5]
    for a, b in zip(whole, chunked):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-2)
    for name in whole_params:
        torch.testing.assert_close(chunked_params[name], whole_params[name], rtol=0, atol=2e-2)


def test_evaluation_runs_the_head_and_loss_in_chunks_too(tmp_path):
    engine = _engine(tiny_gpt(vocab_size=96), tmp_path, TokenCrossEntropy(chunk_tokens=5))
    steps = batches(2, num_micro=1, vocab=96)
    engine.train_step(steps[0], 1e-2)
    inputs, targets = steps[1][0]
    chunked = engine.evaluate_loss(inputs, targets)
    whole = F.cross_entropy(engine.run_forward(inputs).flatten(0, 1).float(), targets.flatten())
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    # Evaluation leaves nothing resident, and training goes on as before.
    assert all(unit.p_buffer is None for unit in engine.units)
    assert engine.train_step(steps[1], 1e-2)["loss_chunk_tokens"] == 5
    engine.close()

"""Offload misconfigurations fail before training, saying what is needed."""

import re
import shutil
from collections import namedtuple

import pytest
from offload_helpers import llama_config, lm_loss, offload_config, optim_config, tiny_gpt

from stalwart.config import ConfigError, OffloadConfig, config_from_dict
from stalwart.offload.engine import OffloadEngine, budget_split


def _engine(config):
    return OffloadEngine(tiny_gpt(), config, optim_config(), loss_fn=lm_loss)


def _engine_with_budget(model, tmp_path, budget_gb):
    config = offload_config(tmp_path, max_host_memory_gb=budget_gb)
    return OffloadEngine(model, config, optim_config(), loss_fn=lm_loss)


def _suggested_budget(refused) -> float:
    """The N of "... at least N" in a refusal's message."""
    return float(re.search(r"at least (\d+\.\d+)", str(refused.value)).group(1))


def test_nvme_without_path_is_a_config_error():
    with pytest.raises(ConfigError, match="offload.nvme_path is not set"):
        config_from_dict({"offload": {"device": "nvme"}})


def test_unknown_offload_key_names_the_deepspeed_spelling():
    with pytest.raises(ConfigError, match="offload.buffer_counts.*did you mean 'buffer_count'"):
        config_from_dict({"offload": {"device": "cpu", "buffer_counts": 4}})


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist; create the directory"):
        _engine(OffloadConfig(device="nvme", nvme_path=str(tmp_path / "not-mounted")))


def test_read_only_directory():
    with pytest.raises(ValueError, match="not writable"):
        _engine(OffloadConfig(device="nvme", nvme_path="/proc/self"))


def test_full_disk(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(1 << 30, (1 << 30) - 4096, 4096))
    with pytest.raises(ValueError, match=r"GiB free but the offloaded state needs \d+\.\d+ GiB"):
        _engine(offload_config(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_budget_too_small_for_one_layer(tmp_path):
    with pytest.raises(
        ValueError, match=r"max_host_memory_gb=0.05 is too small.*set it to at least \d+\.\d+"
    ):
        _engine(offload_config(tmp_path, max_host_memory_gb=0.05))


def test_the_suggested_budget_is_enough(tmp_path):
    """The workspace grows with the budget, so the smallest budget is not today's parts added
    up: following the message must work (large layers, where the quarter dominates)."""
    from stalwart.offload.engine import empty_parameters

    def model():
        with empty_parameters():  # a 16 M-parameter embedding and head, never materialised
            return tiny_gpt(depth=1, vocab_size=32000, width=512, num_heads=8)

    with pytest.raises(ValueError, match="set it to at least") as refused:
        _engine_with_budget(model(), tmp_path, 0.05)
    # A little slack for the RSS of this process moving between the two constructions.
    _engine_with_budget(model(), tmp_path, _suggested_budget(refused) + 0.02).close()


def test_the_kernels_spare_is_a_quarter_of_the_headroom_up_to_one_gib():
    """Small budgets keep a quarter of what the runtime leaves for kernels and the allocator; a
    large budget does not hand that quarter to them (at 17.7 GiB it was 4.3 GiB, unused: the
    Llama 3 8B shape's largest layers trained with a 9.7 GiB peak), it goes to the pool and
    the activations."""
    gib = 1 << 30
    grads = gib // 2
    small = budget_split(2 * gib, gib // 2, grads, gib // 4)
    assert small[0] == 2 * grads + (2 * gib - gib // 2) // 4
    large = budget_split(32 * gib, gib // 2, grads, gib // 4)
    assert large[0] == 2 * grads + gib
    assert sum(large) == 32 * gib - gib // 2


def test_device_none_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="needs 'cpu' or 'nvme'"):
        _engine(OffloadConfig(device="none"))


def test_bad_block_size(tmp_path):
    with pytest.raises(ValueError, match="block_size=5000 must be a multiple of 4096"):
        _engine(offload_config(tmp_path, aio={"block_size": 5000}))


def test_a_micro_batch_too_long_for_the_budget_is_refused_before_the_step(tmp_path):
    """One block's recomputation grows with the tokens of a micro-batch and nothing bounds it:
    a batch whose estimate does not fit beside the smallest pool stops before any work, and the
    budget the message names is enough."""
    import torch

    from stalwart.models.gpt import GPT, GPTConfig

    def model():
        return GPT(GPTConfig(context_length=300_000, depth=2))

    engine = _engine_with_budget(model(), tmp_path, 2.0)
    before = engine.gather_parameters()
    tokens = torch.zeros(1, 300_001, dtype=torch.long)
    with pytest.raises(ValueError, match="a micro-batch of 300000 tokens needs about") as refused:
        engine.train_step([(tokens[:, :-1], tokens[:, 1:])], 1e-3)
    assert "lower the batch size or the sequence length" in str(refused.value)
    after = engine.gather_parameters()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert engine.step_count == 0
    engine.close()
    roomy = _engine_with_budget(model(), tmp_path, _suggested_budget(refused) + 0.02)
    roomy.check_activation_room(300_000)  # does not raise
    roomy.close()


def test_a_long_micro_batch_takes_its_room_from_the_pool(tmp_path):
    engine = OffloadEngine(tiny_gpt(), offload_config(tmp_path), optim_config(), loss_fn=lm_loss)
    per_token = engine.recompute_estimate_bytes(1)
    assert engine.recompute_estimate_bytes(1000) == pytest.approx(1000 * per_token, rel=1e-3)
    spare = engine.workspace_bytes - 2 * engine._largest_grad_bytes - (96 << 20)
    room = max(spare, 0) + engine.activation_allowance_bytes // 4
    spare_pool = engine.pool.budget_bytes - engine.min_pool_bytes
    pool_before = engine.pool.budget_bytes
    engine.check_activation_room(room // per_token - 1)  # fits: nothing moves
    assert engine.pool.budget_bytes == pool_before and engine.activation_reserve_bytes == 0
    tokens = (room + spare_pool // 2) // per_token
    engine.check_activation_room(tokens)
    need = engine.recompute_estimate_bytes(tokens)
    assert engine.activation_reserve_bytes == need - room
    assert engine.pool.budget_bytes == pool_before - (need - room)
    engine.check_activation_room(tokens // 2)  # shorter batches were covered already
    assert engine.activation_reserve_bytes == need - room
    engine.close()


def test_eager_attention_scores_are_counted_before_the_step(tmp_path):
    """Eager attention holds batch x heads x sequence^2 scores in a block's recomputation, which
    SDPA never builds: a 16k-token sequence SDPA fits in 4 GiB is refused with eager attention
    (12 B per score, 4 heads: 12.9 GB), and shorter sequences in the same tokens cost less."""
    transformers = pytest.importorskip("transformers")
    engines = {}
    for implementation in ("sdpa", "eager"):
        config = llama_config(num_hidden_layers=2, attn_implementation=implementation)
        (tmp_path / implementation).mkdir()
        engines[implementation] = OffloadEngine(
            transformers.LlamaForCausalLM(config),
            offload_config(tmp_path / implementation),
            optim_config(),
            loss_fn=lm_loss,
        )
    sdpa, eager = engines["sdpa"], engines["eager"]
    extra = {
        (tokens, length): eager.recompute_estimate_bytes(tokens, length)
        - sdpa.recompute_estimate_bytes(tokens, length)
        for tokens, length in ((4096, 4096), (4096, 1024), (8192, 4096))
    }
    assert extra[(4096, 4096)] == 12 * 4 * 4096 * 4096
    assert extra[(4096, 1024)] == extra[(4096, 4096)] // 4  # four sequences of a quarter
    assert extra[(8192, 4096)] == 2 * extra[(4096, 4096)]  # two sequences
    sdpa.check_activation_room(16384, 16384)  # does not raise
    with pytest.raises(ValueError, match="eager attention's score matrices"):
        eager.check_activation_room(16384, 16384)
    for engine in engines.values():
        engine.close()

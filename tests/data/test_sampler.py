"""The resumable sampler: one global sequence, resumable at any point, on any world size."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stalwart.data.dataset import TokenDataset, write_token_parquet
from stalwart.data.sampler import ResumableSampler, batches


def global_batches(sampler, global_batch_size, num_batches):
    return [sampler.next_global_batch(global_batch_size).tolist() for _ in range(num_batches)]


def resumed(state, **kwargs):
    sampler = ResumableSampler(**kwargs)
    sampler.load_state_dict(json.loads(json.dumps(state)))  # the state is plain JSON
    return sampler


def test_each_epoch_is_a_seeded_permutation():
    sampler = ResumableSampler(100, seed=3)
    epoch0, epoch1 = sampler.epoch_order(0).tolist(), sampler.epoch_order(1).tolist()
    assert sorted(epoch0) == sorted(epoch1) == list(range(100))
    assert epoch0 != epoch1
    assert ResumableSampler(100, seed=3).epoch_order(1).tolist() == epoch1
    assert ResumableSampler(100, seed=4).epoch_order(0).tolist() != epoch0
    assert ResumableSampler(10, shuffle=False).epoch_order(5).tolist() == list(range(10))


@settings(max_examples=60, deadline=None)
@given(
    num_samples=st.integers(1, 60),
    global_batch_size=st.integers(1, 16),
    num_before=st.integers(0, 30),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
)
def test_resume_from_state_dict_yields_exactly_the_remaining_sequence(
    num_samples, global_batch_size, num_before, drop_last, shuffle
):
    if drop_last and global_batch_size > num_samples:
        return
    settings_ = dict(num_samples=num_samples, seed=7, shuffle=shuffle, drop_last=drop_last)
    reference = ResumableSampler(**settings_)
    expected = global_batches(reference, global_batch_size, num_before + 12)

    original = ResumableSampler(**settings_)
    assert global_batches(original, global_batch_size, num_before) == expected[:num_before]
    state = original.state_dict()
    assert all(isinstance(value, int | bool) for value in state.values())
    assert (
        global_batches(resumed(state, **settings_), global_batch_size, 12) == expected[num_before:]
    )


def test_resume_across_an_epoch_boundary():
    settings_ = dict(num_samples=10, seed=1, shuffle=True, drop_last=True)
    reference = ResumableSampler(**settings_)
    expected = global_batches(reference, 4, 8)  # two batches per epoch, tail of 2 dropped
    sampler = ResumableSampler(**settings_)
    global_batches(sampler, 4, 3)
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (1, 4)
    assert global_batches(resumed(state, **settings_), 4, 5) == expected[3:]
    # Every batch lies inside one epoch's permutation.
    for number, batch in enumerate(expected):
        order = ResumableSampler(**settings_).epoch_order(number // 2).tolist()
        start = (number % 2) * 4
        assert batch == order[start : start + 4]


def test_drop_last_false_wraps_into_the_next_epoch_and_skips_nothing():
    sampler = ResumableSampler(10, seed=2, drop_last=False)
    handed_out = sum(global_batches(sampler, 4, 5), [])  # 20 samples = exactly two epochs
    orders = [ResumableSampler(10, seed=2).epoch_order(epoch).tolist() for epoch in (0, 1)]
    assert handed_out == orders[0] + orders[1]


@pytest.mark.parametrize("old_world, new_world", [(2, 3), (4, 1), (1, 6)])
def test_resume_on_another_world_size_continues_the_global_sequence(old_world, new_world):
    global_batch_size = 12
    settings_ = dict(num_samples=50, seed=5)
    expected = global_batches(ResumableSampler(**settings_), global_batch_size, 10)

    old_ranks = [ResumableSampler(**settings_) for _ in range(old_world)]
    for step in range(4):
        slices = [s.next_indices(global_batch_size, r, old_world) for r, s in enumerate(old_ranks)]
        assert sum(slices, []) == expected[step]
    states = [sampler.state_dict() for sampler in old_ranks]
    assert all(state == states[0] for state in states)  # every rank holds the same cursor

    new_ranks = [resumed(states[0], **settings_) for _ in range(new_world)]
    for step in range(4, 10):
        slices = [s.next_indices(global_batch_size, r, new_world) for r, s in enumerate(new_ranks)]
        assert all(len(piece) == global_batch_size // new_world for piece in slices)
        assert sum(slices, []) == expected[step]


def test_bad_arguments_and_mismatched_states_raise():
    sampler = ResumableSampler(10, seed=0)
    with pytest.raises(ValueError, match="not divisible by world size 3"):
        sampler.next_indices(8, 0, 3)
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        sampler.next_indices(8, 2, 2)
    with pytest.raises(ValueError, match="larger than the dataset"):
        sampler.next_indices(16, 0, 1)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        ResumableSampler(0)
    state = ResumableSampler(10, seed=1).state_dict()
    with pytest.raises(ValueError, match="saved with seed=1"):
        sampler.load_state_dict(state)
    with pytest.raises(ValueError, match="saved with num_samples=10"):
        ResumableSampler(11, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        ResumableSampler(10, seed=1).load_state_dict(state | {"position": 10})


def test_batches_shift_targets_and_resume(tmp_path):
    documents = [np.arange(n) % 250 for n in range(1, 60)]
    write_token_parquet(tmp_path / "d.parquet", documents, eos_id=257, vocab_size=259)
    dataset = TokenDataset(tmp_path / "d.parquet", 16)
    sampler = ResumableSampler(len(dataset), seed=0)
    iterator = batches(dataset, sampler, batch_size_per_rank=3, rank=1, world_size=2)
    consumed = [next(iterator) for _ in range(3)]
    for inputs, targets in consumed:
        assert inputs.shape == targets.shape == (3, 16)
        assert inputs.dtype == targets.dtype == torch.int64
        assert inputs.is_contiguous() and targets.is_contiguous()
        torch.testing.assert_close(inputs[:, 1:], targets[:, :-1], rtol=0, atol=0)
    state = sampler.state_dict()
    assert state["position"] == 3 * 6  # three global batches of 2 ranks x 3
    following = next(iterator)
    again = ResumableSampler(len(dataset), seed=0)
    again.load_state_dict(state)
    inputs, targets = next(batches(dataset, again, 3, rank=1, world_size=2))
    torch.testing.assert_close(inputs, following[0], rtol=0, atol=0)
    torch.testing.assert_close(targets, following[1], rtol=0, atol=0)
    assert len(list(batches(dataset, again, 3, num_batches=2))) == 2


def test_peek_indices_does_not_move_the_cursor():
    sampler = ResumableSampler(10, seed=3)
    sampler.next_indices(4, 0, 1)
    state = sampler.state_dict()
    peeked = [sampler.peek_indices(4, 1, 2, ahead=ahead) for ahead in (1, 2, 3)]
    assert sampler.state_dict() == state
    assert [sampler.next_indices(4, 1, 2) for _ in range(3)] == peeked  # crosses an epoch


def test_prefetch_changes_nothing_but_the_timing(tmp_path):
    documents = [np.arange(n) % 250 for n in range(1, 80)]
    write_token_parquet(tmp_path / "d.parquet", documents, eos_id=257, vocab_size=259)
    dataset = TokenDataset(tmp_path / "d.parquet", 8, cache_bytes=0)
    plain_sampler = ResumableSampler(len(dataset), seed=1)
    plain = list(batches(dataset, plain_sampler, 4, num_batches=30))
    prefetch_sampler = ResumableSampler(len(dataset), seed=1)
    iterator = batches(dataset, prefetch_sampler, 4, prefetch=True)
    fetched = [next(iterator) for _ in range(30)]
    # The read-ahead batch has not been handed out, so the cursor has not moved past it.
    assert prefetch_sampler.state_dict() == plain_sampler.state_dict()
    for (a_inputs, a_targets), (b_inputs, b_targets) in zip(plain, fetched):
        torch.testing.assert_close(a_inputs, b_inputs, rtol=0, atol=0)
        torch.testing.assert_close(a_targets, b_targets, rtol=0, atol=0)
    # Moving the sampler under a live iterator (a state load) discards the read-ahead batch.
    prefetch_sampler.load_state_dict(ResumableSampler(len(dataset), seed=1).state_dict())
    torch.testing.assert_close(next(iterator)[0], plain[0][0], rtol=0, atol=0)
    iterator.close()


def _small_dataset(tmp_path):
    documents = [np.arange(n) % 250 for n in range(1, 40)]
    write_token_parquet(tmp_path / "d.parquet", documents, eos_id=257, vocab_size=259)
    return TokenDataset(tmp_path / "d.parquet", 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_pin_memory_without_cuda_is_a_clear_error(tmp_path):
    dataset = _small_dataset(tmp_path)
    with pytest.raises(ValueError, match="pin_memory=True\\) needs a CUDA device"):
        next(batches(dataset, ResumableSampler(len(dataset)), 2, pin_memory=True))


@pytest.mark.gpu
def test_pinned_batches_equal_the_plain_ones(tmp_path):
    dataset = _small_dataset(tmp_path)
    plain = list(batches(dataset, ResumableSampler(len(dataset)), 2, num_batches=3))
    pinned = list(
        batches(dataset, ResumableSampler(len(dataset)), 2, num_batches=3, pin_memory=True)
    )
    for (inputs, targets), (pinned_inputs, pinned_targets) in zip(plain, pinned):
        assert pinned_inputs.is_pinned() and pinned_targets.is_pinned()
        torch.testing.assert_close(pinned_inputs, inputs, rtol=0, atol=0)
        torch.testing.assert_close(pinned_targets, targets, rtol=0, atol=0)

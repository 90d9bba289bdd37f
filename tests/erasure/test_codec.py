"""Reed-Solomon fragments: any k rebuild the data, any flipped byte is caught, stripes decode."""

import itertools
import random

import numpy as np
import pytest
import zfec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stalwart.erasure import codec
from stalwart.erasure.codec import (
    FRAGMENT_HEADER_NBYTES,
    CorruptFragment,
    NotEnoughFragments,
    decode,
    decode_stripe,
    encode,
    encode_parity,
    measure_encode_throughput,
    verify_fragment,
)

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def coded_message(draw):
    k = draw(st.integers(1, 6))
    n = draw(st.integers(k, min(k + 4, 9)))
    data = draw(st.binary(min_size=0, max_size=3000))
    return data, k, n


@FAST
@given(coded_message(), st.randoms(use_true_random=False))
def test_every_k_subset_of_fragments_rebuilds_the_data(case, rnd):
    data, k, n = case
    fragments = encode(data, k, n)
    assert len(fragments) == n
    for subset in itertools.combinations(range(n), k):
        chosen = [fragments[i] for i in subset]
        rnd.shuffle(chosen)
        assert decode(chosen, k, n) == data
        # Missing fragments given as None, in their original positions.
        with_holes = [fragments[i] if i in subset else None for i in range(n)]
        assert decode(with_holes, k, n) == data


@FAST
@given(coded_message(), st.data())
def test_a_single_flipped_byte_anywhere_is_detected(case, draw):
    data, k, n = case
    fragments = encode(data, k, n)
    victim = draw.draw(st.integers(0, n - 1))
    position = draw.draw(st.integers(0, len(fragments[victim]) - 1))
    flip = draw.draw(st.integers(1, 255))
    corrupt = bytearray(fragments[victim])
    corrupt[position] ^= flip
    with pytest.raises(CorruptFragment):
        verify_fragment(corrupt)
    # With the corrupt one and k-1 good ones, decode must refuse rather than return garbage.
    others = [f for i, f in enumerate(fragments) if i != victim][: k - 1]
    with pytest.raises(NotEnoughFragments) as info:
        decode([corrupt, *others], k, n)
    assert info.value.num_valid == k - 1 and info.value.num_needed == k
    # With k good ones besides it, the corrupt fragment is simply skipped.
    if n > k:
        good = [f for i, f in enumerate(fragments) if i != victim][:k]
        assert decode([corrupt, *good], k, n) == data


def test_every_byte_of_a_small_fragment_is_covered_by_the_checksum():
    fragments = encode(b"stalwart erasure", 3, 5)
    for fragment in fragments:
        for position in range(len(fragment)):
            corrupt = bytearray(fragment)
            corrupt[position] ^= 0x01
            with pytest.raises(CorruptFragment):
                verify_fragment(corrupt)


def test_truncated_or_extended_fragments_count_as_missing():
    data = bytes(range(256)) * 10
    fragments = encode(data, 2, 4)
    damaged = [fragments[0][:-1], fragments[1] + b"\x00", fragments[2][:10], fragments[3]]
    with pytest.raises(NotEnoughFragments, match="only 1 valid fragments, 2 needed"):
        decode(damaged, 2, 4)


def test_fragments_of_another_buffer_or_shape_are_not_mixed_in():
    first = encode(b"a" * 100, 2, 4, tag=1)
    second = encode(b"b" * 300, 2, 4, tag=2)
    # One fragment of each buffer: neither has k of its own.
    with pytest.raises(NotEnoughFragments):
        decode([first[0], second[1]], 2, 4)
    with pytest.raises(NotEnoughFragments):
        decode(first, 2, 4, tag=2)
    with pytest.raises(NotEnoughFragments, match="expected whole-buffer fragments with k=3"):
        decode(first, 3, 4)
    assert decode([second[3], first[0], first[3]], 2, 4, tag=1) == b"a" * 100


def test_header_layout_is_fixed_and_documented():
    fragments = encode(b"xyz" * 11, 2, 3, tag=7)
    header = verify_fragment(fragments[2])
    assert fragments[2][:4] == b"SWEC"
    assert (header.k, header.n, header.index, header.tag) == (2, 3, 2, 7)
    assert header.original_nbytes == 33 and header.payload_nbytes == 17
    assert len(fragments[2]) == FRAGMENT_HEADER_NBYTES + 17


@pytest.mark.parametrize(
    "k, n, match",
    [(0, 2, "k=0"), (3, 2, "n=2"), (2, 300, "n=300")],
)
def test_bad_code_parameters_raise_clear_errors(k, n, match):
    with pytest.raises(ValueError, match=match):
        encode(b"data", k, n)


def _stripe_chunks(rng, k, max_nbytes):
    return [
        rng.integers(0, 256, int(rng.integers(0, max_nbytes)), dtype=np.uint8) for _ in range(k)
    ]


@pytest.mark.parametrize("k, m", [(1, 1), (2, 1), (3, 2), (6, 2), (4, 3)])
def test_stripe_parity_matches_zfec_and_every_erasure_set_up_to_m_decodes(k, m):
    rng = np.random.default_rng(k * 10 + m)
    chunks = _stripe_chunks(rng, k, 2000)
    chunk_nbytes = max(len(c) for c in chunks)
    parity = encode_parity(chunks, m)
    # The payloads are exactly zfec's parity of the zero-padded stripe.
    padded = [bytes(c) + bytes(chunk_nbytes - len(c)) for c in chunks]
    reference = zfec.Encoder(k, k + m).encode(padded)[k:]
    for fragment, expected in zip(parity, reference):
        assert bytes(codec.fragment_payload(fragment)) == expected
    members = list(range(k + m))
    for num_lost in range(m + 1):
        for lost in itertools.combinations(members, num_lost):
            data_in = [None if i in lost else chunks[i] for i in range(k)]
            parity_in = [None if k + j in lost else parity[j] for j in range(m)]
            decoded = decode_stripe(data_in, parity_in)
            for i in range(k):
                assert bytes(decoded[i]) == chunks[i].tobytes()
                if i not in lost:
                    assert decoded[i] is chunks[i]  # survivors are passed through, not copied


def test_stripe_corrupt_data_chunk_is_rebuilt_from_parity_and_m_plus_one_losses_fail():
    rng = np.random.default_rng(5)
    chunks = _stripe_chunks(rng, 4, 500)
    chunks[1] = rng.integers(0, 256, 500, dtype=np.uint8)
    parity = encode_parity(chunks, 2)
    corrupt = chunks[1].copy()
    corrupt[17] ^= 0x40
    decoded = decode_stripe([chunks[0], corrupt, None, chunks[3]], parity)
    assert bytes(decoded[1]) == chunks[1].tobytes() and bytes(decoded[2]) == chunks[2].tobytes()
    with pytest.raises(NotEnoughFragments, match="data chunk 1: xxh3-64 differs"):
        decode_stripe([chunks[0], corrupt, None, chunks[3]], [parity[0], None])


def test_stripe_parity_of_another_version_is_rejected():
    rng = np.random.default_rng(6)
    old = _stripe_chunks(rng, 3, 300)
    new = [c.copy() for c in old]
    new[0] = np.append(new[0], np.uint8(1))
    old_parity = encode_parity(old, 2, tag=11)
    new_parity = encode_parity(new, 2, tag=12)
    with pytest.raises(NotEnoughFragments):
        decode_stripe([None, new[1], new[2]], [old_parity[0], None], tag=12)
    with pytest.raises(NotEnoughFragments, match="different stripe version"):
        decode_stripe([None, None, new[2]], [new_parity[0], old_parity[1]])
    assert bytes(decode_stripe([None, new[1], new[2]], new_parity, tag=12)[0]) == new[0].tobytes()


@pytest.mark.parametrize("num_threads, segment_nbytes", [(1, 7), (3, 64), (2, 1 << 20)])
def test_segmented_and_threaded_parity_equal_single_pass(num_threads, segment_nbytes):
    rng = np.random.default_rng(7)
    chunks = _stripe_chunks(rng, 5, 5000)
    expected = [bytes(f) for f in encode_parity(chunks, 3, segment_nbytes=1 << 30)]
    actual = encode_parity(chunks, 3, num_threads=num_threads, segment_nbytes=segment_nbytes)
    assert [bytes(f) for f in actual] == expected
    only_second = encode_parity(chunks, 3, parity_indices=[1])
    assert [bytes(f) for f in only_second] == [expected[1]]


@pytest.mark.parametrize("k, num_threads", [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_parity_into_recycled_dirty_buffers_equals_fresh_fragments(k, num_threads):
    rng = np.random.default_rng(70 + k)
    chunks = _stripe_chunks(rng, k, 3000)
    expected = [bytes(f) for f in encode_parity(chunks, 2)]
    handed_out = []

    def allocate(nbytes):  # stale bytes from an older version, as a recycled buffer has
        buffer = bytearray(rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes())
        handed_out.append(buffer)
        return buffer

    actual = encode_parity(
        chunks, 2, allocate=allocate, num_threads=num_threads, segment_nbytes=512
    )
    assert [bytes(f) for f in actual] == expected
    assert all(a is b for a, b in zip(actual, handed_out))
    with pytest.raises(ValueError, match="allocate returned 3 bytes"):
        encode_parity(chunks, 1, allocate=lambda nbytes: bytearray(3))


def test_stripe_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="data_chunks is empty"):
        encode_parity([], 1)
    with pytest.raises(ValueError, match="m=0"):
        encode_parity([b"ab"], 0)
    with pytest.raises(ValueError, match="parity_indices contains 2"):
        encode_parity([b"ab"], 2, parity_indices=[2])


def test_measure_encode_throughput_reports_both_paths_side_by_side():
    rng = np.random.default_rng(8)
    buffers = [rng.integers(0, 256, 1 << 20, dtype=np.uint8) for _ in range(2)]
    result = measure_encode_throughput(buffers, 4, 2, num_repeats=2)
    assert result["num_bytes"] == 2 << 20
    assert result["ours_bytes_per_s"] > 0 and result["zfec_bytes_per_s"] > 0
    assert result["fraction_of_zfec"] == pytest.approx(
        result["ours_bytes_per_s"] / result["zfec_bytes_per_s"]
    )
    assert result["ours_bytes_per_s"] == pytest.approx(result["num_bytes"] / result["ours_s"])


def test_decode_prefers_data_fragments_and_handles_duplicates():
    data = random.Random(0).randbytes(999)
    fragments = encode(data, 3, 6)
    assert (
        decode([fragments[5], fragments[0], fragments[0], fragments[4], fragments[2]], 3, 6) == data
    )

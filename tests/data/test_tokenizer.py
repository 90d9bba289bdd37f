"""The byte tokenizer's contract and the Hugging Face wrapper behind the same interface."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stalwart.data.tokenizer import ByteTokenizer, HuggingFaceTokenizer, Tokenizer, load_tokenizer


def test_byte_tokenizer_ids_match_the_contract():
    tokenizer = ByteTokenizer()
    assert (tokenizer.BOS, tokenizer.EOS, tokenizer.PAD, tokenizer.vocab_size) == (
        256,
        257,
        258,
        259,
    )
    assert tokenizer.encode("Az") == [65, 122]
    assert tokenizer.encode("Az", add_bos=True, add_eos=True) == [256, 65, 122, 257]
    assert tokenizer.encode("€") == [0xE2, 0x82, 0xAC]
    assert isinstance(tokenizer, Tokenizer)


@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tokenizer = ByteTokenizer()
    assert tokenizer.decode(tokenizer.encode(text, add_bos=True, add_eos=True)) == text
    assert tokenizer.encode_array(text).tolist() == tokenizer.encode(text)


def test_decode_stops_at_eos_and_skips_bos_and_pad():
    tokenizer = ByteTokenizer()
    ids = [256, 104, 258, 105, 257, 120, 121]
    assert tokenizer.decode(ids) == "hi"


def test_decode_replaces_invalid_utf8():
    tokenizer = ByteTokenizer()
    assert tokenizer.decode([0xFF, 65]) == "\ufffdA"
    # A multi-byte character cut short (generation stopped mid-character).
    assert tokenizer.decode([0xE2, 0x82]) == "\ufffd"
    assert tokenizer.decode([65, 0xC3, 257, 0xA9]) == "A\ufffd"


def test_decode_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="outside the byte tokenizer"):
        ByteTokenizer().decode([65, 300])


def test_load_tokenizer_byte_and_bad_specs(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    existing = ByteTokenizer()
    assert load_tokenizer(existing) is existing
    with pytest.raises(ValueError, match="neither 'byte' nor an existing local directory"):
        load_tokenizer("gpt2")
    with pytest.raises(ValueError, match="not a loadable Hugging Face tokenizer"):
        load_tokenizer(tmp_path)  # an empty directory


def test_hugging_face_tokenizer_round_trips_with_its_own_special_ids(hf_tokenizer_dir):
    tokenizer = load_tokenizer(str(hf_tokenizer_dir))
    assert isinstance(tokenizer, HuggingFaceTokenizer)
    assert isinstance(tokenizer, Tokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.vocab_size > 259
    for text in ["hello world", "the lazy dog jumps", "unseen wörds, 123!"]:
        ids = tokenizer.encode(text)
        assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
        framed = tokenizer.encode(text, add_bos=True, add_eos=True)
        assert framed == [tokenizer.bos_id, *ids, tokenizer.eos_id]
        assert tokenizer.decode(framed + tokenizer.encode(" trailing")) == text
    # Merges learned from the corpus make common words shorter than their bytes.
    assert len(tokenizer.encode("hello world")) < len("hello world")
    assert tokenizer.encode_batch(["hello", "world"]) == [
        tokenizer.encode("hello"),
        tokenizer.encode("world"),
    ]

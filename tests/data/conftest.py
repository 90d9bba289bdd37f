"""Fixtures for the data tests: a small Hugging Face tokenizer built offline."""

import pytest


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained on a few sentences and saved like a Hub download."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        ["hello world, the quick brown fox jumps over the lazy dog"] * 20,
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<s>", "</s>", "<pad>"],
        show_progress=False,
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    wrapped.save_pretrained(directory)
    return directory

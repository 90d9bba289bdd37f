"""Tokenizers behind one small interface: the built-in byte tokenizer and local Hugging Face ones.

Every tokenizer here has `vocab_size`, `bos_id`, `eos_id`, `pad_id`, `name`,
`encode(text, add_bos=False, add_eos=False) -> list[int]` and `decode(ids) -> str`.
`decode` stops at the first EOS and drops BOS/PAD, so a generated completion can be decoded
as is. The byte tokenizer needs no files and is what the demos, tests and the arithmetic task
use: ids 0..255 are the UTF-8 bytes, then BOS, EOS and PAD.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: lossless for any text, 259 ids, no vocabulary file."""

    BOS = 256
    EOS = 257
    PAD = 258

    name = "byte"
    vocab_size = 259
    bos_id = BOS
    eos_id = EOS
    pad_id = PAD

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.BOS)
        if add_eos:
            ids.append(self.EOS)
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        """The document's ids as int32 without special tokens (the fast path for `prepare`)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        payload = bytearray()
        for token in ids:
            token = int(token)
            if token == self.EOS:
                break
            if token < 256:
                payload.append(token)
            elif token not in (self.BOS, self.PAD):
                raise ValueError(
                    f"token id {token} is outside the byte tokenizer's vocabulary "
                    f"(0..{self.vocab_size - 1}); was the text produced by another tokenizer?"
                )
        return payload.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HuggingFaceTokenizer:
    """A local `transformers` tokenizer behind the same interface as `ByteTokenizer`.

    Special tokens are added by us, not by the tokenizer's template, so `encode` means the same
    thing for every tokenizer: the text's ids, optionally framed by BOS/EOS.
    """

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        try:
            from transformers import AutoTokenizer
        except ImportError as error:  # pragma: no cover - transformers is in the [hf] extra
            raise ImportError(
                "loading a Hugging Face tokenizer needs transformers: "
                "pip install 'stalwart[hf]' (or pip install transformers)"
            ) from error
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"data.tokenizer: {str(directory)!r} is not a loadable Hugging Face tokenizer "
                f"directory ({error}); it needs tokenizer.json or tokenizer_config.json"
            ) from error
        self.name = str(directory)
        self.vocab_size = len(self._tokenizer)
        self.bos_id = self._tokenizer.bos_token_id
        eos_id = self._tokenizer.eos_token_id
        if eos_id is None:
            raise ValueError(
                f"data.tokenizer: the tokenizer in {str(directory)!r} defines no eos_token; "
                "documents are separated by EOS, so set eos_token in its tokenizer_config.json"
            )
        self.eos_id = int(eos_id)
        pad_id = self._tokenizer.pad_token_id
        # Many causal LM tokenizers have no pad token; padding positions are masked anyway.
        self.pad_id = int(pad_id) if pad_id is not None else self.eos_id
        self._skipped_ids = {self.pad_id} | ({self.bos_id} if self.bos_id is not None else set())

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        if add_bos:
            if self.bos_id is None:
                raise ValueError(
                    f"encode(add_bos=True): the tokenizer {self.name!r} defines no bos_token"
                )
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many documents at once (the Rust tokenizers parallelise this)."""
        return self._tokenizer(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        kept = []
        for token in ids:
            token = int(token)
            if token == self.eos_id:
                break
            if token not in self._skipped_ids:
                kept.append(token)
        return self._tokenizer.decode(kept)

    def __repr__(self) -> str:
        return f"HuggingFaceTokenizer({self.name!r})"


def load_tokenizer(spec: str | Path | Tokenizer = "byte") -> Tokenizer:
    """`"byte"` -> ByteTokenizer; a local directory -> its Hugging Face tokenizer (no download).

    A tokenizer object is returned unchanged, so functions can take either a spec or an instance.
    """
    if not isinstance(spec, str | Path):
        if isinstance(spec, Tokenizer):
            return spec
        raise ValueError(f"data.tokenizer: expected 'byte' or a directory, got {spec!r}")
    if str(spec) == "byte":
        return ByteTokenizer()
    if Path(spec).is_dir():
        return HuggingFaceTokenizer(spec)
    raise ValueError(
        f"data.tokenizer: {str(spec)!r} is neither 'byte' nor an existing local directory; "
        "tokenizers are never downloaded here: fetch one first "
        "(`hf download <repo> --local-dir <dir>`) and pass that directory"
    )

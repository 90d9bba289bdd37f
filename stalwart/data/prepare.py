"""`stalwart data prepare`: turn text corpora into a token Parquet file.

Inputs (files, directories searched recursively, or globs), by extension:
- `.jsonl` / `.ndjson` (optionally `.gz`): one JSON object per line; the document is the
  string under `text_field`.
- `.parquet`: a column named `text_field` of strings, one document per row.
- anything else is UTF-8 text: by default the whole file is one document (the text survives
  byte for byte); with `text_documents="paragraph"` every blank-line-separated paragraph is
  one, stripped of surrounding whitespace.

Empty documents are skipped. Documents are written in input order (files sorted by path) so
the output is deterministic. The output is written atomically: it exists only once complete.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from stalwart.data.dataset import (
    DEFAULT_COMPRESSION,
    DEFAULT_ROWS_PER_GROUP,
    DEFAULT_TOKENS_PER_GROUP,
    TokenParquetWriter,
)
from stalwart.data.tokenizer import ByteTokenizer, HuggingFaceTokenizer, Tokenizer, load_tokenizer

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_DOCUMENT_MODES = ("file", "paragraph")
COMPRESSIONS = ("none", "zstd", "snappy", "lz4", "gzip")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_ENCODE_BATCH_DOCUMENTS = 1024


@dataclass(frozen=True)
class PrepareSummary:
    output: Path
    num_input_files: int
    num_documents: int
    num_tokens: int
    num_skipped_empty: int
    num_row_groups: int

    def __str__(self) -> str:
        return (
            f"wrote {self.output}: {self.num_documents} documents, {self.num_tokens} tokens "
            f"(+{self.num_documents} EOS separators when packed), {self.num_row_groups} row "
            f"groups, from {self.num_input_files} file(s); {self.num_skipped_empty} empty "
            "documents skipped"
        )


def _suffix_without_gz(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def resolve_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    if not inputs:
        raise ValueError("prepare: no inputs given; pass text, JSONL or Parquet files")
    files: list[Path] = []
    for item in inputs:
        text = os.fspath(item)
        if any(char in text for char in "*?["):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"prepare: the pattern {text!r} matches no files")
            files.extend(matches)
        elif Path(text).is_dir():
            matches = sorted(
                p
                for p in Path(text).rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.parts)
            )
            if not matches:
                raise FileNotFoundError(f"prepare: the directory {text!r} has no files")
            files.extend(matches)
        elif Path(text).is_file():
            files.append(Path(text))
        else:
            raise FileNotFoundError(f"prepare: input {text!r} does not exist")
    return files


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as handle:
        try:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_number}: not valid JSON ({error})") from None
                if not isinstance(record, dict) or text_field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise ValueError(
                        f"{path}:{line_number}: no field {text_field!r} (found {keys}); "
                        "choose the field with --text-field"
                    )
                value = record[text_field]
                if not isinstance(value, str):
                    raise ValueError(
                        f"{path}:{line_number}: field {text_field!r} is a "
                        f"{type(value).__name__}, expected a string"
                    )
                yield value
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 ({error})") from None


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(
            f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names}); "
            "choose the column with --text-field"
        )
    for batch in parquet.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise ValueError(
                    f"{path}: column {text_field!r} holds {type(value).__name__}, expected strings"
                )
            yield value or ""


def _text_documents(path: Path, text_documents: str) -> Iterator[str]:
    try:
        with _open_text(path) as handle:
            content = handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error}); convert it to UTF-8 first") from None
    if text_documents == "file":
        yield content
    else:
        for paragraph in _PARAGRAPH_BREAK.split(content):
            yield paragraph.strip()


def iter_documents(
    inputs: Sequence[str | os.PathLike], text_field: str = "text", text_documents: str = "file"
) -> Iterator[str]:
    """Every document's text, in order, from the inputs (see the module docstring)."""
    if text_documents not in TEXT_DOCUMENT_MODES:
        raise ValueError(
            f"text_documents must be one of {TEXT_DOCUMENT_MODES}, got {text_documents!r}"
        )
    for path in resolve_inputs(inputs):
        suffix = _suffix_without_gz(path)
        if suffix in JSONL_SUFFIXES:
            yield from _jsonl_documents(path, text_field)
        elif suffix == ".parquet":
            yield from _parquet_documents(path, text_field)
        else:
            yield from _text_documents(path, text_documents)


def _encoded(tokenizer: Tokenizer, texts: list[str]):
    if isinstance(tokenizer, ByteTokenizer):
        return [tokenizer.encode_array(text) for text in texts]
    if isinstance(tokenizer, HuggingFaceTokenizer):
        return tokenizer.encode_batch(texts)
    return [tokenizer.encode(text) for text in texts]


def prepare(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    tokenizer: str | Tokenizer = "byte",
    text_field: str = "text",
    rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
    *,
    text_documents: str = "file",
    tokens_per_group: int = DEFAULT_TOKENS_PER_GROUP,
    compression: str = DEFAULT_COMPRESSION,
) -> PrepareSummary:
    """Tokenize text/JSONL/Parquet-text inputs into one token Parquet file at `output`."""
    output = Path(output)
    if output.is_dir():
        raise ValueError(f"prepare: output {str(output)!r} is a directory; give a file path")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    input_files = resolve_inputs(inputs)
    if any(path.resolve() == output.resolve() for path in input_files):
        raise ValueError(f"prepare: output {str(output)!r} is also an input")
    tokenizer = load_tokenizer(tokenizer)
    num_skipped_empty = 0
    with TokenParquetWriter(
        output,
        eos_id=tokenizer.eos_id,
        vocab_size=tokenizer.vocab_size,
        tokenizer_name=tokenizer.name,
        rows_per_group=rows_per_group,
        tokens_per_group=tokens_per_group,
        compression=compression,
    ) as writer:
        pending: list[str] = []
        for text in iter_documents(input_files, text_field, text_documents):
            if not text:
                num_skipped_empty += 1
                continue
            pending.append(text)
            if len(pending) == _ENCODE_BATCH_DOCUMENTS:
                writer.add_many(_encoded(tokenizer, pending))
                pending = []
        writer.add_many(_encoded(tokenizer, pending))
    if writer.num_documents == 0:
        output.unlink()
        raise ValueError("prepare: the inputs hold no non-empty documents")
    return PrepareSummary(
        output=output,
        num_input_files=len(input_files),
        num_documents=writer.num_documents,
        num_tokens=writer.num_tokens,
        num_skipped_empty=num_skipped_empty,
        num_row_groups=pq.ParquetFile(output).metadata.num_row_groups,
    )


# ---------------------------------------------------------------------------------------------
# Command line (`stalwart data prepare`)


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "inputs", nargs="+", help="text, .jsonl or .parquet files, directories or globs"
    )
    parser.add_argument("-o", "--output", required=True, help="the token .parquet file to write")
    parser.add_argument(
        "--tokenizer", default="byte", help="'byte' or a local Hugging Face tokenizer directory"
    )
    parser.add_argument(
        "--text-field", default="text", help="JSONL field / Parquet column holding the text"
    )
    parser.add_argument(
        "--text-documents",
        choices=TEXT_DOCUMENT_MODES,
        default="file",
        help="plain text: one document per file, or per blank-line-separated paragraph",
    )
    parser.add_argument(
        "--rows-per-group", type=int, default=DEFAULT_ROWS_PER_GROUP, help="documents per row group"
    )
    parser.add_argument(
        "--tokens-per-group",
        type=int,
        default=DEFAULT_TOKENS_PER_GROUP,
        help="a row group closes at this many tokens even with fewer documents",
    )
    parser.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default=DEFAULT_COMPRESSION,
        help="Parquet compression on top of delta bit-packing (zstd: smaller, ~5%% slower reads)",
    )
    return parser


def run_prepare(args: argparse.Namespace) -> int:
    summary = prepare(
        args.inputs,
        args.output,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        rows_per_group=args.rows_per_group,
        text_documents=args.text_documents,
        tokens_per_group=args.tokens_per_group,
        compression=args.compression,
    )
    print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stalwart data prepare", description="tokenize text into a token Parquet file"
    )
    return run_prepare(add_prepare_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

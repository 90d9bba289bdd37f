"""Parquet token datasets: the on-disk format, its writer, and packed random-access windows.

Format: Parquet files with one column `tokens` (list<int32>), one document per row. Our writer
also stores, in the file's key-value metadata, the EOS id, the tokenizer, the vocabulary size
and each row group's token count, so opening a dataset reads only the footers. Files from
elsewhere work too (the index is then built by one pass over the row groups).

Packing: the documents of all files, in order, form one token stream in which every document
is followed by EOS. Sample `i` is the window `stream[i*L : i*L + L + 1]` for context length L:
inputs are `window[:-1]`, targets `window[1:]`. Consecutive windows overlap by one token, so
every token of the stream after the first is a target exactly once per epoch.

Random access reads only the row groups a window touches, through a memory map, and keeps the
most recently used decoded row groups in a bounded cache (sequential reads decode each row
group once; shuffled reads over a dataset that fits the cache decode each row group once).
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

TOKENS_COLUMN = "tokens"
FORMAT_VERSION = "stalwart.tokens/1"
_META_FORMAT = b"stalwart.format"
_META_EOS_ID = b"stalwart.eos_id"
_META_TOKENIZER = b"stalwart.tokenizer"
_META_VOCAB_SIZE = b"stalwart.vocab_size"
_META_ROW_GROUP_TOKENS = b"stalwart.row_group_num_tokens"

DEFAULT_ROWS_PER_GROUP = 8192
# A shuffled read decodes a whole row group (pyarrow reads no smaller unit), at a cost
# proportional to its size: 32 Ki tokens (128 KiB) costs ~0.2 ms per cold window while the
# footer stays ~4 MB per billion tokens. See docs/data.md for the measurements.
DEFAULT_TOKENS_PER_GROUP = 1 << 15
DEFAULT_CACHE_BYTES = 256 << 20
# On top of delta bit-packing, zstd costs ~5% of decode speed and shrinks redundant text more.
DEFAULT_COMPRESSION = "zstd"

PathSpec = str | os.PathLike | Sequence[str | os.PathLike]


# ---------------------------------------------------------------------------------------------
# Writing


class TokenParquetWriter:
    """Streams documents (sequences of token ids) into one token Parquet file, atomically.

    The file appears under its final name only after `close()` succeeds (temp file + rename),
    so a crashed `prepare` never leaves a truncated dataset behind. A row group is flushed when
    it holds `rows_per_group` documents or `tokens_per_group` tokens, whichever comes first.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        eos_id: int,
        vocab_size: int,
        tokenizer_name: str = "byte",
        rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
        tokens_per_group: int = DEFAULT_TOKENS_PER_GROUP,
        compression: str = DEFAULT_COMPRESSION,
    ):
        if rows_per_group < 1:
            raise ValueError(f"rows_per_group must be >= 1, got {rows_per_group}")
        if tokens_per_group < 1:
            raise ValueError(f"tokens_per_group must be >= 1, got {tokens_per_group}")
        if not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id {eos_id} is outside the vocabulary 0..{vocab_size - 1}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.eos_id = int(eos_id)
        self.vocab_size = int(vocab_size)
        self.tokenizer_name = tokenizer_name
        self.rows_per_group = rows_per_group
        self.tokens_per_group = tokens_per_group
        handle, temporary = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        os.close(handle)
        self._temporary_path = Path(temporary)
        self._writer = pq.ParquetWriter(
            self._temporary_path,
            pa.schema([pa.field(TOKENS_COLUMN, pa.list_(pa.int32()))]),
            compression=compression,
            # Delta bit-packing stores ids in about as many bits as the vocabulary needs
            # (1.2 bytes per byte-level token, 2.2 for a 50k vocabulary, instead of 4) and
            # decodes nearly as fast as plain int32; dictionary pages would only cost time.
            use_dictionary=False,
            column_encoding={f"{TOKENS_COLUMN}.list.element": "DELTA_BINARY_PACKED"},
        )
        self._pending: list[np.ndarray] = []
        self._pending_num_tokens = 0
        self._row_group_num_tokens: list[int] = []
        self.num_documents = 0
        self.num_tokens = 0
        self._closed = False

    def add(self, tokens: Iterable[int] | np.ndarray) -> None:
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"a document must be a 1-D sequence of token ids, got {array.shape}")
        if array.size and array.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {array.dtype}")
        # The id range is checked per row group in `_flush`: one pass instead of one per document.
        self._pending.append(array)
        self._pending_num_tokens += array.size
        self.num_documents += 1
        self.num_tokens += array.size
        if (
            len(self._pending) >= self.rows_per_group
            or self._pending_num_tokens >= self.tokens_per_group
        ):
            try:
                self._flush()
            except BaseException:
                self.abort()
                raise

    def add_many(self, documents: Iterable[Iterable[int] | np.ndarray]) -> None:
        for document in documents:
            self.add(document)

    def _flush(self) -> None:
        if not self._pending:
            return
        lengths = np.fromiter((len(d) for d in self._pending), dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = np.concatenate(self._pending) if lengths.sum() else np.empty(0, np.int32)
        if values.size:
            outside = (values < 0) | (values >= self.vocab_size)
            if outside.any():
                first = int(np.argmax(outside))
                document = (
                    self.num_documents
                    - len(lengths)
                    + int(np.searchsorted(offsets, first, "right"))
                    - 1
                )
                raise ValueError(
                    f"document {document} holds token id {int(values[first])}, outside the "
                    f"vocabulary 0..{self.vocab_size - 1}"
                )
        values = values.astype(np.int32, copy=False)
        column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))
        table = pa.Table.from_arrays([column], names=[TOKENS_COLUMN])
        self._writer.write_table(table, row_group_size=len(lengths))
        self._row_group_num_tokens.append(int(lengths.sum()))
        self._pending = []
        self._pending_num_tokens = 0

    def close(self) -> Path:
        if self._closed:
            return self.path
        try:
            self._flush()
        except BaseException:
            self.abort()
            raise
        self._writer.add_key_value_metadata(
            {
                _META_FORMAT: FORMAT_VERSION,
                _META_EOS_ID: str(self.eos_id),
                _META_TOKENIZER: self.tokenizer_name,
                _META_VOCAB_SIZE: str(self.vocab_size),
                _META_ROW_GROUP_TOKENS: json.dumps(self._row_group_num_tokens),
            }
        )
        self._writer.close()
        os.replace(self._temporary_path, self.path)
        self._closed = True
        return self.path

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        self._temporary_path.unlink(missing_ok=True)

    def __enter__(self) -> TokenParquetWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_token_parquet(
    path: str | os.PathLike,
    documents: Iterable[Iterable[int] | np.ndarray],
    *,
    eos_id: int,
    vocab_size: int,
    tokenizer_name: str = "byte",
    rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
    tokens_per_group: int = DEFAULT_TOKENS_PER_GROUP,
    compression: str = DEFAULT_COMPRESSION,
) -> Path:
    """Write documents (token id sequences) as one token Parquet file; returns its path."""
    with TokenParquetWriter(
        path,
        eos_id=eos_id,
        vocab_size=vocab_size,
        tokenizer_name=tokenizer_name,
        rows_per_group=rows_per_group,
        tokens_per_group=tokens_per_group,
        compression=compression,
    ) as writer:
        writer.add_many(documents)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Reading


def resolve_parquet_paths(spec: PathSpec) -> list[Path]:
    """A file, a directory (its *.parquet files), a glob, or a list of those -> sorted files."""
    specs = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    if not specs:
        raise ValueError("data.path: no parquet files given")
    paths: list[Path] = []
    for item in specs:
        text = os.fspath(item)
        if any(char in text for char in "*?["):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise FileNotFoundError(f"data.path: the pattern {text!r} matches no files")
            paths.extend(matches)
        elif Path(text).is_dir():
            matches = sorted(p for p in Path(text).glob("*.parquet") if p.is_file())
            if not matches:
                raise FileNotFoundError(f"data.path: the directory {text!r} has no *.parquet files")
            paths.extend(matches)
        elif Path(text).is_file():
            paths.append(Path(text))
        else:
            raise FileNotFoundError(
                f"data.path: {text!r} does not exist; create it with `stalwart data prepare`"
            )
    return paths


def _metadata(parquet: pq.ParquetFile) -> dict[bytes, bytes]:
    return dict(parquet.schema_arrow.metadata or {}) | dict(parquet.metadata.metadata or {})


def _check_tokens_column(path: Path, parquet: pq.ParquetFile) -> None:
    schema = parquet.schema_arrow
    if TOKENS_COLUMN not in schema.names:
        raise ValueError(
            f"{path}: no column {TOKENS_COLUMN!r} (columns: {schema.names}); a token dataset has "
            f"one column {TOKENS_COLUMN!r} of list<int32>: convert text with `stalwart data prepare`"
        )
    column_type = schema.field(TOKENS_COLUMN).type
    is_list = pa.types.is_list(column_type) or pa.types.is_large_list(column_type)
    if not is_list or not pa.types.is_integer(column_type.value_type):
        raise ValueError(
            f"{path}: column {TOKENS_COLUMN!r} has type {column_type}, expected list<int32> "
            "(one list of token ids per document)"
        )


class _RowGroupRef:
    __slots__ = ("file_index", "row_group", "num_documents", "num_stream_tokens")

    def __init__(self, file_index: int, row_group: int, num_documents: int, num_stream_tokens: int):
        self.file_index = file_index
        self.row_group = row_group
        self.num_documents = num_documents
        self.num_stream_tokens = num_stream_tokens


class TokenDataset:
    """Packed windows of `context_length + 1` tokens over one or more token Parquet files.

    `dataset[i]` is a LongTensor of `context_length + 1` ids; `get_batch(indices)` stacks many.
    `eos_id` defaults to what the files record; pass it for files written elsewhere.
    `vocab_size`, when given, is checked against the files (a model must cover every id).
    """

    def __init__(
        self,
        path: PathSpec,
        context_length: int,
        *,
        eos_id: int | None = None,
        vocab_size: int | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        if not isinstance(context_length, int) or context_length < 1:
            raise ValueError(f"context_length must be a positive int, got {context_length!r}")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.paths = resolve_parquet_paths(path)
        self.context_length = context_length
        self.cache_bytes = cache_bytes
        self._files: list[pq.ParquetFile | None] = [None] * len(self.paths)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_bytes = 0

        recorded_eos_ids: set[int] = set()
        recorded_vocab_sizes: list[int] = []
        self.tokenizer_name: str | None = None
        self.max_token_id: int | None = -1
        self._row_groups: list[_RowGroupRef] = []
        for file_index, file_path in enumerate(self.paths):
            parquet = self._open(file_index)
            _check_tokens_column(file_path, parquet)
            metadata = _metadata(parquet)
            if _META_EOS_ID in metadata:
                recorded_eos_ids.add(int(metadata[_META_EOS_ID]))
            if _META_VOCAB_SIZE in metadata:
                recorded_vocab_sizes.append(int(metadata[_META_VOCAB_SIZE]))
            if _META_TOKENIZER in metadata and self.tokenizer_name is None:
                self.tokenizer_name = metadata[_META_TOKENIZER].decode()
            self._index_file(file_index, parquet, metadata)

        if len(recorded_eos_ids) > 1:
            raise ValueError(
                f"data.path: the files record different EOS ids {sorted(recorded_eos_ids)}; "
                "they were tokenized with different tokenizers"
            )
        if eos_id is None:
            if not recorded_eos_ids:
                raise ValueError(
                    f"{self.paths[0]}: the file records no EOS id (not written by stalwart); "
                    "pass eos_id=<your tokenizer's EOS id>"
                )
            eos_id = recorded_eos_ids.pop()
        elif recorded_eos_ids and eos_id not in recorded_eos_ids:
            raise ValueError(
                f"eos_id={eos_id} but the files were written with EOS id "
                f"{recorded_eos_ids.pop()}: use the tokenizer the data was prepared with"
            )
        self.eos_id = int(eos_id)
        if self.max_token_id is not None:
            self.max_token_id = max(self.max_token_id, self.eos_id)
        if vocab_size is not None:
            self._check_vocab_size(vocab_size, recorded_vocab_sizes)

        counts = np.fromiter((g.num_stream_tokens for g in self._row_groups), dtype=np.int64)
        self._row_group_starts = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self._row_group_starts[1:])
        self.num_tokens = int(self._row_group_starts[-1])
        self.num_documents = sum(g.num_documents for g in self._row_groups)
        self.num_samples = max(0, (self.num_tokens - 1) // context_length)
        if self.num_samples == 0:
            raise ValueError(
                f"data.path: {self.num_tokens} tokens cannot fill one window of "
                f"context_length + 1 = {context_length + 1} tokens; add data or shorten "
                "model.context_length"
            )

    # -- index ------------------------------------------------------------------------------

    def _index_file(self, file_index: int, parquet: pq.ParquetFile, metadata: dict) -> None:
        file_metadata = parquet.metadata
        recorded = None
        if _META_ROW_GROUP_TOKENS in metadata:
            recorded = json.loads(metadata[_META_ROW_GROUP_TOKENS])
            if len(recorded) != file_metadata.num_row_groups:
                recorded = None  # rewritten by another tool: trust only the data
        leaf_column_index = next(
            index
            for index in range(len(parquet.schema))
            if parquet.schema.column(index).path.split(".")[0] == TOKENS_COLUMN
        )
        for row_group in range(file_metadata.num_row_groups):
            group_metadata = file_metadata.row_group(row_group)
            num_documents = group_metadata.num_rows
            if recorded is not None:
                num_document_tokens = int(recorded[row_group])
            else:
                values, _ = self._read_documents(file_index, row_group)
                num_document_tokens = len(values)
            self._row_groups.append(
                _RowGroupRef(
                    file_index, row_group, num_documents, num_document_tokens + num_documents
                )
            )
            self._update_max_token_id(group_metadata, leaf_column_index)

    def _update_max_token_id(self, group_metadata, leaf_column_index: int) -> None:
        if self.max_token_id is None:
            return
        statistics = group_metadata.column(leaf_column_index).statistics
        if group_metadata.num_rows and (statistics is None or not statistics.has_min_max):
            self.max_token_id = None  # unknown without reading the data
        elif statistics is not None and statistics.has_min_max:
            self.max_token_id = max(self.max_token_id, int(statistics.max))

    def _check_vocab_size(self, vocab_size: int, recorded_vocab_sizes: list[int]) -> None:
        too_large = [size for size in recorded_vocab_sizes if size > vocab_size]
        if too_large:
            raise ValueError(
                f"model.vocab_size is {vocab_size} but the data was tokenized with a vocabulary "
                f"of {max(too_large)}: set model.vocab_size >= {max(too_large)}"
            )
        if self.max_token_id is not None and self.max_token_id >= vocab_size:
            raise ValueError(
                f"model.vocab_size is {vocab_size} but the data holds token id "
                f"{self.max_token_id}: set model.vocab_size >= {self.max_token_id + 1}"
            )

    # -- reading ----------------------------------------------------------------------------

    def _open(self, file_index: int) -> pq.ParquetFile:
        parquet = self._files[file_index]
        if parquet is None:
            parquet = pq.ParquetFile(pa.memory_map(str(self.paths[file_index]), "r"))
            self._files[file_index] = parquet
        return parquet

    def _read_documents(self, file_index: int, row_group: int) -> tuple[np.ndarray, np.ndarray]:
        """A row group's token values and document offsets into them (numpy, mostly zero-copy)."""
        # One row group is small: arrow's thread pool costs more than it saves (about 2x).
        table = self._open(file_index).read_row_group(
            row_group, columns=[TOKENS_COLUMN], use_threads=False
        )
        column = table.column(0).combine_chunks()
        if column.null_count:
            raise ValueError(
                f"{self.paths[file_index]}: row group {row_group} has {column.null_count} null "
                "documents; write empty lists instead"
            )
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy()
        values = values[offsets[0] : offsets[-1]]
        return values, offsets - offsets[0]

    def _row_group_stream(self, group_index: int) -> np.ndarray:
        """The row group's documents, each followed by EOS, as int32 (cached, LRU)."""
        stream = self._cache.get(group_index)
        if stream is not None:
            self._cache.move_to_end(group_index)
            return stream
        reference = self._row_groups[group_index]
        values, offsets = self._read_documents(reference.file_index, reference.row_group)
        num_documents = len(offsets) - 1
        if len(values) + num_documents != reference.num_stream_tokens:
            raise ValueError(
                f"{self.paths[reference.file_index]}: row group {reference.row_group} holds "
                f"{len(values) + num_documents} tokens but its footer records "
                f"{reference.num_stream_tokens}; the file was modified after it was written"
            )
        # EOS goes right after each document (several in a row after empty documents).
        stream = np.insert(values.astype(np.int32, copy=False), offsets[1:], self.eos_id)
        self._remember(group_index, stream)
        return stream

    def _remember(self, group_index: int, stream: np.ndarray) -> None:
        self._cache[group_index] = stream
        self._cached_bytes += stream.nbytes
        # Always keep the newest entry, even when it alone exceeds the budget.
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.nbytes

    def _copy_tokens(self, start: int, out: np.ndarray) -> None:
        """Copy stream[start : start + len(out)] into `out`."""
        group_index = int(np.searchsorted(self._row_group_starts, start, side="right")) - 1
        filled = 0
        while filled < len(out):
            stream = self._row_group_stream(group_index)
            offset = start + filled - int(self._row_group_starts[group_index])
            take = min(len(out) - filled, len(stream) - offset)
            out[filled : filled + take] = stream[offset : offset + take]
            filled += take
            group_index += 1

    def _check_index(self, index: int) -> int:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} samples")
        return index % self.num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> torch.Tensor:
        index = self._check_index(int(index))
        window = np.empty(self.context_length + 1, dtype=np.int64)
        self._copy_tokens(index * self.context_length, window)
        return torch.from_numpy(window)

    def get_batch(self, indices: Sequence[int]) -> torch.Tensor:
        """Windows for `indices` as one [len(indices), context_length + 1] LongTensor."""
        batch = np.empty((len(indices), self.context_length + 1), dtype=np.int64)
        for row, index in enumerate(indices):
            self._copy_tokens(self._check_index(int(index)) * self.context_length, batch[row])
        return torch.from_numpy(batch)

    # -- pickling (Ray actors, worker processes): memory maps do not travel ------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = [None] * len(self.paths)
        state["_cache"] = OrderedDict()
        state["_cached_bytes"] = 0
        return state

    def __repr__(self) -> str:
        return (
            f"TokenDataset({len(self.paths)} file(s), {self.num_documents} documents, "
            f"{self.num_tokens} tokens, {self.num_samples} windows of {self.context_length + 1})"
        )

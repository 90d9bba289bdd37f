"""Benchmark of the data hot path: `python -m stalwart.data.benchmark [--json FILE]`.

Reads the same shuffled sequence of training batches from one random-token corpus stored
two ways, side by side in one run:

- baseline: the packed stream as a flat uint16 `.bin` file read through `np.memmap`, windows
  sliced per sample (nanoGPT's `get_batch`, including its fresh memmap per batch);
- ours: the token Parquet dataset (`TokenDataset.get_batch`; defaults: delta bit-packing and
  zstd): cold (no decoded row group reused), cold without zstd, with the default row-group
  cache on a first and a second pass, sequentially, and through `batches(prefetch=True)`
  overlapping a stand-in compute step.

Also times `prepare` on generated text against the plain way of writing a token Parquet
file (`pq.write_table` on Python lists). Every figure is measured here; ratios compare rows
of the same run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stalwart.data.arithmetic import write_synthetic_parquet
from stalwart.data.dataset import DEFAULT_CACHE_BYTES, DEFAULT_TOKENS_PER_GROUP, TokenDataset
from stalwart.data.prepare import prepare
from stalwart.data.sampler import ResumableSampler, batches


def _timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def _best_of(runs, repeats: int) -> dict[str, float]:
    """Best wall time of each run over `repeats` rounds, the runs interleaved within a round
    so that a burst of load elsewhere on the machine hits all of them alike."""
    best_s = {name: float("inf") for name, *_ in runs}
    for _ in range(repeats):
        for name, _, setup, run in runs:
            state = setup()
            best_s[name] = min(best_s[name], _timed(lambda run=run, state=state: run(state)))
    return best_s


def _memmap_batches(bin_path: Path, batch_indices, context_length: int) -> None:
    for indices in batch_indices:
        stream = np.memmap(bin_path, dtype=np.uint16, mode="r")
        torch.stack(
            [
                torch.from_numpy(
                    stream[i * context_length : i * context_length + context_length + 1].astype(
                        np.int64
                    )
                )
                for i in indices
            ]
        )


def _parquet_batches(dataset: TokenDataset, batch_indices) -> None:
    for indices in batch_indices:
        dataset.get_batch(indices)


def bench_reads(
    directory: Path,
    num_tokens: int,
    context_length: int,
    batch_size: int,
    num_batches: int,
    repeats: int,
) -> list[dict]:
    parquet_path = write_synthetic_parquet(directory / "tokens.parquet", num_tokens, seed=0)
    plain_path = write_synthetic_parquet(
        directory / "tokens-uncompressed.parquet", num_tokens, seed=0, compression="none"
    )
    reference = TokenDataset(parquet_path, context_length)
    bin_path = directory / "tokens.bin"
    windows = reference.get_batch(range(len(reference))).numpy()
    # Consecutive windows overlap by one token: drop it, keep the very last token.
    stream = np.concatenate([windows[:, :-1].reshape(-1), windows[-1, -1:]])
    del windows
    stream.astype(np.uint16).tofile(bin_path)
    del stream

    def shuffled_indices():
        sampler = ResumableSampler(len(reference), seed=0)
        return [sampler.next_indices(batch_size, 0, 1) for _ in range(num_batches)]

    sequential = ResumableSampler(len(reference), seed=0, shuffle=False)
    sequential_indices = [sequential.next_indices(batch_size, 0, 1) for _ in range(num_batches)]
    indices = shuffled_indices()
    _memmap_batches(bin_path, indices, context_length)  # page cache warm for both readers
    _parquet_batches(TokenDataset(parquet_path, context_length, cache_bytes=0), indices)

    def fresh(cache_bytes: int, path: Path = parquet_path) -> Callable[[], TokenDataset]:
        return lambda: TokenDataset(path, context_length, cache_bytes=cache_bytes)

    def warmed() -> TokenDataset:
        dataset = TokenDataset(parquet_path, context_length, cache_bytes=DEFAULT_CACHE_BYTES)
        _parquet_batches(dataset, indices)
        return dataset

    size_ratio = plain_path.stat().st_size / parquet_path.stat().st_size
    # (name, note, setup (untimed), run (timed))
    readers = [
        (
            "memmap .bin (baseline)",
            "np.memmap per batch",
            lambda: None,
            lambda _: _memmap_batches(bin_path, indices, context_length),
        ),
        (
            "parquet, shuffled, cold",
            "every window decodes its row group",
            fresh(0),
            lambda dataset: _parquet_batches(dataset, indices),
        ),
        (
            "parquet uncompressed, shuffled, cold",
            f"{size_ratio:.2f}x the file size",
            fresh(0, plain_path),
            lambda dataset: _parquet_batches(dataset, indices),
        ),
        (
            "parquet, shuffled, cache 1st pass",
            "decodes each row group once",
            fresh(DEFAULT_CACHE_BYTES),
            lambda dataset: _parquet_batches(dataset, indices),
        ),
        (
            "parquet, shuffled, cache 2nd pass",
            "all row groups cached",
            warmed,
            lambda dataset: _parquet_batches(dataset, indices),
        ),
        (
            "parquet, sequential",
            "shuffle=False",
            fresh(DEFAULT_CACHE_BYTES),
            lambda dataset: _parquet_batches(dataset, sequential_indices),
        ),
    ]
    best_s = _best_of(readers, repeats)

    # Overlap: a stand-in compute step (as long as a cold read) per batch, with and without
    # read-ahead. Sleeping releases the GIL as a GPU step or torch's CPU kernels do.
    compute_s = best_s["parquet, shuffled, cold"] / num_batches

    def train_like(prefetch: bool) -> None:
        dataset = TokenDataset(parquet_path, context_length, cache_bytes=0)
        sampler = ResumableSampler(len(dataset), seed=0)
        for _ in batches(dataset, sampler, batch_size, num_batches=num_batches, prefetch=prefetch):
            time.sleep(compute_s)

    note = f"compute {1000 * compute_s:.2f} ms/batch"
    overlap = [
        ("cold + compute, no prefetch", note, lambda: None, lambda _: train_like(False)),
        ("cold + compute, prefetch", note, lambda: None, lambda _: train_like(True)),
    ]
    best_s |= _best_of(overlap, repeats)
    rows = []
    for name, note, _, _ in readers + overlap:
        seconds = best_s[name]
        rows.append(
            {
                "reader": name,
                "batches_per_s": num_batches / seconds,
                "tokens_per_s": num_batches * batch_size * context_length / seconds,
                "ms_per_batch": 1000 * seconds / num_batches,
                "note": note,
            }
        )
    baseline = rows[0]["batches_per_s"]
    for row in rows:
        row["vs_memmap"] = row["batches_per_s"] / baseline
    return rows


def bench_prepare(directory: Path, num_documents: int, repeats: int) -> list[dict]:
    generator = np.random.default_rng(0)
    words = ["the", "data", "token", "stalwart", "ärger", "naïve", "λ", "snapshot", "node"]
    lines = []
    for _ in range(num_documents):
        length = int(generator.integers(20, 400))
        lines.append(json.dumps({"text": " ".join(generator.choice(words, length))}))
    jsonl = directory / "corpus.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    size_mb = jsonl.stat().st_size / 1e6

    def plain() -> None:
        texts = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
        tokens = [list(text.encode("utf-8")) for text in texts]
        table = pa.table({"tokens": pa.array(tokens, pa.list_(pa.int32()))})
        pq.write_table(table, directory / "plain.parquet")

    runs = [
        ("pq.write_table on lists (baseline)", "", lambda: None, lambda _: plain()),
        (
            "stalwart prepare",
            "",
            lambda: None,
            lambda _: prepare([jsonl], directory / "prepared.parquet"),
        ),
    ]
    best_s = _best_of(runs, repeats)
    outputs = [directory / "plain.parquet", directory / "prepared.parquet"]
    return [
        {
            "writer": name,
            "mb_per_s": size_mb / best_s[name],
            "output_mb": output.stat().st_size / 1e6,
        }
        for (name, *_), output in zip(runs, outputs)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-tokens", type=int, default=32_000_000)
    parser.add_argument("--context-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-batches", type=int, default=200)
    parser.add_argument("--prepare-documents", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many rounds")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        reads = bench_reads(
            directory,
            args.num_tokens,
            args.context_length,
            args.batch_size,
            args.num_batches,
            args.repeats,
        )
        writes = bench_prepare(directory, args.prepare_documents, args.repeats)
    print(
        f"reads: {args.num_batches} shuffled batches of {args.batch_size} x "
        f"{args.context_length + 1} tokens from {args.num_tokens / 1e6:.0f}M random tokens "
        f"(row groups of {DEFAULT_TOKENS_PER_GROUP} tokens)"
    )
    print(
        f"| {'reader':36} | {'batches/s':>10} | {'Mtok/s':>8} | {'ms/batch':>8} | "
        f"{'vs memmap':>9} | note"
    )
    print(f"|{'-' * 38}|{'-' * 12}|{'-' * 10}|{'-' * 10}|{'-' * 11}|------")
    for row in reads:
        print(
            f"| {row['reader']:36} | {row['batches_per_s']:10.1f} | "
            f"{row['tokens_per_s'] / 1e6:8.1f} | {row['ms_per_batch']:8.2f} | "
            f"{row['vs_memmap']:8.3f}x | {row['note']}"
        )
    print(
        f"\nprepare: {args.prepare_documents} JSONL documents, byte tokenizer "
        "(baseline: pyarrow defaults, snappy + dictionary; ours: delta + zstd)"
    )
    print(f"| {'writer':36} | {'MB/s':>8} | {'vs baseline':>11} | {'output MB':>9} |")
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 13}|{'-' * 11}|")
    for row in writes:
        ratio = row["mb_per_s"] / writes[0]["mb_per_s"]
        print(
            f"| {row['writer']:36} | {row['mb_per_s']:8.1f} | {ratio:10.2f}x | "
            f"{row['output_mb']:9.1f} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"settings": vars(args), "reads": reads, "prepare": writes}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

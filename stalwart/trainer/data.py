"""The datasets and the sampler a run's `data` section asks for.

Generated corpora (arithmetic, synthetic) are written once per content into the run's data
folder under a name derived from their parameters; concurrent ranks write to private temp
files and rename, so they never read a half-written file.
"""

from __future__ import annotations

import os
from pathlib import Path

from stalwart.data.dataset import TokenDataset
from stalwart.data.sampler import ResumableSampler

EVAL_FRACTION = 0.1


def _materialise(path: Path, write) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        write(temporary)
        os.replace(temporary, path)
    return path


def build_datasets(config, *, cache_dir: Path, rank: int = 0):
    """(train dataset, eval dataset, sampler) for the run config."""
    data = config.data
    context_length = config.model.context_length
    if data.kind == "arithmetic":
        from stalwart.data.arithmetic import write_arithmetic_parquet
        from stalwart.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(data.tokenizer)
        stem = f"arithmetic-n{data.num_examples}-max{data.max_operand}-seed{data.seed}"
        paths = {}
        for split, count in (
            ("train", data.num_examples),
            ("test", max(64, int(data.num_examples * EVAL_FRACTION))),
        ):
            paths[split] = _materialise(
                cache_dir / f"{stem}-{split}.parquet",
                lambda target, split=split, count=count: write_arithmetic_parquet(
                    target,
                    count,
                    seed=data.seed,
                    tokenizer=tokenizer,
                    max_operand=data.max_operand,
                    split=split,
                ),
            )
        train = TokenDataset(paths["train"], context_length, vocab_size=config.model.vocab_size)
        evaluation = TokenDataset(paths["test"], context_length, vocab_size=config.model.vocab_size)
    elif data.kind == "synthetic":
        from stalwart.data.arithmetic import write_synthetic_parquet

        num_tokens = data.num_examples * (context_length + 1)
        path = _materialise(
            cache_dir
            / f"synthetic-t{num_tokens}-v{config.model.vocab_size}-seed{data.seed}.parquet",
            lambda target: write_synthetic_parquet(
                target, num_tokens, seed=data.seed, vocab_size=config.model.vocab_size
            ),
        )
        train = evaluation = TokenDataset(path, context_length, vocab_size=config.model.vocab_size)
    else:
        train = TokenDataset(data.path, context_length, vocab_size=config.model.vocab_size)
        evaluation = train
    if len(train) < config.trainer.batch_size:
        raise ValueError(
            f"the dataset has {len(train)} windows of data.context_length+1 tokens, fewer than "
            f"trainer.batch_size ({config.trainer.batch_size}); add data or lower the batch size"
        )
    sampler = ResumableSampler(len(train), seed=data.seed, shuffle=data.shuffle)
    return train, evaluation, sampler

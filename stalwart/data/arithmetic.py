"""Arithmetic with verifiable answers: the task behind the demo, the tests and RL rewards.

A problem is an expression of `num_operands` integers in 0..max_operand joined by operators
from `ops` (`+`, `-`, `*`; `*` binds tighter), e.g. prompt "12+7=" and answer "19". Its
training text is prompt + answer ("12+7=19"); a model's completion is graded by reading the
integer it starts with.

Train/test split: a problem belongs to the test split when a fixed hash of its prompt falls in
the lowest `test_fraction` of the hash range. The split depends on the problem alone, never on
the seed or on the other settings, so no seed or configuration can leak test problems into
training. The seed only chooses which problems are drawn and in what order.

Also here: `write_arithmetic_parquet` (a supervised corpus as a token dataset) and
`write_synthetic_parquet` (random tokens, for benchmarks).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from stalwart.data.dataset import (
    DEFAULT_COMPRESSION,
    DEFAULT_ROWS_PER_GROUP,
    DEFAULT_TOKENS_PER_GROUP,
    TokenParquetWriter,
)
from stalwart.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

ALLOWED_OPS = "+-*"
_SPLIT_HASH_SEED = 0x5EED_A417  # fixed forever: changing it would reshuffle every split
_SPLIT_CODES = {"train": 0, "test": 1}
# Problem spaces up to this size are enumerated (permuted); larger ones are sampled.
_MAX_ENUMERATED = 1 << 21
_LEADING_INTEGER = re.compile(r"\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


def format_example(problem: Problem) -> str:
    """The training text of a problem: its prompt followed by its answer ("12+7=19")."""
    return problem.prompt + problem.answer


def extract_answer(completion: str) -> str | None:
    """The integer a completion starts with (leading spaces allowed), or None.

    `completion` is the generated text after the prompt, already cut at EOS by `decode`.
    """
    match = _LEADING_INTEGER.match(completion)
    return match.group(1) if match else None


def reward(problem: Problem, completion: str) -> float:
    """1.0 when the completion's answer equals the problem's answer exactly, else 0.0."""
    return 1.0 if extract_answer(completion) == problem.answer else 0.0


def _evaluate(operands: list[int], operators: str) -> int:
    # Products bind tighter than sums: fold each '*' into the current signed term.
    terms = [operands[0]]
    for operator, operand in zip(operators, operands[1:]):
        if operator == "*":
            terms[-1] *= operand
        elif operator == "+":
            terms.append(operand)
        else:
            terms.append(-operand)
    return sum(terms)


class ArithmeticTask:
    def __init__(
        self,
        seed: int = 0,
        max_operand: int = 99,
        num_operands: int = 2,
        ops: str = "+-",
        test_fraction: float = 0.1,
    ):
        if not isinstance(max_operand, int) or max_operand < 1:
            raise ValueError(f"max_operand must be an int >= 1, got {max_operand!r}")
        if not isinstance(num_operands, int) or num_operands < 2:
            raise ValueError(f"num_operands must be an int >= 2, got {num_operands!r}")
        if not ops or any(op not in ALLOWED_OPS for op in ops) or len(set(ops)) != len(ops):
            raise ValueError(
                f"ops must be distinct characters from {ALLOWED_OPS!r}, got {ops!r} (e.g. '+-')"
            )
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        self.seed = int(seed)
        self.max_operand = max_operand
        self.num_operands = num_operands
        self.ops = ops
        self.test_fraction = test_fraction
        self._num_operand_values = max_operand + 1
        self.num_possible_problems = self._num_operand_values**num_operands * len(ops) ** (
            num_operands - 1
        )
        self._test_threshold = int(test_fraction * 2**64)

    # -- problems ----------------------------------------------------------------------------

    def _problem_at(self, index: int) -> Problem:
        """Decode a problem number in 0..num_possible_problems-1 (mixed radix)."""
        operands = []
        for _ in range(self.num_operands):
            index, operand = divmod(index, self._num_operand_values)
            operands.append(operand)
        operators = []
        for _ in range(self.num_operands - 1):
            index, op_index = divmod(index, len(self.ops))
            operators.append(self.ops[op_index])
        prompt = "".join(f"{a}{op}" for a, op in zip(operands, operators)) + f"{operands[-1]}="
        return Problem(prompt, str(_evaluate(operands, "".join(operators))))

    def split_of(self, problem: Problem) -> str:
        digest = xxhash.xxh64_intdigest(problem.prompt.encode(), seed=_SPLIT_HASH_SEED)
        return "test" if digest < self._test_threshold else "train"

    def _candidate_numbers(self, split: str, pass_index: int) -> Iterator[int]:
        generator = np.random.Generator(
            np.random.PCG64([self.seed, _SPLIT_CODES[split], pass_index])
        )
        if self.num_possible_problems <= _MAX_ENUMERATED:
            yield from generator.permutation(self.num_possible_problems).tolist()
            return
        # Too many to enumerate: sample numbers, skipping repeats (rare in a space this large).
        seen: set[int] = set()
        while True:
            for number in generator.integers(0, self.num_possible_problems, 4096).tolist():
                if number not in seen:
                    seen.add(number)
                    yield number

    def iter_problems(self, split: str = "train", repeat: bool = False) -> Iterator[Problem]:
        """The split's problems without repeats in a seeded order; with `repeat`, endless
        (once the split is exhausted a new pass starts in a new order)."""
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        pass_index = 0
        while True:
            found_any = False
            for number in self._candidate_numbers(split, pass_index):
                problem = self._problem_at(number)
                if self.split_of(problem) == split:
                    found_any = True
                    yield problem
            if not repeat or not found_any:
                return
            pass_index += 1

    def problems(self, num: int, split: str = "train") -> list[Problem]:
        """`num` distinct problems of the split, deterministic in (seed, split); `problems(n)`
        is a prefix of `problems(m)` for n < m."""
        if not isinstance(num, int) or num < 0:
            raise ValueError(f"num must be a non-negative int, got {num!r}")
        chosen = []
        for problem in self.iter_problems(split):
            if len(chosen) == num:
                break
            chosen.append(problem)
        if len(chosen) < num:
            raise ValueError(
                f"the {split} split has only {len(chosen)} distinct problems with "
                f"max_operand={self.max_operand}, num_operands={self.num_operands}, "
                f"ops={self.ops!r}; ask for fewer or raise max_operand"
            )
        return chosen

    # The task's functions as methods too, so callers can hold just the task object.
    format_example = staticmethod(format_example)
    extract_answer = staticmethod(extract_answer)
    reward = staticmethod(reward)

    def __repr__(self) -> str:
        return (
            f"ArithmeticTask(seed={self.seed}, max_operand={self.max_operand}, "
            f"num_operands={self.num_operands}, ops={self.ops!r})"
        )


# ---------------------------------------------------------------------------------------------
# Corpora


def write_arithmetic_parquet(
    path: str | os.PathLike,
    num_examples: int,
    seed: int = 0,
    tokenizer: str | Tokenizer = "byte",
    *,
    split: str = "train",
    max_operand: int = 99,
    num_operands: int = 2,
    ops: str = "+-",
    task: ArithmeticTask | None = None,
    rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
) -> Path:
    """A supervised corpus: one document per problem, `format_example(p)` tokenized.

    The problems come from `task` when given (its seed and settings), else from an
    `ArithmeticTask(seed, max_operand, num_operands, ops)`.

    The dataset follows every document with EOS, so the model reads "12+7=19<EOS>...": it
    learns to stop after the answer. Problems are distinct until the split is exhausted, then
    repeat in a new order (a small split simply yields several epochs' worth).
    """
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    tokenizer = load_tokenizer(tokenizer)
    if task is None:
        task = ArithmeticTask(seed, max_operand, num_operands, ops)
    with TokenParquetWriter(
        path,
        eos_id=tokenizer.eos_id,
        vocab_size=tokenizer.vocab_size,
        tokenizer_name=tokenizer.name,
        rows_per_group=rows_per_group,
    ) as writer:
        for count, problem in enumerate(task.iter_problems(split, repeat=True)):
            if count == num_examples:
                break
            writer.add(tokenizer.encode(format_example(problem)))
    return Path(path)


def write_synthetic_parquet(
    path: str | os.PathLike,
    num_tokens: int,
    seed: int = 0,
    *,
    num_token_values: int = 256,
    eos_id: int = ByteTokenizer.EOS,
    vocab_size: int = ByteTokenizer.vocab_size,
    mean_document_tokens: int = 512,
    rows_per_group: int = DEFAULT_ROWS_PER_GROUP,
    tokens_per_group: int = DEFAULT_TOKENS_PER_GROUP,
    compression: str = DEFAULT_COMPRESSION,
) -> Path:
    """Uniformly random ids in 0..num_token_values-1 in documents of random length.

    The packed stream (documents plus their EOS separators) holds exactly `num_tokens` tokens.
    Defaults match the byte tokenizer.
    """
    if not isinstance(num_tokens, int) or num_tokens < 2:
        raise ValueError(f"num_tokens must be an int >= 2, got {num_tokens!r}")
    if not 1 <= num_token_values <= vocab_size:
        raise ValueError(f"num_token_values must be in 1..{vocab_size}, got {num_token_values}")
    if mean_document_tokens < 1:
        raise ValueError(f"mean_document_tokens must be >= 1, got {mean_document_tokens}")
    generator = np.random.Generator(np.random.PCG64(seed))
    with TokenParquetWriter(
        path,
        eos_id=eos_id,
        vocab_size=vocab_size,
        tokenizer_name="synthetic",
        rows_per_group=rows_per_group,
        tokens_per_group=tokens_per_group,
        compression=compression,
    ) as writer:
        remaining = num_tokens
        while remaining:
            length = int(generator.integers(1, 2 * mean_document_tokens))
            length = min(length, remaining - 1)  # the document's EOS counts too
            writer.add(generator.integers(0, num_token_values, length, dtype=np.int32))
            remaining -= length + 1
    return Path(path)

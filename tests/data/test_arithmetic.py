"""The arithmetic task: correct answers, a seed-independent disjoint split, strict rewards."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from stalwart.data.arithmetic import (
    ArithmeticTask,
    Problem,
    extract_answer,
    format_example,
    reward,
    write_arithmetic_parquet,
    write_synthetic_parquet,
)
from stalwart.data.dataset import TokenDataset
from stalwart.data.tokenizer import ByteTokenizer


def all_prompts(task):
    return [task._problem_at(number).prompt for number in range(task.num_possible_problems)]


def test_train_and_test_are_disjoint_and_cover_every_problem():
    task = ArithmeticTask(seed=0, max_operand=30)
    train = {p.prompt for p in task.iter_problems("train")}
    test = {p.prompt for p in task.iter_problems("test")}
    assert not train & test
    assert train | test == set(all_prompts(task))
    assert 0.07 < len(test) / task.num_possible_problems < 0.13


def test_the_split_does_not_depend_on_seed_or_settings():
    small = ArithmeticTask(seed=0, max_operand=30)
    other_seed = ArithmeticTask(seed=1, max_operand=30)
    larger = ArithmeticTask(seed=2, max_operand=60, ops="+-*")
    test_prompts = {p.prompt for p in small.iter_problems("test")}
    assert test_prompts == {p.prompt for p in other_seed.iter_problems("test")}
    assert not test_prompts & {p.prompt for p in larger.problems(5000, "train")}


def test_problems_are_deterministic_distinct_and_prefix_stable():
    task = ArithmeticTask(seed=4)
    first = task.problems(300)
    assert first == ArithmeticTask(seed=4).problems(300)
    assert len(set(first)) == 300
    assert task.problems(100) == first[:100]
    assert ArithmeticTask(seed=5).problems(300) != first
    tiny = ArithmeticTask(max_operand=5)
    num_test = len(list(tiny.iter_problems("test")))
    assert len(tiny.problems(num_test, "test")) == num_test
    with pytest.raises(ValueError, match=f"only {num_test} distinct problems"):
        tiny.problems(num_test + 1, "test")


@pytest.mark.parametrize("ops, num_operands", [("+-", 2), ("+-*", 3), ("*", 4)])
def test_answers_are_correct_with_precedence(ops, num_operands):
    task = ArithmeticTask(seed=0, max_operand=999, num_operands=num_operands, ops=ops)
    for problem in task.problems(200) + task.problems(50, "test"):
        assert problem.prompt.endswith("=")
        expression = problem.prompt[:-1]
        assert set(expression) <= set("0123456789" + ops)
        # Python's own arithmetic is the independent reference (digits and operators only).
        assert problem.answer == str(eval(expression))  # noqa: S307
        assert format_example(problem) == problem.prompt + problem.answer


def test_extract_answer_and_reward():
    problem = Problem("12-37=", "-25")
    assert extract_answer("-25") == "-25"
    assert extract_answer("  -25\n3+4=7") == "-25"
    assert extract_answer("-25 is it") == "-25"
    assert extract_answer("") is None
    assert extract_answer("answer: -25") is None
    assert reward(problem, "-25") == 1.0
    assert reward(problem, " -25\n") == 1.0
    assert reward(problem, ByteTokenizer().decode(list(b"-25") + [257, 55])) == 1.0
    for wrong in ["25", "-250", "-2", "-025", "", "x-25"]:
        assert reward(problem, wrong) == 0.0, wrong
    task = ArithmeticTask()
    assert task.reward(problem, "-25") == 1.0 and task.format_example(problem) == "12-37=-25"


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="ops must be distinct characters"):
        ArithmeticTask(ops="+/")
    with pytest.raises(ValueError, match="num_operands"):
        ArithmeticTask(num_operands=1)
    with pytest.raises(ValueError, match="split must be"):
        ArithmeticTask().problems(3, "validation")


def test_arithmetic_parquet_is_the_supervised_corpus(tmp_path):
    path = write_arithmetic_parquet(tmp_path / "a.parquet", 500, seed=3)
    tokenizer = ByteTokenizer()
    documents = [tokenizer.decode(ids) for ids in pq.read_table(path).column("tokens").to_pylist()]
    assert documents == [format_example(p) for p in ArithmeticTask(seed=3).problems(500)]
    dataset = TokenDataset(path, 24, vocab_size=259)
    text = bytes(t if t < 256 else ord("|") for t in dataset[0].tolist()).decode()
    assert text.startswith(documents[0] + "|" + documents[1] + "|")
    # More examples than the split holds: the problems repeat in a new order.
    small = write_arithmetic_parquet(tmp_path / "small.parquet", 200, max_operand=9, split="test")
    repeated = pq.read_table(small).column("tokens").to_pylist()
    assert len(repeated) == 200 and len({tuple(ids) for ids in repeated}) < 200


def test_synthetic_parquet_has_the_exact_token_count(tmp_path):
    path = write_synthetic_parquet(tmp_path / "s.parquet", 10_001, seed=1, mean_document_tokens=64)
    dataset = TokenDataset(path, 100, vocab_size=259)
    assert dataset.num_tokens == 10_001 and len(dataset) == 100
    tokens = dataset.get_batch(range(len(dataset))).numpy()
    regular = tokens[tokens != 257]
    assert regular.min() >= 0 and regular.max() < 256
    assert len(np.unique(regular)) > 200

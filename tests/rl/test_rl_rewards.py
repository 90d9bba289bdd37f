"""User reward functions by dotted path: results, errors, timeouts and a crashing function."""

import textwrap
import time

import pytest

from stalwart.trainer.rl.rewards import RewardError, SubprocessReward, build_reward

USER_MODULE = textwrap.dedent(
    """
    import os, time

    def length_match(prompt, completion, answer):
        print("noise on stdout must not break the protocol")
        return float(completion.strip() == answer)

    def raises(prompt, completion, answer):
        raise KeyError("no verifier for " + prompt)

    def hangs(prompt, completion, answer):
        if completion == "hang":
            time.sleep(120)
        return 1.0

    def not_a_number(prompt, completion, answer):
        return float("nan")

    def crashes(prompt, completion, answer):
        os._exit(3)
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_user_function_scores_samples(user_module):
    reward = build_reward(f"{user_module}:length_match")
    try:
        assert reward(["1+1=", "2+2="], ["2", " 5"], ["2", "4"]) == [1.0, 0.0]
        assert reward.stats.num_calls == 2 and reward.stats.num_errors == 0
    finally:
        reward.close()


def test_raising_function_gives_a_clear_error_or_zero(user_module):
    strict = SubprocessReward(f"{user_module}.raises", on_error="raise")
    try:
        with pytest.raises(RewardError, match="raises.*KeyError.*reward_on_error"):
            strict(["p"], ["c"], ["a"])
    finally:
        strict.close()
    lenient = SubprocessReward(f"{user_module}.raises", on_error="zero")
    try:
        assert lenient(["p", "q"], ["c", "d"], ["a", "b"]) == [0.0, 0.0]
        assert lenient.stats.errors_by_kind == {"exception": 2}
    finally:
        lenient.close()


def test_hanging_function_times_out_and_the_worker_is_replaced(user_module):
    reward = SubprocessReward(f"{user_module}:hangs", timeout_s=0.5, on_error="zero")
    try:
        start = time.monotonic()
        assert reward(["p", "p"], ["hang", "fine"], ["a", "a"]) == [0.0, 1.0]
        assert time.monotonic() - start < 30
        assert reward.stats.num_timeouts == 1
    finally:
        reward.close()
    strict = SubprocessReward(f"{user_module}:hangs", timeout_s=0.5, on_error="raise")
    try:
        with pytest.raises(RewardError, match="no result within 0.5s"):
            strict(["p"], ["hang"], ["a"])
    finally:
        strict.close()


def test_bad_values_and_crashes_are_errors(user_module):
    reward = SubprocessReward(f"{user_module}:not_a_number", on_error="zero")
    try:
        assert reward(["p"], ["c"], ["a"]) == [0.0]
        assert reward.stats.errors_by_kind == {"bad_value": 1}
    finally:
        reward.close()
    crashing = SubprocessReward(f"{user_module}:crashes", on_error="raise")
    try:
        with pytest.raises(RewardError, match="died"):
            crashing(["p"], ["c"], ["a"])
    finally:
        crashing.close()


def test_unknown_function_or_bad_settings_fail_at_build_time(user_module):
    with pytest.raises(ValueError, match="cannot be loaded"):
        build_reward(f"{user_module}:missing")
    with pytest.raises(ValueError, match="rl.reward"):
        build_reward("nodots")
    with pytest.raises(ValueError, match="rl.reward_timeout_s"):
        SubprocessReward(f"{user_module}:raises", timeout_s=0)

"""Verifiable reward functions, run so that a bad one can never hang or silently poison a run.

Two kinds:

- ``arithmetic``: the built-in exact-match reward of `stalwart.data.arithmetic` (1.0 when the
  extracted answer equals the reference, else 0.0). Pure and fast, it runs in-process.
- any user function named by a dotted path, ``package.module:function`` or
  ``package.module.function``, called as ``function(prompt, completion, answer) -> float``.
  It runs in a separate Python process (`reward_worker.py`) that speaks JSON lines over its
  stdin/stdout, one call at a time with a deadline. If the call raises, returns something that
  is not a finite number, or misses the deadline (the process is then killed and restarted),
  the outcome follows ``on_error``: ``"raise"`` stops with a `RewardError` that names the
  function, the sample and the cause; ``"zero"`` scores the sample 0.0 and counts the failure.

Nothing crosses the process boundary but JSON text: no pickle.
"""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

ON_ERROR_CHOICES = ("raise", "zero")
BUILTIN_REWARDS = ("arithmetic",)


class RewardError(RuntimeError):
    """A reward function failed on a sample and rl.reward_on_error is 'raise'."""


@dataclass
class RewardStats:
    num_calls: int = 0
    num_errors: int = 0
    num_timeouts: int = 0
    last_error: str | None = None
    errors_by_kind: dict[str, int] = field(default_factory=dict)


def split_dotted_path(dotted: str) -> tuple[str, str]:
    """'pkg.mod:fn' or 'pkg.mod.fn' -> ('pkg.mod', 'fn')."""
    if ":" in dotted:
        module, _, name = dotted.partition(":")
    else:
        module, _, name = dotted.rpartition(".")
    if not module or not name:
        raise ValueError(
            f"rl.reward is {dotted!r}; name a built-in ({', '.join(BUILTIN_REWARDS)}) or a "
            "function by dotted path, e.g. 'my_package.rewards:score'"
        )
    return module, name


class ArithmeticReward:
    """Exact match of the extracted answer (stalwart.data.arithmetic)."""

    name = "arithmetic"

    def __init__(self) -> None:
        from stalwart.data.arithmetic import extract_answer

        self._extract = extract_answer
        self.stats = RewardStats()

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]
    ) -> list[float]:
        self.stats.num_calls += len(completions)
        return [float(self._extract(c) == a) for c, a in zip(completions, answers)]

    def close(self) -> None:
        pass


class SubprocessReward:
    """A user reward function in its own process, one call at a time, each with a deadline."""

    def __init__(self, dotted: str, timeout_s: float = 5.0, on_error: str = "raise"):
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(
                f"rl.reward_on_error is {on_error!r}; choose one of {', '.join(ON_ERROR_CHOICES)}"
            )
        if not timeout_s > 0:
            raise ValueError(f"rl.reward_timeout_s is {timeout_s!r}; it must be > 0 seconds")
        split_dotted_path(dotted)
        self.name = dotted
        self.timeout_s = float(timeout_s)
        self.on_error = on_error
        self.stats = RewardStats()
        self._process: subprocess.Popen | None = None
        self._stderr_file = None
        self._start()

    # -- process management ----------------------------------------------------------------

    def _start(self) -> None:
        environment = dict(os.environ)
        # The user's module must import from where the run was started, as it would in-process.
        environment["PYTHONPATH"] = os.pathsep.join(
            [os.getcwd(), *[p for p in sys.path if p], environment.get("PYTHONPATH", "")]
        )
        # A file, not a pipe, so a chatty function can never block on a full stderr pipe.
        self._stderr_file = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(
            [sys.executable, "-u", "-m", "stalwart.trainer.rl.reward_worker", self.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
            env=environment,
            text=True,
            bufsize=1,
        )
        hello = self._read_line(deadline_s=max(30.0, self.timeout_s))
        if hello is None or not hello.get("ready"):
            cause = (hello or {}).get("error") or self._stderr_tail() or "no answer"
            self._kill()
            raise ValueError(f"rl.reward {self.name!r} cannot be loaded: {cause}")

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None

    def _stderr_tail(self) -> str:
        if self._stderr_file is None:
            return ""
        self._stderr_file.seek(0)
        return self._stderr_file.read().strip()[-500:]

    def _read_line(self, deadline_s: float) -> dict | None:
        """One JSON line from the worker, or None when the deadline passes or it died."""
        assert self._process is not None
        end = time.monotonic() + deadline_s
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self._process.stdout], [], [], remaining)
            if ready:
                line = self._process.stdout.readline()
                if not line:  # end of file: the worker died; reap it so poll() says so
                    try:
                        self._process.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
                    return None
                return json.loads(line)

    # -- calls ------------------------------------------------------------------------------

    def _fail(self, kind: str, message: str) -> float:
        self.stats.num_errors += 1
        self.stats.errors_by_kind[kind] = self.stats.errors_by_kind.get(kind, 0) + 1
        self.stats.last_error = message
        if self.on_error == "raise":
            raise RewardError(
                f"{message} (set rl.reward_on_error: zero to score such samples 0.0 instead)"
            )
        return 0.0

    def _score_one(self, prompt: str, completion: str, answer: str) -> float:
        if self._process is None or self._process.poll() is not None:
            self._start()
        request = {"prompt": prompt, "completion": completion, "answer": answer}
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        reply = self._read_line(self.timeout_s)
        where = f"reward {self.name!r} on completion {completion[:60]!r}"
        if reply is None:
            died = self._process.poll() is not None
            tail = self._stderr_tail() if died else ""
            self._kill()
            if died:
                return self._fail("crash", f"{where}: the reward process died. {tail}")
            self.stats.num_timeouts += 1
            return self._fail("timeout", f"{where}: no result within {self.timeout_s:g}s")
        if "error" in reply:
            return self._fail("exception", f"{where} raised {reply['error']}")
        value = reply.get("reward")
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            return self._fail("bad_value", f"{where} returned {value!r}, not a finite number")
        return float(value)

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]
    ) -> list[float]:
        self.stats.num_calls += len(completions)
        return [self._score_one(p, c, a) for p, c, a in zip(prompts, completions, answers)]

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._kill()
        self._process = None

    def __del__(self) -> None:  # a forgotten close must not leave a process behind
        try:
            self._kill()
        except Exception:
            pass


def build_reward(name: str, timeout_s: float = 5.0, on_error: str = "raise"):
    """The reward callable for ``rl.reward``: a built-in name or a dotted path."""
    if name == "arithmetic":
        return ArithmeticReward()
    return SubprocessReward(name, timeout_s=timeout_s, on_error=on_error)

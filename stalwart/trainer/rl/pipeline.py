"""The bookkeeping of the asynchronous RL pipeline (PipelineRL-k), free of Ray so it is testable.

Versions: the learner's weights start at version 0 and step s turns version s into s + 1. A
group generated with version v and consumed by step s has staleness s - v. The bound is
``staleness <= k`` (``rl.max_staleness``).

Dispatch rule (`StalenessGate`): groups are consumed in the order they were dispatched, B per
step (B = ``rl.prompts_per_step``). A new chunk dispatched now, with the newest published
version v, lands behind every group already buffered or in flight, so it will be consumed by
step ``s_next + pending // B`` where ``s_next`` is the next step to start. It may be dispatched
only if that step minus v is at most k. Generation therefore runs ahead of the learner by up to
k versions, and the learner waits (no data) when it would get further ahead. With k = 0 nothing
is generated while the learner steps, and every group is consumed by the step of the version
that generated it: exactly on-policy. Chunks never straddle two batches, so the prediction is
exact; zero-variance filtering only makes consumption earlier, never later.

`PromptPool` hands out training prompts in a seeded order, keeps each prompt's running pass
rate, and with no-positive-resampling permanently retires prompts whose pass rate reaches the
threshold. (The prompts of a lost rollout call are not returned to the pool: the driver
generates them again in their place in the dispatch order, so batches keep their boundaries.)
Its whole state is JSON (`state_dict`), saved next to the learner's durable checkpoints so that
a resumed run draws the same prompts the uninterrupted one would have.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class StalenessGate:
    max_staleness: int
    groups_per_step: int
    num_steps: int

    def chunk_size(
        self, next_step: int, pending_groups: int, published_version: int, limit: int
    ) -> int:
        """How many prompts may be dispatched now (0: wait)."""
        consume_step = next_step + pending_groups // self.groups_per_step
        if consume_step >= self.num_steps:
            return 0  # every remaining step already has its groups
        if consume_step - published_version > self.max_staleness:
            return 0
        room_in_batch = self.groups_per_step - pending_groups % self.groups_per_step
        return min(limit, room_in_batch)


@dataclass
class PromptPool:
    problems: list[Any]  # objects with .prompt and .answer
    seed: int = 0
    retire_pass_rate: float | None = None  # None: keep every prompt (no NPR)
    min_samples_to_retire: int = 1
    _order: deque = field(default_factory=deque, init=False)
    _epoch: int = field(default=0, init=False)
    num_correct: dict = field(default_factory=dict, init=False)
    num_seen: dict = field(default_factory=dict, init=False)
    retired: set = field(default_factory=set, init=False)

    def _refill(self) -> None:
        rng = np.random.default_rng([self.seed, self._epoch])
        self._epoch += 1
        self._order.extend(int(i) for i in rng.permutation(len(self.problems)))

    def take(self, num: int) -> list[dict[str, Any]]:
        tasks = []
        while len(tasks) < num:
            if not self._order:
                if len(self.retired) >= len(self.problems):
                    raise RuntimeError(
                        "no-positive-resampling retired every training prompt; lower "
                        "rl.positive_pass_rate or add data (data.num_examples)"
                    )
                self._refill()
            index = self._order.popleft()
            if index in self.retired:
                continue
            problem = self.problems[index]
            tasks.append({"problem_id": index, "prompt": problem.prompt, "answer": problem.answer})
        return tasks

    def record(self, problem_id: int, rewards: np.ndarray) -> None:
        correct = float(np.sum(np.asarray(rewards) > 0))
        self.num_correct[problem_id] = self.num_correct.get(problem_id, 0.0) + correct
        self.num_seen[problem_id] = self.num_seen.get(problem_id, 0) + len(rewards)
        if self.retire_pass_rate is None or self.num_seen[problem_id] < self.min_samples_to_retire:
            return
        if self.num_correct[problem_id] / self.num_seen[problem_id] >= self.retire_pass_rate:
            self.retired.add(problem_id)

    def state_dict(self) -> dict[str, Any]:
        """Everything `take` and `record` depend on, as JSON values."""
        return {
            "order": list(self._order),
            "epoch": self._epoch,
            "num_correct": [[k, v] for k, v in sorted(self.num_correct.items())],
            "num_seen": [[k, v] for k, v in sorted(self.num_seen.items())],
            "retired": sorted(self.retired),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        order = [int(i) for i in state["order"]]
        bad = [
            i for i in order + [int(i) for i in state["retired"]] if not 0 <= i < len(self.problems)
        ]
        if bad:
            raise ValueError(
                f"prompt pool state names problem {bad[0]} of {len(self.problems)}: it was saved "
                "with different data settings (data.num_examples, data.seed)"
            )
        self._order = deque(order)
        self._epoch = int(state["epoch"])
        self.num_correct = {int(k): float(v) for k, v in state["num_correct"]}
        self.num_seen = {int(k): int(v) for k, v in state["num_seen"]}
        self.retired = {int(i) for i in state["retired"]}

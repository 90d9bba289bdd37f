"""A rollout worker: a versioned copy of the policy that samples groups and scores them.

The worker is plain Python (the Ray actor around it lives in `launch/rl_driver.py`). It holds
a model whose weights it replaces when handed a newer `Packed` version, samples
``rl.num_samples`` completions per prompt with the sampling settings of the config, scores them
with the configured verifiable reward, and returns one group per prompt as plain numpy arrays
and JSON values. Each group records the weights version that generated it, which is what the
pipeline's staleness bound is checked against.

When a sample was interrupted by the length cap, the reward sees the text after the forced
answer prompt (the answer part), as a thinking model's verifier reads what follows its
end-of-thinking marker.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import torch

from stalwart.config import RunConfig
from stalwart.data.arithmetic import ArithmeticTask, extract_answer
from stalwart.data.tokenizer import ByteTokenizer
from stalwart.models import build_model
from stalwart.trainer.rl.analysis import answer_entropy, pass_at_k
from stalwart.trainer.rl.packing import Packed, load_model
from stalwart.trainer.rl.rewards import build_reward
from stalwart.trainer.rl.sampling import SamplingSettings, cast_lm_head_to_fp32, generate


def build_task(config: RunConfig) -> ArithmeticTask:
    data = config.data
    return ArithmeticTask(
        seed=data.seed,
        max_operand=data.max_operand,
        num_operands=getattr(data, "num_operands", 2),
        ops=getattr(data, "ops", "+-"),
    )


def train_problems(config: RunConfig) -> list:
    """Up to data.num_examples distinct training problems (fewer when the split is smaller)."""
    return list(
        itertools.islice(build_task(config).iter_problems("train"), config.data.num_examples)
    )


def test_problems(config: RunConfig) -> list:
    """Up to rl.eval_prompts held-out problems (fewer when the test split is smaller)."""
    return list(itertools.islice(build_task(config).iter_problems("test"), config.rl.eval_prompts))


def sampling_settings(config: RunConfig, tokenizer, temperature: float | None = None):
    rl = config.rl
    interrupt = rl.interrupt_at
    return SamplingSettings(
        temperature=rl.temperature if temperature is None else temperature,
        top_p=rl.top_p,
        max_new_tokens=rl.max_new_tokens,
        stop_token_ids=tuple(rl.stop_token_ids),
        pad_token_id=tokenizer.pad_id,
        interrupt_min_tokens=interrupt[0] if interrupt else None,
        interrupt_max_tokens=interrupt[1] if interrupt else None,
        interrupt_token_ids=tuple(tokenizer.encode(rl.interrupt_text)) if interrupt else (),
        answer_tokens=rl.answer_tokens,
    )


def build_policy(config: RunConfig) -> torch.nn.Module:
    model = build_model(config.model, seed=config.trainer.seed)
    if config.rl.fp32_lm_head:
        cast_lm_head_to_fp32(model)
    return model


class RolloutWorker:
    def __init__(self, config: RunConfig, worker_index: int = 0):
        torch.set_num_threads(config.rl.rollout_num_threads)
        self.config = config
        self.worker_index = worker_index
        self.tokenizer = ByteTokenizer()
        self.model = build_policy(config)
        self.model.eval()
        self.version = -1
        self.settings = sampling_settings(config, self.tokenizer)
        self.reward = build_reward(
            config.rl.reward, config.rl.reward_timeout_s, config.rl.reward_on_error
        )
        self.last_timing: dict[str, float] = {}

    def load_weights(self, packed: Packed) -> None:
        if packed.version != self.version:
            load_model(self.model, packed)
            self.version = packed.version

    def _answer_text(self, completion: str, interrupted: bool) -> str:
        marker = self.config.rl.interrupt_text
        if interrupted and marker and marker in completion:
            return completion.rsplit(marker, 1)[1]
        return completion

    def rollout(self, tasks: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
        """Sample and score one group per task ({"problem_id", "prompt", "answer"})."""
        if self.version < 0:
            raise RuntimeError("rollout worker has no weights yet; call load_weights first")
        started = time.perf_counter()
        num_samples = self.config.rl.num_samples
        prompt_ids = [self.tokenizer.encode(task["prompt"]) for task in tasks]
        repeated = [ids for ids in prompt_ids for _ in range(num_samples)]
        generator = torch.Generator().manual_seed(seed)
        generation = generate(self.model, repeated, self.settings, generator)
        generated = time.perf_counter()
        completions = [
            self.tokenizer.decode(generation.completion_ids(row)) for row in range(len(repeated))
        ]
        answer_texts = [
            self._answer_text(text, bool(generation.interrupted[row]))
            for row, text in enumerate(completions)
        ]
        rewards = self.reward(
            [t["prompt"] for t in tasks for _ in range(num_samples)],
            answer_texts,
            [t["answer"] for t in tasks for _ in range(num_samples)],
        )
        scored = time.perf_counter()
        groups = []
        for index, task in enumerate(tasks):
            rows = slice(index * num_samples, (index + 1) * num_samples)
            token_mask = generation.token_mask[rows]
            groups.append(
                {
                    "problem_id": int(task["problem_id"]),
                    "prompt": task["prompt"],
                    "answer": task["answer"],
                    "prompt_ids": prompt_ids[index],
                    "tokens": generation.tokens[rows].numpy(),
                    "token_mask": token_mask.numpy(),
                    "loss_mask": generation.loss_mask[rows].numpy(),
                    "logprobs": generation.logprobs[rows].numpy(),
                    "rewards": np.asarray(rewards[rows], dtype=np.float32),
                    "version": self.version,
                    "num_sampled_tokens": int(generation.loss_mask[rows].sum()),
                    "num_interrupted": int(generation.interrupted[rows].sum()),
                    "answers": [extract_answer(t) for t in answer_texts[rows]],
                }
            )
        busy_s = time.perf_counter() - started
        for group in groups:  # each group carries its share of the call's busy time
            group["rollout_busy_s"] = busy_s / len(groups)
        # Where this call's time went (the driver's profile adds the weight loads).
        self.last_timing = {
            "generate_s": generated - started,
            "reward_s": scored - generated,
            "busy_s": busy_s,
        }
        return groups

    @torch.no_grad()
    def evaluate(
        self, problems: list[dict[str, str]], num_samples: int, seed: int, batch_prompts: int = 64
    ) -> dict[str, Any]:
        """Held-out metrics of the loaded weights: pass@1 (mean over samples), pass@k, maj
        answers, token- and answer-level entropy, and per-problem correct counts."""
        counts, entropies, answer_entropies, lengths = [], [], [], []
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, len(problems), batch_prompts):
            chunk = problems[start : start + batch_prompts]
            repeated = [
                self.tokenizer.encode(p["prompt"]) for p in chunk for _ in range(num_samples)
            ]
            generation = generate(self.model, repeated, self.settings, generator)
            for index, problem in enumerate(chunk):
                answers = []
                for row in range(index * num_samples, (index + 1) * num_samples):
                    text = self._answer_text(
                        self.tokenizer.decode(generation.completion_ids(row)),
                        bool(generation.interrupted[row]),
                    )
                    answers.append(extract_answer(text))
                    mask = generation.loss_mask[row]
                    entropies.append(float(generation.entropies[row][mask].mean()))
                    lengths.append(int(mask.sum()))
                counts.append(sum(a == problem["answer"] for a in answers))
                answer_entropies.append(answer_entropy(answers))
        return {
            "version": self.version,
            "num_problems": len(problems),
            "num_samples": num_samples,
            "pass1": float(np.mean([pass_at_k(num_samples, c, 1) for c in counts])),
            f"pass{num_samples}": float(
                np.mean([pass_at_k(num_samples, c, num_samples) for c in counts])
            ),
            "token_entropy": float(np.mean(entropies)),
            "answer_entropy": float(np.mean(answer_entropies)),
            "mean_completion_tokens": float(np.mean(lengths)),
            "correct_counts": counts,
        }

    def close(self) -> None:
        self.reward.close()

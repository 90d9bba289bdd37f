"""Trainer overhead: `Trainer.train_step` against a bare hand-written PyTorch loop.

Both sides train the same GPT (same seed, so the same initial weights) on the same batches
with the same AdamW settings, the same parameter groups and the same gradient clipping, in
one process. The bare loop gets its batches pre-materialised (read from the same dataset in
the same sampler order before timing starts), so the Trainer pays for its own data reading
and bookkeeping while the bare loop pays for nothing but the math: the ratio is the whole
cost of the framework. Runs are interleaved (one block of steps per side, the side that goes
first alternating between repetitions), warm-up steps are excluded, and the headline figure
is the median over repetitions of the paired ratio ours / bare. Both sides must end with
bit-identical losses and parameters, which proves they did the same work.

    python bench/trainer.py                      # the table
    python bench/trainer.py --json out.json      # plus one JSON object with overhead_ratio
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stalwart.config import load_config
from stalwart.models import build_model
from stalwart.trainer.loop import Trainer

TARGET_RATIO = 1.05


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=4, help="GPT depth (width = 64 x depth)")
    parser.add_argument("--context-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps per side")
    parser.add_argument("--repetitions", type=int, default=40)
    parser.add_argument("--steps-per-block", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    return parser.parse_args()


def build_trainer(args: argparse.Namespace, run_dir: Path) -> Trainer:
    total_steps = args.warmup_steps + args.repetitions * args.steps_per_block
    config = load_config(
        None,
        [
            "name=bench-trainer",
            f"model.depth={args.depth}",
            f"model.context_length={args.context_length}",
            "data.kind=synthetic",
            f"data.num_examples={max(total_steps * args.batch_size, 1024)}",
            f"trainer.batch_size={args.batch_size}",
            f"trainer.max_steps={total_steps}",
            f"trainer.seed={args.seed}",
            f"trainer.num_threads={args.threads}",
            "trainer.device=cpu",
            "parallel.strategy=none",
            # A constant LR, so the bare loop needs no schedule to do exactly the same math.
            "optim.warmup_steps=0",
            "optim.min_lr_ratio=1.0",
        ],
    )
    return Trainer(config, run_dir=run_dir)


class BareLoop:
    """What one would write by hand: forward, cross entropy, backward, clip, AdamW."""

    def __init__(self, trainer: Trainer, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        config = trainer.config
        self.model = build_model(config.model, seed=config.trainer.seed)
        optim = config.optim
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=optim.lr,
            betas=(optim.beta1, optim.beta2),
            eps=optim.eps,
            # The same kernel choice as the Trainer made (fused AdamW on CPU where supported).
            fused=trainer.optimizer.defaults.get("fused"),
        )
        self.grad_clip = optim.grad_clip
        self.batches = batches
        self.step = 0

    def train_step(self) -> float:
        inputs, targets = self.batches[self.step]
        logits = self.model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item()


def materialise_batches(
    trainer: Trainer, num_steps: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches the Trainer will read, in order, read now from a copy of its sampler."""
    sampler = copy.deepcopy(trainer.sampler)
    batches = []
    for _ in range(num_steps):
        indices = sampler.next_indices(trainer.config.trainer.batch_size, 0, 1)
        windows = trainer.train_data.get_batch(indices)
        batches.append((windows[:, :-1], windows[:, 1:]))
    return batches


def timed_block(step, num_steps: int) -> tuple[list[float], list[float], list[float]]:
    """Wall-clock and process CPU time of each step, and its loss.

    CPU time counts every thread of this process (helper threads of the Trainer included) but
    not the time other processes hold the cores, so it stays meaningful on a shared machine.
    """
    wall_s, cpu_s, losses = [], [], []
    for _ in range(num_steps):
        wall_started, cpu_started = time.perf_counter(), time.process_time()
        losses.append(step())
        cpu_s.append(time.process_time() - cpu_started)
        wall_s.append(time.perf_counter() - wall_started)
    return wall_s, cpu_s, losses


def data_read_s(trainer: Trainer, num_reads: int = 20) -> float:
    """Median time of what the Trainer does per step that the bare loop was given for free."""
    sampler = copy.deepcopy(trainer.sampler)
    times_s = []
    for _ in range(num_reads):
        started = time.perf_counter()
        indices = sampler.next_indices(trainer.config.trainer.batch_size, 0, 1)
        trainer.train_data.get_batch(indices)
        times_s.append(time.perf_counter() - started)
    return statistics.median(times_s)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    total_steps = args.warmup_steps + args.repetitions * args.steps_per_block
    with tempfile.TemporaryDirectory(prefix="stalwart-bench-trainer-") as run_dir:
        trainer = build_trainer(args, Path(run_dir))
        bare = BareLoop(trainer, materialise_batches(trainer, total_steps))
        for (name, ours), theirs in zip(trainer.named_local_parameters(), bare.model.parameters()):
            if not torch.equal(ours, theirs):
                raise RuntimeError(f"initial weights differ at {name}: the comparison is unfair")

        def ours_step() -> float:
            return trainer.train_step()["loss"]

        sides = {"ours": ours_step, "bare": bare.train_step}
        losses = {"ours": [], "bare": []}
        for name, step in sides.items():
            losses[name] += timed_block(step, args.warmup_steps)[2]

        wall_s = {"ours": [], "bare": []}
        cpu_s = {"ours": [], "bare": []}
        block_wall_s = {"ours": [], "bare": []}
        block_cpu_s = {"ours": [], "bare": []}
        for repetition in range(args.repetitions):
            order = ("ours", "bare") if repetition % 2 == 0 else ("bare", "ours")
            for name in order:
                step_wall_s, step_cpu_s, step_losses = timed_block(
                    sides[name], args.steps_per_block
                )
                wall_s[name] += step_wall_s
                cpu_s[name] += step_cpu_s
                block_wall_s[name].append(sum(step_wall_s))
                block_cpu_s[name].append(sum(step_cpu_s))
                losses[name] += step_losses
        read_s = data_read_s(trainer)

        bit_identical = losses["ours"] == losses["bare"] and all(
            torch.equal(ours, theirs)
            for (_, ours), theirs in zip(trainer.named_local_parameters(), bare.model.parameters())
        )
        num_params = bare.model.num_params()

    ratios = [o / b for o, b in zip(block_wall_s["ours"], block_wall_s["bare"])]
    cpu_ratios = [o / b for o, b in zip(block_cpu_s["ours"], block_cpu_s["bare"])]
    overhead_ratio = statistics.median(ratios)
    cpu_overhead_ratio = statistics.median(cpu_ratios)
    tokens_per_step = args.batch_size * args.context_length
    summary = {
        name: {
            "median_step_ms": 1e3 * statistics.median(wall_s[name]),
            "min_step_ms": 1e3 * min(wall_s[name]),
            "max_step_ms": 1e3 * max(wall_s[name]),
            "median_step_cpu_ms": 1e3 * statistics.median(cpu_s[name]),
            "tokens_per_s": tokens_per_step / statistics.median(wall_s[name]),
        }
        for name in ("ours", "bare")
    }

    print(
        f"Trainer overhead: GPT depth {args.depth} ({num_params / 1e6:.2f} M parameters), "
        f"batch {args.batch_size} x {args.context_length} tokens, {args.threads} thread(s), "
        f"{args.repetitions} interleaved repetitions x {args.steps_per_block} steps "
        f"(+{args.warmup_steps} warm-up steps per side)"
    )
    header = ("median ms", "min ms", "max ms", "CPU ms", "tokens/s")
    print(f"{'':20}" + "".join(f"{column:>11}" for column in header))
    for label, name in (("bare PyTorch loop", "bare"), ("stalwart Trainer", "ours")):
        row = summary[name]
        print(
            f"{label:20}{row['median_step_ms']:>11.2f}{row['min_step_ms']:>11.2f}"
            f"{row['max_step_ms']:>11.2f}{row['median_step_cpu_ms']:>11.2f}"
            f"{row['tokens_per_s']:>11.0f}"
        )
    print(
        f"overhead ratio ours/bare, wall clock: {overhead_ratio:.3f} (median of {len(ratios)} "
        f"paired repetitions, range {min(ratios):.3f}-{max(ratios):.3f}; target <= {TARGET_RATIO})"
    )
    print(
        f"overhead ratio ours/bare, CPU time:   {cpu_overhead_ratio:.3f} (median of "
        f"{len(cpu_ratios)}, range {min(cpu_ratios):.3f}-{max(cpu_ratios):.3f})"
    )
    print(
        f"data read per step inside the Trainer (sampler + parquet windows): {read_s * 1e3:.2f} ms"
    )
    print(f"losses and final parameters bit-identical: {'yes' if bit_identical else 'NO'}")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "benchmark": "trainer_overhead",
                    "overhead_ratio": overhead_ratio,
                    "target_ratio": TARGET_RATIO,
                    "paired_ratios": ratios,
                    "cpu_time_overhead_ratio": cpu_overhead_ratio,
                    "paired_cpu_time_ratios": cpu_ratios,
                    "ours": summary["ours"],
                    "bare": summary["bare"],
                    "data_read_ms": read_s * 1e3,
                    "bit_identical": bit_identical,
                    "num_params": num_params,
                    "settings": {
                        key: str(value) if isinstance(value, Path) else value
                        for key, value in vars(args).items()
                    },
                    "torch_version": torch.__version__,
                },
                indent=2,
            )
        )
    if not bit_identical:
        raise SystemExit(
            "the Trainer and the bare loop diverged: the comparison is not like for like"
        )


if __name__ == "__main__":
    main()

"""`stalwart rl run.yaml`: rollout actors and a learner on Ray, with bounded staleness.

Roles
- `LearnerActor` wraps `trainer.rl.learner.RLLearner`. Each step returns three objects: the
  metrics, the new weights (one flat buffer + JSON layout, put once in Ray's object store) and,
  every ``snapshot.every_steps`` steps, the learner's full state, which the driver keeps (a
  numpy view of the object-store buffer) outside the learner process.
- `RolloutActor` wraps `trainer.rl.rollout.RolloutWorker`. It is handed the *reference* of the
  newest weights with their version and fetches them (zero-copy) only when the version changed:
  one put, many gets. Weights change between generation chunks of ``rl.rollout_chunk_prompts``
  prompts, never inside a sequence, so every group has exactly one generating version.
- The driver runs the loop below and owns all decisions (`trainer.rl.pipeline`): what to
  generate when (the staleness gate), the order in which groups are consumed (dispatch order),
  which prompts are retired, and recovery.

Loop: dispatch chunks to idle rollout actors while the gate allows; start a learner step when
the next ``rl.prompts_per_step`` groups in dispatch order are complete; wait for whichever
finishes first. With ``rl.max_staleness: 0`` this is synchronous on-policy RL; with k > 0 it is
PipelineRL-k: generation continues while the learner steps, and the learner waits when it
would get more than k versions ahead of the data.

Fault tolerance
- A rollout actor that dies is replaced; its in-flight prompts are re-queued at the front of
  the prompt pool and generated again with the newest weights.
- A learner that dies is rebuilt from the driver's last state copy, the steps since that copy
  are replayed on the very batches they used (the driver keeps them), and the failed step runs
  again. Learner steps are deterministic, so the recovered run continues bit for bit. In a
  multi-rank job the same state buffer is what the snapshot manager holds per rank; the driver
  copy stands in for it on one learner rank.

Evaluation runs after the loop: the weights of every ``rl.eval_every``-th version are kept (by
reference) and scored on held-out problems, so evaluation never steals time from the measured
pipeline. The curve of held-out pass@1 against learner steps is what `stalwart rl fit` fits.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import xxhash

from stalwart.config import RunConfig, config_from_dict, load_config, save_config
from stalwart.trainer.rl.analysis import (
    add_analyze_arguments,
    add_fit_arguments,
    run_analyze,
    run_fit,
)
from stalwart.trainer.rl.learner import RLLearner
from stalwart.trainer.rl.packing import Packed
from stalwart.trainer.rl.pipeline import PromptPool, StalenessGate
from stalwart.trainer.rl.rollout import RolloutWorker, test_problems, train_problems

# ---------------------------------------------------------------------------------------------
# Actors


@ray.remote(num_cpus=0, max_restarts=0)
class LearnerActor:
    def __init__(self, config_tree: dict, state: tuple | None = None):
        config = config_from_dict(config_tree)
        packed = Packed.from_tuple(state) if state is not None else None
        self.learner = RLLearner(config, packed)
        self.snapshot_every = config.snapshot.every_steps

    def pid(self) -> int:
        return os.getpid()

    def warmup(self, num_steps: int) -> dict:
        return self.learner.warmup(num_steps)

    def weights(self) -> tuple:
        return self.learner.weights().as_tuple()

    def state(self) -> tuple:
        return self.learner.state().as_tuple()

    @ray.method(num_returns=3)
    def step(self, groups: list[dict]) -> tuple[dict, tuple, tuple | None]:
        metrics = self.learner.step(groups)
        version = self.learner.version
        state = self.learner.state().as_tuple() if version % self.snapshot_every == 0 else None
        return metrics, self.learner.weights().as_tuple(), state


@ray.remote(num_cpus=0, max_restarts=0)
class RolloutActor:
    def __init__(self, config_tree: dict, index: int):
        self.worker = RolloutWorker(config_from_dict(config_tree), index)

    def pid(self) -> int:
        return os.getpid()

    def _sync(self, weights: list, version: int) -> None:
        if version != self.worker.version:
            self.worker.load_weights(Packed.from_tuple(ray.get(weights[0])))

    def rollout(self, weights: list, version: int, tasks: list[dict], seed: int) -> list[dict]:
        # `weights` is [ObjectRef] (a list, so Ray does not resolve it): fetched only when new.
        self._sync(weights, version)
        return self.worker.rollout(tasks, seed)

    def evaluate(
        self, weights: list, version: int, problems: list[dict], num_samples: int, seed: int
    ):
        self._sync(weights, version)
        return self.worker.evaluate(problems, num_samples, seed)


# ---------------------------------------------------------------------------------------------
# The loop


def _config_tree(config: RunConfig) -> dict:
    return config.to_dict()


def run_pipeline(
    config: RunConfig,
    *,
    time_budget_s: float | None = None,
    kill_learner_at_steps: tuple[int, ...] = (),
    kill_rollout_at_steps: tuple[int, ...] = (),
    evaluate: bool = True,
    log=print,
) -> dict[str, Any]:
    """Run RL to ``trainer.max_steps`` learner steps (or until ``time_budget_s`` of RL time);
    Ray must be initialised. Returns the run record (metrics, staleness, throughput, evals)."""
    rl = config.rl
    tree = _config_tree(config)
    kill_learner_at = set(kill_learner_at_steps) | {
        e.step for e in config.faults.events if e.kind == "kill_worker"
    }
    kill_rollout_at = set(kill_rollout_at_steps)
    num_steps = config.trainer.max_steps
    groups_per_step = rl.prompts_per_step
    gate = StalenessGate(rl.max_staleness, groups_per_step, num_steps)
    pool = PromptPool(
        train_problems(config),
        seed=config.trainer.seed,
        retire_pass_rate=rl.positive_pass_rate if rl.no_positive_resampling else None,
        min_samples_to_retire=rl.num_samples,
    )

    learner = LearnerActor.remote(tree)
    record: dict[str, Any] = {
        "steps": [],
        "staleness": [],
        "consumed_problem_ids": [],
        "recoveries": [],
        "evals": [],
    }
    if rl.warmup_sft_steps:
        record["warmup"] = ray.get(learner.warmup.remote(rl.warmup_sft_steps))
        log(f"supervised warm-up: {record['warmup']}")
    state = ray.get(learner.state.remote())
    state_version = 0
    weights_ref = learner.weights.remote()
    published_version = 0
    checkpoints: dict[int, Any] = {0: weights_ref}

    actors = [RolloutActor.remote(tree, i) for i in range(rl.num_rollout_workers)]
    idle = list(range(len(actors)))
    inflight: dict[Any, tuple[int, int, list[dict]]] = {}  # ref -> (actor, sequence, tasks)
    slots: dict[int, list[dict] | None] = {}  # dispatch sequence -> groups (None: in flight)
    next_sequence = 0
    pending_groups = 0  # dispatched and not yet consumed by a learner step
    next_step = 0
    learner_refs: tuple | None = None
    batches_since_state: list[list[dict]] = []
    num_sampled_tokens = 0
    rollout_busy_s = 0.0
    num_groups_generated = 0
    num_retired_seen = 0
    start = time.perf_counter()
    stop = False

    def out_of_time() -> bool:
        return time_budget_s is not None and time.perf_counter() - start >= time_budget_s

    while True:
        # 1. Dispatch generation while the staleness gate allows.
        while idle and not stop:
            size = gate.chunk_size(
                next_step, pending_groups, published_version, rl.rollout_chunk_prompts
            )
            if size == 0:
                break
            index = idle.pop(0)
            tasks = pool.take(size)
            seed = int(
                np.random.SeedSequence([config.trainer.seed, next_sequence]).generate_state(1)[0]
            )
            ref = actors[index].rollout.remote([weights_ref], published_version, tasks, seed)
            inflight[ref] = (index, next_sequence, tasks)
            slots[next_sequence] = None
            next_sequence += 1
            pending_groups += size

        # 2. Start a learner step when the next batch, in dispatch order, is complete.
        if learner_refs is None and not stop and next_step < num_steps:
            ready: list[dict] = []
            consumed_sequences = []
            for sequence in sorted(slots):
                if slots[sequence] is None or len(ready) >= groups_per_step:
                    break
                ready.extend(slots[sequence])
                consumed_sequences.append(sequence)
            if len(ready) >= groups_per_step:
                assert len(ready) == groups_per_step, "chunks never straddle batches"
                for sequence in consumed_sequences:
                    del slots[sequence]
                pending_groups -= groups_per_step
                for group in ready:
                    staleness = next_step - group["version"]
                    if staleness > rl.max_staleness or staleness < 0:
                        raise RuntimeError(
                            f"internal error: group of version {group['version']} consumed by "
                            f"step {next_step} (staleness bound {rl.max_staleness})"
                        )
                    record["staleness"].append((next_step, group["version"]))
                    record["consumed_problem_ids"].append(group["problem_id"])
                batches_since_state.append(ready)
                learner_refs = learner.step.remote(ready)
                if next_step in kill_learner_at:
                    kill_learner_at.discard(next_step)
                    log(f"fault injection: killing the learner during step {next_step}")
                    ray.kill(learner, no_restart=True)
                if next_step in kill_rollout_at and inflight:
                    kill_rollout_at.discard(next_step)
                    victim = next(iter(inflight.values()))[0]
                    log(f"fault injection: killing rollout actor {victim} at step {next_step}")
                    ray.kill(actors[victim], no_restart=True)
                next_step += 1

        if learner_refs is None and not inflight:
            break  # nothing runs and nothing may start: done

        # 3. Wait for the first thing to finish.
        waitable = list(inflight) + ([learner_refs[0]] if learner_refs is not None else [])
        done, _ = ray.wait(waitable, num_returns=1)
        finished = done[0]
        if learner_refs is not None and finished == learner_refs[0]:
            try:
                metrics = ray.get(learner_refs[0])
                new_state = ray.get(learner_refs[2])
            except ray.exceptions.RayActorError:
                learner, learner_refs = _recover_learner(
                    tree, state, batches_since_state, record, next_step - 1, log
                )
                continue
            weights_ref = learner_refs[1]
            published_version = int(metrics["version"])
            if new_state is not None:
                state, state_version = new_state, published_version
                batches_since_state = []
            metrics.update(
                step=next_step - 1,
                elapsed_s=time.perf_counter() - start,
                sampled_tokens=num_sampled_tokens,
                retired_prompts=len(pool.retired),
            )
            record["steps"].append(metrics)
            if published_version % rl.eval_every == 0 or published_version == num_steps:
                checkpoints[published_version] = weights_ref
            learner_refs = None
            if out_of_time():
                stop = True
                checkpoints[published_version] = weights_ref
            continue

        index, sequence, tasks = inflight.pop(finished)
        try:
            groups = ray.get(finished)
        except ray.exceptions.RayActorError:
            log(f"rollout actor {index} died; re-queueing {len(tasks)} prompts")
            record["recoveries"].append(
                {"kind": "rollout", "actor": index, "requeued": [t["problem_id"] for t in tasks]}
            )
            del slots[sequence]
            pending_groups -= len(tasks)
            pool.requeue(tasks)
            actors[index] = RolloutActor.remote(tree, index)
            idle.append(index)
            continue
        slots[sequence] = groups
        idle.append(index)
        for group in groups:
            num_sampled_tokens += group["num_sampled_tokens"]
            rollout_busy_s += group["rollout_busy_s"]
            num_groups_generated += 1
            pool.record(group["problem_id"], group["rewards"])
        num_retired_seen = len(pool.retired)
        if stop:
            slots.pop(sequence, None)

    wall_s = time.perf_counter() - start
    staleness = [step - version for step, version in record["staleness"]]
    record.update(
        rl_wall_s=wall_s,
        num_learner_steps=len(record["steps"]),
        num_sampled_tokens=num_sampled_tokens,
        num_groups_generated=num_groups_generated,
        sampled_tokens_per_s=num_sampled_tokens / wall_s,
        learner_steps_per_s=len(record["steps"]) / wall_s,
        max_staleness_seen=max(staleness, default=0),
        # Fraction of the wall time the rollout actors / the learner computed: what overlap buys.
        rollout_utilisation=rollout_busy_s / (wall_s * len(actors)),
        learner_utilisation=sum(m["learner_step_s"] for m in record["steps"]) / wall_s,
        mean_staleness=float(np.mean(staleness)) if staleness else 0.0,
        retired_prompts=num_retired_seen,
        final_version=published_version,
        state_version=state_version,
    )
    final = Packed.from_tuple(ray.get(weights_ref))
    record["final_weights_xxh64"] = xxhash.xxh64_hexdigest(final.buffer)
    if evaluate:
        record["evals"] = evaluate_checkpoints(config, actors, checkpoints)
    for actor in actors:
        ray.kill(actor)
    ray.kill(learner)
    return record


def _recover_learner(tree, state, batches, record, failed_step, log):
    """A new learner from the driver's state copy; replay the batches since that copy."""
    log(
        f"learner died during step {failed_step}; restoring version {state[0]} and replaying "
        f"{len(batches)} step(s)"
    )
    started = time.perf_counter()
    learner = LearnerActor.remote(tree, state)
    refs = None
    for batch in batches:
        refs = learner.step.remote(batch)
    record["recoveries"].append(
        {
            "kind": "learner",
            "step": failed_step,
            "restored_version": int(state[0]),
            "replayed_steps": len(batches),
            "restart_s": time.perf_counter() - started,
        }
    )
    return learner, refs


def evaluate_checkpoints(
    config: RunConfig, actors: list, checkpoints: dict[int, Any]
) -> list[dict]:
    """Held-out metrics of every kept version, spread over the rollout actors."""
    problems = [{"prompt": p.prompt, "answer": p.answer} for p in test_problems(config)]
    refs = []
    for position, (version, weights_ref) in enumerate(sorted(checkpoints.items())):
        actor = actors[position % len(actors)]
        refs.append(
            actor.evaluate.remote(
                [weights_ref], version, problems, config.rl.eval_num_samples, 1234
            )
        )
    return sorted(ray.get(refs), key=lambda result: result["version"])


# ---------------------------------------------------------------------------------------------
# CLI: stalwart rl run.yaml | stalwart rl analyze | stalwart rl fit


def add_rl_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run YAML (see examples/rl_arithmetic.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.max_staleness=4")
    parser.add_argument("--address", default=None, help="Ray address; default: embedded instance")
    parser.add_argument("--time-budget-s", type=float, default=None, help="stop RL after this long")
    parser.add_argument("--kill-learner-at-step", type=int, action="append", default=[])
    parser.add_argument("--kill-rollout-at-step", type=int, action="append", default=[])


def _start_ray(address: str | None, num_cpus: int) -> bool:
    """Join `address`, or start an embedded instance on 127.0.0.1. True if we started it."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
        return False
    ray.init(
        address="local",  # a fresh instance, never one another job left running
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        configure_logging=False,
    )
    return True


def run_rl(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    run_dir = config.resolved_run_dir()
    save_config(config, run_dir)
    started = _start_ray(args.address or config.cluster.address, config.rl.num_rollout_workers + 1)
    try:
        record = run_pipeline(
            config,
            time_budget_s=args.time_budget_s,
            kill_learner_at_steps=tuple(args.kill_learner_at_step),
            kill_rollout_at_steps=tuple(args.kill_rollout_at_step),
            log=lambda message: print(f"[rl] {message}", flush=True),
        )
    finally:
        if started:
            ray.shutdown()
    write_record(record, run_dir)
    first, last = record["evals"][0], record["evals"][-1]
    print(
        f"[rl] {record['num_learner_steps']} steps in {record['rl_wall_s']:.1f}s, "
        f"{record['sampled_tokens_per_s']:.0f} sampled tokens/s, max staleness "
        f"{record['max_staleness_seen']}; held-out pass@1 {first['pass1']:.3f} (v{first['version']}) "
        f"-> {last['pass1']:.3f} (v{last['version']}); wrote {run_dir}/rl_metrics.jsonl"
    )
    return 0


def write_record(record: dict, run_dir: str | Path) -> None:
    """rl_metrics.jsonl (one learner step a line), rl_evals.jsonl, rl_summary.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "rl_metrics.jsonl", "w") as handle:
        for metrics in record["steps"]:
            handle.write(json.dumps(metrics) + "\n")
    with open(run_dir / "rl_evals.jsonl", "w") as handle:
        for result in record["evals"]:
            handle.write(json.dumps(result) + "\n")
    skipped = ("steps", "evals", "staleness", "consumed_problem_ids")
    summary = {k: v for k, v in record.items() if k not in skipped}
    (run_dir / "rl_summary.json").write_text(json.dumps(summary, indent=2))


# `stalwart rl analyze` and `stalwart rl fit` live with the analysis they run.
__all__ = [
    "add_analyze_arguments",
    "add_fit_arguments",
    "add_rl_arguments",
    "run_analyze",
    "run_fit",
    "run_rl",
]

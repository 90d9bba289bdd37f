"""`stalwart rl run.yaml`: rollout actors and a learner on Ray, with bounded staleness.

Roles
- The learner is a worker group like a training job's: ``parallel.world_size`` data-parallel
  `launch.worker.TrainWorker` ranks (role ``rl_learner``, one `trainer.rl.learner.RLLearner`
  each) on ``cluster.num_nodes`` nodes, with a `SnapshotManager` per node (erasure-coded across
  nodes) and a `SnapshotAgent` in every rank, which copies the rank's whole state into its
  manager after every ``snapshot.every_steps`` steps, off the hot path. A
  `launch.controller.JobController` starts the group, watches it (`check`) and recovers it
  (`recover`) exactly as it does a training job's ranks. The driver steps it: every rank gets
  the whole batch (one put), trains on its share of the groups, the ranks all-reduce their
  gradients, and rank 0 returns the new weights (one flat buffer + JSON layout, put once).
- `RolloutActor` wraps `trainer.rl.rollout.RolloutWorker`. Every generation call carries the
  reference of the newest weights at dispatch time; the driver also *offers* each new version to
  actors with queued work (a separate concurrency group, so the offer lands while the actor
  generates). A call starts with the newest version it holds (in-flight weight updates at chunk
  boundaries) and fetches it zero-copy only when the version changed: one put, many gets. Weights
  never change inside a generation call, so every group has exactly one generating version.
- The driver (`PipelineDriver`) owns every decision of the pipeline (`trainer.rl.pipeline`):
  what to generate when (the staleness gate), the order in which groups are consumed (dispatch
  order), which prompts are retired; the controller owns the learner group's recovery.

Loop (PipelineRL-k): every rollout actor keeps up to ``rollout_queue_depth`` generation calls
queued, so it never waits for a driver round trip, as long as the staleness gate allows; the
learner gets the next batch (in dispatch order) as soon as it is complete, up to
``learner_queue_depth`` steps queued; the driver waits for whichever result comes first. With
``rl.max_staleness: 0`` the gate makes this synchronous on-policy RL (nothing is generated while
the learner steps, and the learner waits for the whole batch); with k > 0 generation continues
while the learner steps, and only stops when it would run more than k versions ahead.

Fault tolerance
- A rollout actor that dies is replaced; its in-flight chunks are generated again, in their place
  in the dispatch order, with the newest weights.
- A learner failure (a killed rank, a lost node, a hang; a rank's step failing because its peer
  died) is classified and recovered by the controller: the survivors are stopped, the newest
  version committed on every node is rebuilt where a node was lost (from parity, on a spare
  node) and loaded by a new group (standby workers with ``cluster.standby_workers``), or, beyond
  the parity, the newest durable checkpoint. The driver keeps the batches it handed out until a
  newer snapshot is published and hands the new group those since the restored version; after
  a durable fallback it rewinds the pipeline (prompt pool, dispatch sequence, rollout actors) to
  the checkpoint. Learner steps are deterministic, so with k = 0 the run continues bit for bit.
- A dead snapshot manager is restarted on its node by the controller while training goes on.

Evaluation runs after the loop: the weights of every ``rl.eval_every``-th version are kept (by
reference) and scored on held-out problems, so evaluation never steals time from the measured
pipeline. The curve of held-out pass@1 against learner steps is what `stalwart rl fit` fits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import ray
import xxhash
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from stalwart.config import FaultEvent, RunConfig, config_from_dict, load_config, save_config
from stalwart.trainer.rl.analysis import (
    add_analyze_arguments,
    add_fit_arguments,
    run_analyze,
    run_fit,
)
from stalwart.trainer.rl.packing import Packed
from stalwart.trainer.rl.pipeline import PromptPool, StalenessGate
from stalwart.trainer.rl.rollout import RolloutWorker, test_problems, train_problems

# One call generating and one queued: the actor starts the next chunk the moment it finishes one,
# instead of idling for the driver's round trip (which costs as much as a chunk on a busy host).
ROLLOUT_QUEUE_DEPTH = 2
# The next learner step is queued behind the running one when its batch is complete (k >= 1 only:
# with k = 0 its data cannot exist before the running step publishes its weights).
LEARNER_QUEUE_DEPTH = 2
# How long the driver waits for the managers to commit a version (start and end of a run).
COMMIT_WAIT_S = 10.0
STATE_DIRNAME = "rl_state"
# How often the driver asks the learner group's controller for its health.
GROUP_POLL_S = 0.5
# Fault injection (`faults.events`, by learner step) an RL run understands.
RL_FAULTS = {
    "kill_worker": "SIGKILL the learner",
    "kill_node": "remove the learner's node",
    "kill_manager": "kill the learner's snapshot manager",
}

# ---------------------------------------------------------------------------------------------
# Actors


@ray.remote(num_cpus=0, max_restarts=0, concurrency_groups={"offers": 1})
class RolloutActor:
    def __init__(self, config_tree: dict, index: int):
        self.worker = RolloutWorker(config_from_dict(config_tree), index)
        self._lock = threading.Lock()
        self._offered: tuple[int, list | None] = (-1, None)

    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="offers")
    def offer_weights(self, weights: list, version: int) -> None:
        """A newer version for the calls still queued here; loaded when the next one starts."""
        with self._lock:
            if version > self._offered[0]:
                self._offered = (version, weights)

    def _load(self, weights: list, version: int) -> float:
        # `weights` is [ObjectRef] (a list, so Ray does not resolve it): fetched only when new.
        if version == self.worker.version:
            return 0.0
        started = time.perf_counter()
        self.worker.load_weights(Packed.from_tuple(ray.get(weights[0])))
        return time.perf_counter() - started

    def rollout(self, weights: list, version: int, tasks: list[dict], seed: int) -> dict:
        """Generate with the newest weights held: the dispatch's version or a newer offer."""
        with self._lock:
            offered_version, offered = self._offered
        if offered_version > version:
            weights, version = offered, offered_version
        load_s = self._load(weights, version) if version > self.worker.version else 0.0
        groups = self.worker.rollout(tasks, seed)
        return {"groups": groups, "load_weights_s": load_s, **self.worker.last_timing}

    def evaluate(
        self, weights: list, version: int, problems: list[dict], num_samples: int, seed: int
    ):
        self._load(weights, version)
        return self.worker.evaluate(problems, num_samples, seed)


@ray.remote(num_cpus=0)
def _sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# The loop


def _pin(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


class QueuedStep(NamedTuple):
    """A learner step handed to the group: every rank's metrics call, rank 0's weights."""

    step: int
    metrics: dict[int, Any]  # rank -> ObjectRef
    weights: Any  # ObjectRef


class _Interval:
    """Adds to `profile[key]` the seconds a condition held, sampled once per loop turn."""

    def __init__(self, profile: dict, key: str):
        self.profile, self.key, self.since = profile, key, None

    def holds(self, condition: bool) -> None:
        now = time.perf_counter()
        if condition and self.since is None:
            self.since = now
        elif not condition and self.since is not None:
            self.profile[self.key] += now - self.since
            self.since = None


class PipelineDriver:
    """One RL run: actors, the dispatch loop, learner recovery, the run record."""

    def __init__(
        self,
        config: RunConfig,
        *,
        time_budget_s: float | None,
        kill_learner_at_steps: tuple[int, ...],
        kill_rollout_at_steps: tuple[int, ...],
        rollout_queue_depth: int,
        learner_queue_depth: int,
        log,
        resume_step: int | None = None,
        cluster=None,
        kill_learner_in_warmup: int | None = None,
    ):
        if rollout_queue_depth < 1 or learner_queue_depth < 1:
            raise ValueError(
                f"rollout_queue_depth ({rollout_queue_depth}) and learner_queue_depth "
                f"({learner_queue_depth}) must be >= 1"
            )
        self.config = config
        self.rl = config.rl
        self.tree = config.to_dict()
        self.time_budget_s = time_budget_s
        events = config.faults.events
        unsupported = sorted({e.kind for e in events} - set(RL_FAULTS))
        if unsupported:
            raise ValueError(
                f"faults.events: {unsupported} cannot be injected into an RL run; it supports "
                f"{', '.join(f'{k} ({v})' for k, v in RL_FAULTS.items())}"
            )
        self.kill_learner_at = set(kill_learner_at_steps)
        self.kill_learner_in_warmup = kill_learner_in_warmup  # a rank, killed once
        if config.cluster.elastic:
            raise ValueError(
                "cluster.elastic: true is not supported by stalwart rl (the learner group does "
                "not continue on fewer ranks); set it to false and register spare nodes with "
                "cluster.num_spare_nodes"
            )
        world_size, num_nodes = config.parallel.world_size, config.cluster.num_nodes
        for event in events:
            if event.rank >= world_size or (event.node is not None and event.node >= num_nodes):
                raise ValueError(
                    f"faults.events: {event.kind} at step {event.step} names rank {event.rank}, "
                    f"node {event.node}; the learner has parallel.world_size {world_size} ranks "
                    f"on cluster.num_nodes {num_nodes} nodes"
                )
        if kill_learner_in_warmup is not None and not (
            0 <= kill_learner_in_warmup < world_size and config.rl.warmup_sft_steps
        ):
            raise ValueError(
                f"kill_learner_in_warmup={kill_learner_in_warmup}: needs a learner rank below "
                f"parallel.world_size ({world_size}) and rl.warmup_sft_steps > 0 "
                f"(it is {config.rl.warmup_sft_steps})"
            )
        # Each with the rank / node it names (`_inject_faults`).
        self.fault_events = list(events)
        if any(e.kind == "kill_node" for e in events) and (cluster is None or not cluster.embedded):
            raise ValueError(
                "faults.events: kill_node removes a node of an embedded cluster; run the job on "
                "one (stalwart.launch.cluster.connect without an address) or drop the event"
            )
        self.cluster = cluster
        self.kill_rollout_at = set(kill_rollout_at_steps)
        self.rollout_queue_depth = rollout_queue_depth
        self.learner_queue_depth = learner_queue_depth
        self.log = log
        self.num_steps = config.trainer.max_steps
        self.groups_per_step = self.rl.prompts_per_step
        self.gate = StalenessGate(self.rl.max_staleness, self.groups_per_step, self.num_steps)
        self.pool = PromptPool(
            train_problems(config),
            seed=config.trainer.seed,
            retire_pass_rate=self.rl.positive_pass_rate if self.rl.no_positive_resampling else None,
            min_samples_to_retire=self.rl.num_samples,
        )
        self.record: dict[str, Any] = {
            "steps": [],
            "staleness": [],
            "consumed_problem_ids": [],
            "recoveries": [],
            "evals": [],
        }
        self.run_dir = Path(config.resolved_run_dir())
        self.resume_step = resume_step
        # Pipeline state (prompt pool, dispatch sequence) as of the first dispatch for a step,
        # for the steps the durable tier persists: what a restart from that checkpoint needs.
        self.dispatch_states: dict[int, dict] = {}
        # The learner: a worker group that a JobController starts, watches and recovers.
        self.group = None
        self.killed_pids: list[int] = []  # learner processes fault injection killed
        self._next_group_check = 0.0
        self.actors: list = []
        # Profile of where the time goes (seconds, summed over calls).
        self.profile = {
            "rollout_busy_s": 0.0,
            "rollout_generate_s": 0.0,
            "rollout_reward_s": 0.0,
            "rollout_load_weights_s": 0.0,
            "rollout_calls": 0,
            "learner_step_s": 0.0,
            "learner_snapshot_blocking_s": 0.0,
            "learner_weights_pack_s": 0.0,
            "driver_wait_s": 0.0,
            "gate_closed_s": 0.0,
            "learner_starved_s": 0.0,
        }

    # -- setup and teardown ------------------------------------------------------------------

    def _start_rollout_actors(self, wait: bool = True) -> None:
        self.actors = [
            RolloutActor.remote(self.tree, i) for i in range(self.rl.num_rollout_workers)
        ]
        if wait:
            # Process start-up (imports, model build) is not pipeline time: wait for it here.
            ray.get([actor.pid.remote() for actor in self.actors])

    def setup(self) -> None:
        self.start_sequence = 0
        start = self._setup_group()
        self.start_version = start
        self.weights_ref = self._learner_weights()
        self.published_version = start
        self.checkpoints: dict[int, Any] = {start: self.weights_ref}
        self._start_rollout_actors()

    def _learner_weights(self):
        return self.group.workers[0].rl_weights.remote()

    def _resume_state(self, start: int) -> None:
        state = self._read_dispatch_state(start)
        self.pool.load_state_dict(state["pool"])
        self.start_sequence = state["next_sequence"]
        self.record["resumed_from"] = start
        self.log(f"resumed from the durable checkpoint of step {start}")

    def _setup_group(self) -> int:
        """The learner: parallel.world_size data-parallel ranks (cluster.num_nodes x
        cluster.workers_per_node; one snapshot manager per node, erasure-coded across nodes),
        started, watched and recovered by a `JobController` as a training job's ranks are."""
        from stalwart.launch.cluster import ClusterHandle
        from stalwart.launch.controller import JobController

        def new_group() -> JobController:
            group = JobController(
                self.config,
                self.cluster if self.cluster is not None else ClusterHandle(),
                self.run_dir,
                log=self.log,
                role="rl_learner",
            )
            group.durable_candidates = self._durable_candidates
            return group

        self.group = new_group()
        start = 0
        if self.resume_step is not None:
            # Manifests and sizes here; each rank checks its shard's data as it loads it, and
            # a shard that fails sends the group to the next older checkpoint that carries the
            # pipeline state (`group.durable_candidates`).
            start = self._complete_checkpoint(
                [s for s in self._durable_candidates() if s <= self.resume_step],
                f"resuming {self.run_dir}",
            )
            self.group.start(resume_step=start)
            start = self.group.started_from
            self._resume_state(start)
        else:
            self.group.start()
            if self.rl.warmup_sft_steps:
                self._warm_up(new_group)
        if self.config.snapshot.enabled:
            ray.get(list(self.group.submit("rl_snapshot").values()))
            if not self._group_committed(start):
                raise RuntimeError(
                    f"the snapshot managers did not commit the learner's version {start}"
                )
        return start

    def _warm_up(self, new_group) -> None:
        """The supervised warm-up on every rank, watched like a training step. Nothing is
        snapshotted before it ends, and every rank starts from the same seeded weights, so a
        rank, manager or node lost during it restarts the group from its initial weights and
        runs the warm-up again (at most cluster.max_recoveries times); the run record lists
        each restart under `warmup_restarts`."""
        from stalwart.launch.controller import JobFailed

        restarts = self.record.setdefault("warmup_restarts", [])
        while True:
            refs = self.group.submit("rl_warmup", self.rl.warmup_sft_steps)
            if self.kill_learner_in_warmup is not None:
                rank, self.kill_learner_in_warmup = self.kill_learner_in_warmup, None
                self._kill_learner_rank(rank, "during the supervised warm-up")
            failure = self.group.watch(refs)
            if failure is None:
                break
            if len(restarts) >= self.config.cluster.max_recoveries:
                raise JobFailed(
                    f"the supervised warm-up failed {len(restarts) + 1} times (cluster."
                    f"max_recoveries {self.config.cluster.max_recoveries}): {failure.detail}"
                )
            restarts.append({"failure": failure.kind, "detail": failure.detail})
            self.log(
                f"supervised warm-up: {failure.kind} failure ({failure.detail}) before the first "
                "snapshot; the learner group restarts from its initial weights"
            )
            self.group.shutdown()
            self.group = new_group()
            self.group.start()
        self.record["warmup"] = ray.get(refs[0])
        self.log(f"supervised warm-up: {self.record['warmup']}")

    def _group_committed(self, version: int) -> bool:
        """Wait up to COMMIT_WAIT_S for `version` to commit on every node of the group."""
        deadline = time.monotonic() + COMMIT_WAIT_S
        while True:
            committed = self.group.committed_version()
            if committed is not None and committed >= version:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def _complete_checkpoint(self, candidates: list[int], context: str) -> int:
        """The first of `candidates` (newest first) that is complete: manifest readable, every
        file at its recorded size (the ranks verify the data as they load it)."""
        from stalwart.snapshot.persist import newest_usable_step

        step = newest_usable_step(self.run_dir, candidates, log=self.log, checksums=False)
        if step is None:
            raise RuntimeError(
                f"{context}: no durable checkpoint could be loaded (tried {candidates or 'none'})"
            )
        return step

    def close(self) -> None:
        """Stop the rollout actors and the learner group (workers, standbys, managers, and the
        managers' shared memory)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.group is not None:
            self.group.shutdown()
            self.group = None

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.inflight: dict[Any, tuple] = {}  # ref -> (actor index, handle, sequence, tasks, seed)
        self.outstanding = [0] * len(self.actors)  # generation calls queued per actor
        self.slots: dict[int, list[dict] | None] = {}  # dispatch sequence -> groups (None: running)
        self.next_sequence = self.start_sequence
        self.pending_groups = 0  # dispatched and not yet handed to the learner
        self.next_step = self.start_version  # next learner step to hand a batch to
        self.learner_queue: deque[QueuedStep] = deque()  # oldest first
        self.batches: dict[int, list[dict]] = {}  # kept until a newer snapshot is published
        self.published_snapshots: list[int] = [self.start_version]
        self.pending_recovery: tuple[dict, float] | None = None
        self.rollout_recoveries: dict[Any, dict] = {}  # dead actor handle -> its recovery record
        self.kill_time: float | None = None
        self.num_sampled_tokens = 0
        self.num_groups_generated = 0
        self.stop = False
        self.start = time.perf_counter()
        gate_closed = _Interval(self.profile, "gate_closed_s")
        learner_starved = _Interval(self.profile, "learner_starved_s")

        while True:
            gate_closed.holds(self._dispatch_rollouts())
            self._dispatch_learner_steps()
            self._maybe_kill_rollout_actor()
            learner_starved.holds(
                not self.learner_queue and not self.stop and self.next_step < self.num_steps
            )
            if not self.learner_queue and not self.inflight:
                break  # nothing runs and nothing may start: done
            waitable = list(self.inflight)
            if self.learner_queue:
                waitable.append(self.learner_queue[0].metrics[0])
            waited = time.perf_counter()
            # The learner is also watched between results (a rank hung in a collective, a
            # departed node, a dead manager): its controller looks every GROUP_POLL_S.
            done, _ = ray.wait(waitable, num_returns=1, timeout=GROUP_POLL_S)
            self.profile["driver_wait_s"] += time.perf_counter() - waited
            if self._check_group():
                continue  # recovered: the queue and the in-flight calls were rebuilt
            if not done:
                continue
            if self.learner_queue and done[0] == self.learner_queue[0].metrics[0]:
                self._on_learner_result()
            else:
                self._on_rollout_result(done[0])
        if not self.stop:
            # Nothing was drawn for a step past the last: the pool is as a longer run (resumed
            # with a larger trainer.max_steps) would find it.
            self._save_dispatch_state(self.num_steps)
        if self.config.snapshot.enabled and self.config.snapshot.persist_every:
            # The last version reaches the managers, commits, and its checkpoint is on disk.
            try:
                ray.get(list(self.group.submit("rl_flush").values()))
                if not self._group_committed(self.published_version):
                    self.log(f"version {self.published_version} did not commit: not durable")
                self.group.flush_durable()
            except ray.exceptions.RayError as error:  # died after its last step: run is done
                self.log(f"the final version was not made durable: {error}")
        return self._summary()

    # -- pipeline state for the durable tier -------------------------------------------------

    def _state_path(self, step: int) -> Path:
        return self.run_dir / STATE_DIRNAME / f"step_{step}.json"

    def _save_dispatch_state(self, step: int) -> None:
        """Before the first prompt of `step`'s batch is drawn: the prompt pool and the dispatch
        sequence. Kept for the steps the durable tier persists; written atomically next to the
        checkpoints, so a restart from checkpoint `step` draws exactly the prompts (and the
        sampling seeds) this run draws from here on."""
        every = self.config.snapshot.persist_every
        if not every or step % every:
            return
        state = {"step": step, "next_sequence": self.next_sequence, "pool": self.pool.state_dict()}
        self.dispatch_states[step] = state
        for old in [
            s for s in self.dispatch_states if s < step - every * self.config.snapshot.keep
        ]:
            del self.dispatch_states[old]
        path = self._state_path(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".tmp-{path.name}")
        temporary.write_text(json.dumps(state))
        temporary.replace(path)
        from stalwart.snapshot.persist import list_checkpoints

        kept = list_checkpoints(self.run_dir)
        if kept:
            for other in path.parent.glob("step_*.json"):
                number = other.stem.removeprefix("step_")
                if number.isdigit() and int(number) < kept[0]:
                    other.unlink(missing_ok=True)

    def _read_dispatch_state(self, step: int) -> dict:
        if step in self.dispatch_states:
            return self.dispatch_states[step]
        path = self._state_path(step)
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} is missing: the durable checkpoint of step {step} has no RL pipeline "
                "state (was it written by `stalwart train`?)"
            ) from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}): the file is corrupt") from None
        if state.get("step") != step or not isinstance(state.get("next_sequence"), int):
            raise ValueError(f"{path} does not describe step {step}: the file is corrupt")
        return state

    def _durable_candidates(self) -> list[int]:
        """Durable checkpoints that carry their pipeline state, newest first."""
        return durable_resume_steps(self.run_dir, known=set(self.dispatch_states))

    def _out_of_time(self) -> bool:
        return (
            self.time_budget_s is not None
            and time.perf_counter() - self.start >= self.time_budget_s
        )

    def _dispatch_rollouts(self) -> bool:
        """Queue generation on actors with room while the gate allows; True if the gate is what
        stopped an actor with room (generation would run more than k versions ahead)."""
        while not self.stop:
            index = min(range(len(self.actors)), key=lambda i: self.outstanding[i])
            if self.outstanding[index] >= self.rollout_queue_depth:
                return False
            size = self.gate.chunk_size(
                self.next_step,
                self.pending_groups,
                self.published_version,
                self.rl.rollout_chunk_prompts,
            )
            if size == 0:
                consume_step = self.next_step + self.pending_groups // self.groups_per_step
                return consume_step < self.num_steps
            if self.pending_groups % self.groups_per_step == 0:
                self._save_dispatch_state(
                    self.next_step + self.pending_groups // self.groups_per_step
                )
            tasks = self.pool.take(size)
            seed = int(
                np.random.SeedSequence(
                    [self.config.trainer.seed, self.next_sequence]
                ).generate_state(1)[0]
            )
            self._submit_rollout(index, self.next_sequence, tasks, seed)
            self.slots[self.next_sequence] = None
            self.next_sequence += 1
            self.pending_groups += size
        return False

    def _submit_rollout(self, index: int, sequence: int, tasks: list[dict], seed: int) -> None:
        actor = self.actors[index]
        ref = actor.rollout.remote([self.weights_ref], self.published_version, tasks, seed)
        self.inflight[ref] = (index, actor, sequence, tasks, seed)
        self.outstanding[index] += 1

    def _dispatch_learner_steps(self) -> None:
        """Hand the next complete batch (in dispatch order) to the learner, if it has room."""
        while (
            not self.stop
            and self.next_step < self.num_steps
            and len(self.learner_queue) < self.learner_queue_depth
        ):
            ready: list[dict] = []
            consumed_sequences = []
            for sequence in sorted(self.slots):
                if self.slots[sequence] is None or len(ready) >= self.groups_per_step:
                    break
                ready.extend(self.slots[sequence])
                consumed_sequences.append(sequence)
            if len(ready) < self.groups_per_step:
                return
            assert len(ready) == self.groups_per_step, "chunks never straddle batches"
            for sequence in consumed_sequences:
                del self.slots[sequence]
            self.pending_groups -= self.groups_per_step
            step = self.next_step
            for group in ready:
                staleness = step - group["version"]
                if staleness > self.rl.max_staleness or staleness < 0:
                    raise RuntimeError(
                        f"internal error: group of version {group['version']} consumed by "
                        f"step {step} (staleness bound {self.rl.max_staleness})"
                    )
                self.record["staleness"].append((step, group["version"]))
                self.record["consumed_problem_ids"].append(group["problem_id"])
            self.batches[step] = ready
            self.learner_queue.append(self._submit_step(step, ready))
            self.next_step += 1
            self._inject_faults(step)

    def _submit_step(self, step: int, groups: list[dict]) -> QueuedStep:
        """The learner's step on `groups`. Every rank reads the same batch (one put); rank 0's
        results stand for the step, every rank's call is watched."""
        refs = self.group.submit("rl_step", ray.put(groups), step)
        return QueuedStep(step, {rank: pair[0] for rank, pair in refs.items()}, refs[0][1])

    def _inject_faults(self, step: int) -> None:
        """Fault injection into the learner while it runs `step`: every event of that step, at
        the rank or node position it names (several may fire together)."""
        group = self.group
        events = [e for e in self.fault_events if e.step == step]
        if step in self.kill_learner_at and not any(e.kind == "kill_worker" for e in events):
            events.append(FaultEvent(kind="kill_worker", step=step))  # --kill-learner-at-step
        self.kill_learner_at.discard(step)
        self.fault_events = [e for e in self.fault_events if e.step != step]
        for event in events:
            self.kill_time = time.perf_counter()
            if event.kind == "kill_worker":
                self._kill_learner_rank(event.rank, f"step {step}")
                continue
            position = event.node if event.node is not None else group.position_of_rank(event.rank)
            if event.kind == "kill_node":
                self.log(f"fault injection: removing learner node {position} during step {step}")
                self.cluster.remove_node(group.node_of[position])
            else:
                self.log(f"fault injection: killing learner node {position}'s manager, step {step}")
                ray.kill(group.managers[position], no_restart=True)

    def _kill_learner_rank(self, rank: int, when: str) -> None:
        group = self.group
        worker = group.workers[rank]
        pid = ray.get(worker.pid.remote())
        self.killed_pids.append(pid)
        self.log(f"fault injection: SIGKILL learner rank {rank} (pid {pid}), {when}")
        if ray.get(worker.node_ip.remote()) == ray.util.get_node_ip_address():
            os.kill(pid, signal.SIGKILL)  # same host: now, not after a task starts
        else:
            node_id = group.node_of[group.position_of_rank(rank)]
            ray.get(_sigkill.options(scheduling_strategy=_pin(node_id)).remote(pid))

    def _check_group(self, error: Exception | None = None, force: bool = False) -> bool:
        """Ask the controller how the learner group is (every GROUP_POLL_S, at once when
        rank 0's step raised `error` or `force`); recover it if it failed. True if it
        recovered. An error while no rank, manager or node died is a real one and is raised."""
        now = time.monotonic()
        if error is None and not force and now < self._next_group_check:
            return False
        self._next_group_check = now + GROUP_POLL_S
        pending = dict(self.learner_queue[0].metrics) if self.learner_queue else {}
        done = []
        if pending:
            done, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=0)
        failure = self.group.check(pending, done)
        if failure is None and error is not None:
            failure = self.group._classify(list(self.group.workers), f"rank 0: {error}")
        if error is not None and failure.kind == "process" and not failure.dead_ranks:
            time.sleep(1.0)  # a peer's death may reach rank 0 before Ray reports it
            failure = self.group._classify(list(self.group.workers), f"rank 0: {error}")
        if failure is None:
            return False
        if error is not None and failure.kind == "process" and not failure.dead_ranks:
            raise error
        self._recover_group(failure)
        return True

    def _maybe_kill_rollout_actor(self) -> None:
        """Fault injection: once step N is handed out, kill an actor with a call in flight (at
        the first moment one has a call in flight, so the kill always costs generated work)."""
        due = [step for step in self.kill_rollout_at if step < self.next_step]
        if not due or not self.inflight:
            return
        self.kill_rollout_at.difference_update(due)
        victim = next(iter(self.inflight.values()))[0]
        self.log(f"fault injection: killing rollout actor {victim} after step {min(due)}")
        ray.kill(self.actors[victim], no_restart=True)

    def _publish(self, weights_ref, version: int) -> None:
        """New weights: the next dispatches carry them; actors with queued calls get an offer."""
        self.weights_ref, self.published_version = weights_ref, version
        for index, actor in enumerate(self.actors):
            if self.outstanding[index]:
                actor.offer_weights.remote([weights_ref], version)

    def _on_learner_result(self) -> None:
        step, metrics_refs, weights_ref = self.learner_queue[0]
        try:
            metrics = ray.get(metrics_refs[0])
        except (RayActorError, ray.exceptions.RayTaskError) as error:
            # Rank 0 died, or its collective failed because another rank died: the controller
            # classifies and recovers (and raises the error again if nothing died).
            self._check_group(error)
            return
        self.learner_queue.popleft()
        self._publish(weights_ref, int(metrics["version"]))
        elapsed_s = time.perf_counter() - self.start
        metrics.update(
            step=step,
            elapsed_s=elapsed_s,
            sampled_tokens=self.num_sampled_tokens,
            retired_prompts=len(self.pool.retired),
        )
        self.record["steps"].append(metrics)
        self.profile["learner_step_s"] += metrics["learner_step_s"]
        self.profile["learner_snapshot_blocking_s"] += metrics.get("snapshot_blocking_s", 0.0)
        self.profile["learner_weights_pack_s"] += metrics["weights_pack_s"]
        self._forget_batches(int(metrics.get("snapshot_published_version", -1)))
        if self.pending_recovery is not None and step >= self.pending_recovery[0]["step"]:
            recovery, detected = self.pending_recovery
            # From failure detection to the failed step's result: what the job lost to it.
            recovery["caught_up_s"] = time.perf_counter() - detected
            recovery["total_s"] = recovery["caught_up_s"] + (recovery["detect_s"] or 0.0)
            redone = recovery.get("replayed_steps", recovery.get("steps_lost"))
            self.log(
                f"learner recovered: restored version {recovery['restored_version']} from "
                f"{recovery['source']}, {redone} step(s) trained again; detect "
                f"{recovery['detect_s'] or 0:.2f}s, restart {recovery['restart_s']:.2f}s (state "
                f"load {recovery['restore_s']:.3f}s), back at step {step} after "
                f"{recovery['caught_up_s']:.2f}s"
            )
            self.pending_recovery = None
        version = self.published_version
        if version % self.rl.eval_every == 0 or version == self.num_steps:
            self.checkpoints[version] = weights_ref
        if self._out_of_time() and not self.stop:
            self.stop = True
            self.checkpoints[version] = weights_ref
        if metrics.get("snapshot_manager_lost"):
            self._check_group(force=True)  # a rank saw its manager die: replace it now

    def _forget_batches(self, published_snapshot: int) -> None:
        """Drop batches no recovery can need: older than the second-newest published snapshot
        (the newest may still be committing when the learner dies)."""
        if published_snapshot > self.published_snapshots[-1]:
            self.published_snapshots = self.published_snapshots[-1:] + [published_snapshot]
        floor = self.published_snapshots[0]
        for step in [s for s in self.batches if s < floor]:
            del self.batches[step]

    def _rewind_pipeline(self, step: int) -> None:
        """The learner restarted from the durable checkpoint of `step`: the prompt pool and the
        dispatch sequence go back to that step's, the rollout actors (new ones, started by the
        caller) generate again from there, and the record forgets the steps after it."""
        state = self._read_dispatch_state(step)
        self.pool.load_state_dict(state["pool"])
        ray.get([actor.pid.remote() for actor in self.actors])
        self.inflight, self.slots = {}, {}
        self.outstanding = [0] * len(self.actors)
        self.pending_groups = 0
        self.next_sequence = state["next_sequence"]
        self.next_step = step
        self.learner_queue = deque()
        self.batches = {}
        self.published_snapshots = [step]
        self.weights_ref = self._learner_weights()
        self.published_version = step
        self.checkpoints = {v: ref for v, ref in self.checkpoints.items() if v < step}
        self.checkpoints[step] = self.weights_ref
        self.record["steps"] = [m for m in self.record["steps"] if m["step"] < step]
        self.record["staleness"] = [(s, v) for s, v in self.record["staleness"] if s < step]
        self.record["consumed_problem_ids"] = self.record["consumed_problem_ids"][
            : len(self.record["staleness"])
        ]

    def _recover_group(self, failure) -> None:
        """The controller recovers the learner group (same steps as for a training job: stop
        the survivors, pick the newest version committed everywhere, rebuild lost positions
        from parity on spare nodes, start and restore a new group, or fall back to the durable
        tier); the driver then hands the new group the batches since the restored version, or
        rewinds the pipeline to the durable checkpoint."""
        detected = time.perf_counter()
        failed_step = self.learner_queue[0].step if self.learner_queue else self.next_step
        detect_s = detected - self.kill_time if self.kill_time is not None else None
        self.kill_time = None
        self.log(f"learner group failed during step {failed_step}: {failure.detail}")
        if not self.config.snapshot.enabled:
            raise RuntimeError(
                f"the learner failed during step {failed_step} ({failure.detail}) and "
                "snapshot.enabled is false: nothing to restore it from; enable snapshots to make "
                "the learner fault tolerant"
            )
        stale = [ref for q in self.learner_queue for ref in (*q.metrics.values(), q.weights)]
        outcome = self.group.recover(failure)
        _consume_errors(stale)  # the old group's calls: their errors are expected, not news
        version, source = outcome.restored_version, outcome.source
        if version is None:
            raise RuntimeError(
                f"the learner group failed during step {failed_step} and neither memory nor the "
                f"durable tier holds a version of it ({outcome.detail}); rerun the job"
            )
        recovery = {
            "kind": "learner",
            "failure": failure.kind,
            "ranks": failure.ranks,
            "step": failed_step,
            "restored_version": version,
            "source": source,
            "detect_s": detect_s,
            "controller_detect_s": outcome.detection_s,
            "teardown_s": outcome.teardown_s,
            "rebuild_s": outcome.rebuild_s,
            "restart_s": outcome.restart_s,
            "restore_s": outcome.restore_s,
            "standby_ranks": outcome.standby_ranks,
            "detail": outcome.detail,
            "killed_pids": list(self.killed_pids),
            "new_pids": ray.get([w.pid.remote() for w in self.group.workers.values()]),
        }
        if source == "durable":
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            self._start_rollout_actors(wait=False)
            ray.get(list(self.group.submit("rl_snapshot").values()))
            self._rewind_pipeline(version)
            recovery["steps_lost"] = failed_step - version
            self.log(
                f"restored the durable checkpoint of step {version}: {failed_step - version} "
                "learner step(s) lost and trained again"
            )
        else:
            missing = [s for s in range(version, self.next_step) if s not in self.batches]
            if missing:
                raise RuntimeError(
                    f"internal error: recovering version {version} needs the batches of steps "
                    f"{missing}, which were already dropped"
                )
            self.learner_queue = deque()
            if version > failed_step:
                for step in range(failed_step, version):
                    self.record["steps"].append(
                        {"step": step, "version": float(step + 1), "metrics_lost": 1.0}
                    )
                self._publish(self._learner_weights(), version)
            for step in range(version, self.next_step):
                queued = self._submit_step(step, self.batches[step])
                if step >= failed_step:  # earlier ones only rebuild the state
                    self.learner_queue.append(queued)
            recovery["replayed_steps"] = self.next_step - version
        self.record["recoveries"].append(recovery)
        self.pending_recovery = (recovery, detected)

    def _on_rollout_result(self, ref) -> None:
        index, handle, sequence, tasks, seed = self.inflight.pop(ref)
        if self.actors[index] is handle:
            self.outstanding[index] -= 1
        try:
            result = ray.get(ref)
        except RayActorError:
            self._replace_rollout_actor(index, handle, sequence, tasks, seed)
            return
        groups = result["groups"]
        self.slots[sequence] = groups
        self.profile["rollout_calls"] += 1
        self.profile["rollout_busy_s"] += result["busy_s"] + result["load_weights_s"]
        self.profile["rollout_generate_s"] += result["generate_s"]
        self.profile["rollout_reward_s"] += result["reward_s"]
        self.profile["rollout_load_weights_s"] += result["load_weights_s"]
        for group in groups:
            self.num_sampled_tokens += group["num_sampled_tokens"]
            self.num_groups_generated += 1
            self.pool.record(group["problem_id"], group["rewards"])
        if self.stop:
            self.slots.pop(sequence, None)

    def _replace_rollout_actor(self, index, handle, sequence, tasks, seed) -> None:
        """A dead actor is replaced once; each of its lost calls is generated again in its
        place in the dispatch order (so batches keep their boundaries), with the newest weights."""
        recovery = self.rollout_recoveries.get(handle)
        if recovery is None:
            self.log(f"rollout actor {index} died; replacing it")
            recovery = {"kind": "rollout", "actor": index, "requeued": []}
            self.rollout_recoveries[handle] = recovery
            self.record["recoveries"].append(recovery)
            self.actors[index] = RolloutActor.remote(self.tree, index)
            self.outstanding[index] = 0
        recovery["requeued"].extend(t["problem_id"] for t in tasks)
        if self.stop:
            self.slots.pop(sequence, None)
            self.pending_groups -= len(tasks)
            return
        self._submit_rollout(index, sequence, tasks, seed)

    def _summary(self) -> dict[str, Any]:
        record = self.record
        wall_s = time.perf_counter() - self.start
        staleness = [step - version for step, version in record["staleness"]]
        num_actors = len(self.actors)
        profile = dict(self.profile)
        profile["rollout_idle_s"] = wall_s * num_actors - profile["rollout_busy_s"]
        profile["learner_idle_s"] = (
            wall_s - profile["learner_step_s"] - profile["learner_weights_pack_s"]
        )
        record.update(
            rl_wall_s=wall_s,
            num_learner_steps=len(record["steps"]),
            num_sampled_tokens=self.num_sampled_tokens,
            num_groups_generated=self.num_groups_generated,
            sampled_tokens_per_s=self.num_sampled_tokens / wall_s,
            learner_steps_per_s=len(record["steps"]) / wall_s,
            max_staleness_seen=max(staleness, default=0),
            # Fraction of the wall time the rollout actors / the learner computed: what overlap buys.
            rollout_utilisation=profile["rollout_busy_s"] / (wall_s * num_actors),
            learner_utilisation=profile["learner_step_s"] / wall_s,
            mean_staleness=float(np.mean(staleness)) if staleness else 0.0,
            retired_prompts=len(self.pool.retired),
            final_version=self.published_version,
            profile=profile,
        )
        record["snapshot_committed_version"] = self.group.committed_version()
        record["learner_ranks"] = self.group.world_size
        record["manager_restarts"] = self.group.manager_restarts
        record["job_id"] = self.group.job_id  # its managers' memory: stalwart-<job_id>-*
        final = Packed.from_tuple(ray.get(self.weights_ref))
        record["final_weights_xxh64"] = xxhash.xxh64_hexdigest(final.buffer)
        return record


def _consume_errors(refs: list) -> None:
    """Fetch finished calls of a group that is gone, so Ray does not print their errors as
    unhandled when the references are dropped."""
    for ref in refs:
        try:
            ray.get(ref, timeout=0)
        except Exception:  # the expected RayActorError / RayTaskError, or still pending
            pass


def durable_resume_steps(run_dir: str | Path, known: set[int] = frozenset()) -> list[int]:
    """Steps of the complete durable checkpoints in `run_dir` whose RL pipeline state exists
    (on disk, or in `known`), newest first."""
    from stalwart.snapshot.persist import list_checkpoints

    state_dir = Path(run_dir) / STATE_DIRNAME
    return [
        step
        for step in reversed(list_checkpoints(run_dir))
        if step in known or (state_dir / f"step_{step}.json").is_file()
    ]


def run_pipeline(
    config: RunConfig,
    *,
    time_budget_s: float | None = None,
    kill_learner_at_steps: tuple[int, ...] = (),
    kill_rollout_at_steps: tuple[int, ...] = (),
    evaluate: bool = True,
    rollout_queue_depth: int = ROLLOUT_QUEUE_DEPTH,
    learner_queue_depth: int = LEARNER_QUEUE_DEPTH,
    log=print,
    resume_step: int | None = None,
    cluster=None,
    kill_learner_in_warmup: int | None = None,
) -> dict[str, Any]:
    """Run RL to ``trainer.max_steps`` learner steps (or until ``time_budget_s`` of RL time);
    Ray must be initialised. `resume_step`: start from that durable checkpoint of the run
    directory instead of from scratch. Returns the run record (metrics, staleness, throughput,
    profile, recoveries, evals). Every actor and the snapshot memory are released before it
    returns. `cluster` (a `launch.cluster.ClusterHandle`) is needed only to inject kill_node.
    `kill_learner_in_warmup`: SIGKILL that learner rank once, during the supervised warm-up.
    """
    driver = PipelineDriver(
        config,
        time_budget_s=time_budget_s,
        kill_learner_at_steps=kill_learner_at_steps,
        kill_rollout_at_steps=kill_rollout_at_steps,
        rollout_queue_depth=rollout_queue_depth,
        learner_queue_depth=learner_queue_depth,
        log=log,
        resume_step=resume_step,
        cluster=cluster,
        kill_learner_in_warmup=kill_learner_in_warmup,
    )
    try:
        driver.setup()
        record = driver.run()
        if evaluate:
            record["evals"] = evaluate_checkpoints(config, driver.actors, driver.checkpoints)
        return record
    finally:
        driver.close()


def evaluate_checkpoints(
    config: RunConfig, actors: list, checkpoints: dict[int, Any]
) -> list[dict]:
    """Held-out metrics of every kept version, spread over the rollout actors. A version whose
    weights were lost with a node (Ray's object store) is left out, and said so."""
    problems = [{"prompt": p.prompt, "answer": p.answer} for p in test_problems(config)]
    refs = []
    for position, (version, weights_ref) in enumerate(sorted(checkpoints.items())):
        actor = actors[position % len(actors)]
        refs.append(
            (
                version,
                actor.evaluate.remote(
                    [weights_ref], version, problems, config.rl.eval_num_samples, 1234
                ),
            )
        )
    results = []
    for version, ref in refs:
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayError as error:
            cause = getattr(error, "cause", None)
            lost = ray.exceptions.ObjectLostError
            if not (isinstance(error, lost) or isinstance(cause, lost)):
                raise
            print(f"[rl] held-out evaluation of version {version} skipped: its weights were lost")
    return sorted(results, key=lambda result: result["version"])


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


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the run directory of a stopped `stalwart rl` job")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the saved config")
    parser.add_argument("--address", default=None, help="Ray address; default: embedded instance")
    parser.add_argument("--time-budget-s", type=float, default=None, help="stop RL after this long")


def run_rl(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    save_config(config, config.resolved_run_dir())
    return _run_and_report(
        config,
        args.address,
        time_budget_s=args.time_budget_s,
        kill_learner_at_steps=tuple(args.kill_learner_at_step),
        kill_rollout_at_steps=tuple(args.kill_rollout_at_step),
    )


def resume_step_of(run_dir: Path) -> int:
    """The newest durable checkpoint of a stopped RL run that a resume can start from."""
    steps = durable_resume_steps(run_dir)
    if not steps:
        raise FileNotFoundError(
            f"{run_dir} has no durable checkpoint with its RL pipeline state; a run writes them "
            "when snapshot.persist_every is set"
        )
    return steps[0]


def resume_rl(args: argparse.Namespace) -> int:
    """`stalwart rl resume RUN_DIR`: continue a stopped RL run from its newest durable
    checkpoint, with its saved config (overrides allowed, e.g. a longer trainer.max_steps)."""
    run_dir = Path(args.run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: is it a stalwart run directory?")
    config = load_config(config_path, args.overrides)
    config.run_dir = str(run_dir)
    step = resume_step_of(run_dir)
    if step >= config.trainer.max_steps:
        raise ValueError(
            f"{run_dir} already reached step {step} of trainer.max_steps={config.trainer.max_steps}"
            "; pass a larger one to train further, e.g. "
            f"`stalwart rl resume {run_dir} trainer.max_steps={2 * step}`"
        )
    save_config(config, run_dir)  # a later resume keeps these overrides
    print(f"[rl] resuming {run_dir} from the durable checkpoint of step {step}", flush=True)
    return _run_and_report(config, args.address, time_budget_s=args.time_budget_s, resume_step=step)


def _run_and_report(config: RunConfig, address: str | None, **options) -> int:
    run_dir = config.resolved_run_dir()
    address = address or config.cluster.address
    cluster = None
    num_nodes = config.cluster.num_nodes + config.cluster.num_spare_nodes
    if not address and num_nodes > 1 and not ray.is_initialized():
        # Simulated nodes, as `stalwart train` has them: a lost learner node can be injected
        # (faults kill_node); its position is rebuilt from parity, or restarted from the
        # durable tier, on a spare node.
        from stalwart.launch.cluster import connect
        from stalwart.launch.job import cpus_per_node

        cluster = connect(
            None,
            num_nodes=config.cluster.num_nodes,
            num_spare_nodes=config.cluster.num_spare_nodes,
            cpus_per_node=cpus_per_node(config),
        )
        started = False
    else:
        # The learner's ranks ask for cluster.cpus_per_worker each (rollout actors for none).
        learner_cpus = math.ceil(config.cluster.cpus_per_worker * config.parallel.world_size)
        started = _start_ray(address, config.rl.num_rollout_workers + learner_cpus)
    try:
        record = run_pipeline(
            config,
            log=lambda message: print(f"[rl] {message}", flush=True),
            cluster=cluster,
            **options,
        )
    finally:
        if cluster is not None:
            cluster.shutdown()
        elif started:
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
    "add_resume_arguments",
    "add_rl_arguments",
    "resume_rl",
    "run_analyze",
    "run_fit",
    "run_rl",
]

"""JobController: places the worker group and the snapshot managers, watches them, recovers.

The controller is the only component that decides. Workers and managers report and obey.

Placement: `cluster.num_nodes` active nodes (positions 0..N-1), `cluster.workers_per_node`
ranks each, one SnapshotManager per active node; the remaining nodes are spares.

Health: every worker reports its step; a worker whose `run` call fails (RayActorError: the
process died) or that makes no progress within `cluster.hang_timeout_s` (a hung collective)
is a failure. It is a node failure when the node left the cluster or its manager is gone,
else a process failure.

Recovery: stop every worker (killing the processes also tears down their gloo/NCCL groups, so
no hung collective survives), pick the newest version committed on the live managers, rebuild
lost positions on spare nodes from the erasure-coded fragments, start a fresh worker group
that loads that version from local manager memory, and re-form the process group with a new
rendezvous. With the same world size the run continues bit-for-bit. When the erasure code
cannot cover the loss, the newest durable checkpoint is used and the lost steps are reported.

Standby workers (`cluster.standby_workers`, off by default): every live node, spares included, keeps
`workers_per_node` workers whose Trainer is already built. The new worker group of a recovery
is made of them, so its restart is a rendezvous and a state load, not process starts, imports
and model builds; the pool is refilled in the background once the group trains again.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from stalwart.config import RunConfig, save_config
from stalwart.launch.cluster import ClusterHandle
from stalwart.launch.worker import TrainWorker
from stalwart.snapshot.persist import CheckpointCorruptError

POLL_S = 0.5
NODE_VERDICT_S = 30.0  # Ray's default health checks declare a node dead within about 30 s
MANAGER_CHECK_S = 2.0
# A node fault can still be unfolding while the controller recovers (the second of two nodes
# removed together: its manager answers until its process notices the raylet is gone). A
# manager that dies during a recovery sends it back to the assessment this many times.
REASSESS_ATTEMPTS = 3
# How often the controller checks that standby managers hold slots of the job's current size.
RESERVE_CHECK_S = 10.0
DEAD_MANAGER_S = 15.0  # a manager that answers nothing for this long during a recovery is dead
# A durable fallback waits this long for checkpoint writes already underway (`settle_durable`).
SETTLE_DURABLE_S = 60.0


class JobFailed(RuntimeError):
    """The job could not continue (too many recoveries, no capacity, nothing to restore)."""


@dataclass
class Failure:
    kind: str  # "process", "node", "hang"
    ranks: list[int]
    lost_positions: list[int] = field(default_factory=list)
    detail: str = ""
    detected_at: float = field(default_factory=time.perf_counter)
    step: int = 0
    detection_s: float = 0.0
    dead_ranks: list[int] = field(default_factory=list)  # workers whose process is gone


@dataclass
class Recovery:
    kind: str
    restored_version: int | None
    source: str  # "memory", "erasure", "durable", "scratch"
    lost_steps: int
    detection_s: float
    teardown_s: float
    rebuild_s: float
    restart_s: float  # new worker processes, rendezvous, Trainer build (restore included)
    restore_s: float  # loading the state into the Trainers (part of restart_s)
    detail: str = ""
    standby_ranks: int = 0  # ranks taken over by prepared standby workers

    @property
    def total_s(self) -> float:
        return self.detection_s + self.teardown_s + self.rebuild_s + self.restart_s

    def summary(self) -> str:
        version = "none" if self.restored_version is None else f"step {self.restored_version}"
        return (
            f"recovered from {self.kind} failure: restored {version} from {self.source}, "
            f"lost {self.lost_steps} step(s); detect {self.detection_s:.2f}s, teardown "
            f"{self.teardown_s:.2f}s, rebuild {self.rebuild_s:.2f}s, restart {self.restart_s:.2f}s, "
            f"(state load {self.restore_s:.2f}s), total {self.total_s:.2f}s"
            + (f"; {self.standby_ranks} rank(s) from standby workers" if self.standby_ranks else "")
        )


class JobController:
    def __init__(
        self,
        config: RunConfig,
        cluster: ClusterHandle,
        run_dir: str | Path,
        *,
        sinks=None,
        log=print,
        role: str = "train",
    ):
        self.config = config
        self.role = role  # "rl_learner": the RL driver steps the group (see `submit`, `check`)
        self.cluster = cluster
        self.run_dir = Path(run_dir)
        self.job_id = uuid.uuid4().hex[:8]
        self.sinks = sinks
        self.log = log
        self.world_size = config.parallel.world_size
        self.workers_per_node = config.cluster.workers_per_node
        if self.world_size != config.cluster.num_nodes * self.workers_per_node:
            raise ValueError(
                f"parallel.world_size ({self.world_size}) must equal cluster.num_nodes "
                f"({config.cluster.num_nodes}) x cluster.workers_per_node ({self.workers_per_node})"
            )
        self.positions = list(range(config.cluster.num_nodes))
        self.node_of: dict[int, str] = {}  # position -> Ray node id
        self.managers: dict[int, object] = {}
        self.workers: dict[int, object] = {}
        self.cursors: dict[int, int] = {}
        self.recoveries: list[Recovery] = []
        # An RL driver injects its faults itself, by learner step.
        self.pending_faults = (
            [event.model_dump() for event in config.faults.events] if role == "train" else []
        )
        self.fault_log: list[dict] = []
        self.reported_faults: dict[int, dict] = {}
        self.executed_faults: set[tuple] = set()
        self.last_step = 0
        self.max_step_seen = 0
        self._next_manager_check = 0.0
        self._manager_lost_reported = False  # a rank's agent saw its manager die
        self._manager_silent_since: dict[int, float] = {}  # position -> first unanswered ping
        self.manager_restarts: list[dict] = []
        # Elastic shrink: where each new rank loads its state from, and the old managers that
        # serve it until the new worker group is up.
        self._restore_sources: dict[int, dict] = {}
        self._retiring_managers: dict[int, object] = {}
        self.attempt = 0
        self.history: list[dict] = []
        # Managers stopped because their durable writes did not finish before a fallback chose.
        self.durable_settle_timeouts = 0
        self.standbys: dict[str, list] = {}  # node id -> standby workers (built or building)
        self.standby_managers: dict[str, object] = {}  # spare node id -> idle manager
        self.standby_manager_takeovers = 0
        self._standby_reserved: dict[str, list[int]] = {}  # spare node id -> slot sizes reserved
        self._next_reserve_check = 0.0
        self.use_standbys = self._standbys_possible(config, role)
        self.last_standby_ranks = 0
        self._refill_after_step: int | None = None  # refill the standbys once past this step
        # Which durable checkpoints a fallback may use, newest first (None: any complete one);
        # the RL driver needs those that carry its pipeline state.
        self.durable_candidates = None
        self.unusable_durable: set[int] = set()  # checkpoint steps a worker found corrupt
        self.started_from: int | None = None  # the durable step `start` restored, if any
        self.injected_at: float | None = None  # when this controller last carried out a fault
        # Where the managers keep their regions (snapshot.shm_dir), in every process of the job.
        from stalwart.snapshot import shm

        env_vars = shm.env_vars(config.snapshot.shm_dir)
        self._runtime_env = {"env_vars": env_vars} if env_vars else None
        self._shm_dir = env_vars.get(shm.SHM_DIR_ENV)

    def _remove_regions(self, prefix: str) -> None:
        """Free the job's regions under `prefix` that lie on this host (all of them on an
        embedded cluster; a node of a real cluster frees its own when its manager stops)."""
        from stalwart.snapshot.shm import remove_regions

        remove_regions(prefix, self._shm_dir)

    # -- placement -----------------------------------------------------------------------

    def position_of_rank(self, rank: int) -> int:
        return rank // self.workers_per_node

    def ranks_of(self, position: int) -> list[int]:
        return [position * self.workers_per_node + i for i in range(self.workers_per_node)]

    def _pin(self, node_id: str):
        return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)

    @staticmethod
    def _standbys_possible(config: RunConfig, role: str = "train") -> bool:
        from stalwart.trainer.loop import Trainer

        return (
            config.cluster.standby_workers
            and config.cluster.gpus_per_worker == 0
            and (role == "rl_learner" or Trainer.can_attach_later(config))
        )

    def _new_worker(self, node_id: str, rank: int, position: int, *, standby: bool = False):
        cluster_config = self.config.cluster
        return TrainWorker.options(
            runtime_env=self._runtime_env,
            # A standby only waits; it takes the CPUs of the rank it replaces, which are free
            # by then (Ray's CPU count places actors, it does not confine them).
            num_cpus=0 if standby else cluster_config.cpus_per_worker,
            num_gpus=0 if standby else cluster_config.gpus_per_worker,
            scheduling_strategy=self._pin(node_id),
        ).remote(
            self.config.to_dict(),
            rank=rank,
            world_size=self.world_size,
            run_dir=str(self.run_dir),
            position=position,
            role=self.role,
        )

    def _refill_standbys(self) -> None:
        """Every live node gets workers_per_node standby workers and every spare node a standby
        manager; those of departed nodes are dropped."""
        if not self.config.cluster.standby_workers:
            return
        alive = [node.node_id for node in self.cluster.alive_nodes()]
        if self.config.snapshot.enabled:
            # A spare node that takes over a lost position needs a manager before anything
            # else: have one running there already (it holds no memory until it rebuilds).
            active = set(self.node_of.values())
            for node_id in [n for n in self.standby_managers if n not in alive]:
                _kill(self.standby_managers.pop(node_id))
                self._standby_reserved.pop(node_id, None)
            for node_id in alive:
                if node_id not in active and node_id not in self.standby_managers:
                    self.standby_managers[node_id] = self._new_manager(node_id, -1)
        if not self.use_standbys:
            return
        for node_id in [n for n in self.standbys if n not in alive]:
            for worker in self.standbys.pop(node_id):
                _kill(worker)
        for node_id in alive:
            pool = self.standbys.setdefault(node_id, [])
            while len(pool) < self.workers_per_node:
                worker = self._new_worker(node_id, -1, -1, standby=True)
                worker.prepare.remote()  # setup waits for it (the worker's build lock)
                pool.append(worker)

    def _reserve_standby_slots(self) -> None:
        """Have every standby manager hold slots of the size one position's ranks use, so a
        takeover copies the lost shard into memory that is already allocated (allocating
        gigabytes of shared memory costs more than filling them). Sizes are known once the
        ranks have registered; they are checked again every RESERVE_CHECK_S. A position whose
        ranks differ in size from the first allocates on demand when it moves."""
        if not self.standby_managers or time.monotonic() < self._next_reserve_check:
            return
        if not self.managers:
            return
        position = min(self.managers)
        first = self._call_all({position: self.managers[position]}, "slot_sizes")[position]
        if not first:
            return  # no rank has registered yet: ask again at the next check
        self._next_reserve_check = time.monotonic() + RESERVE_CHECK_S
        wanted = sorted(first.values())
        for node_id, standby in self.standby_managers.items():
            if self._standby_reserved.get(node_id) != wanted:
                standby.reserve.remote(wanted)
                self._standby_reserved[node_id] = wanted
                self.log(
                    f"standby manager on node {node_id[:8]}: reserving slots of {wanted} bytes"
                )

    def _spare_nodes(self) -> list[str]:
        used = set(self.node_of.values())
        return [node.node_id for node in self.cluster.alive_nodes() if node.node_id not in used]

    def start(self, resume_step: int | None = None) -> None:
        save_config(self.config, self.run_dir)
        alive = self.cluster.alive_nodes()
        if len(alive) < len(self.positions):
            raise JobFailed(
                f"cluster.num_nodes is {len(self.positions)} but the cluster has {len(alive)} live "
                "worker nodes"
            )
        for position in self.positions:
            self.node_of[position] = alive[position].node_id
        if self.config.snapshot.enabled:
            for position in self.positions:
                self._start_manager(position)
            self._check_managers_started()
            self._wire_managers()
        # The standby pool builds while the first group does, so it is ready from the first
        # steps on instead of a few seconds into training.
        source = "durable" if resume_step is not None else "scratch"
        self.started_from, _, _ = self._start_group(
            resume_step, source, while_waiting=self._refill_standbys, scratch_ok=False
        )

    def _start_manager(self, position: int):
        """A manager for `position` on its node: the node's standby manager when it has one."""
        standby = self.standby_managers.pop(self.node_of[position], None)
        self._standby_reserved.pop(self.node_of[position], None)
        if standby is not None:
            try:
                ray.get(
                    standby.assume_position.remote(
                        position, self.positions, self.ranks_of(position)
                    ),
                    timeout=30.0,
                )
                self.managers[position] = standby
                self.standby_manager_takeovers += 1
                return standby
            except Exception as error:  # it died with its node or on its own: start a fresh one
                self.log(f"standby manager unusable ({error!r}); starting a new one")
                _kill(standby)
        manager = self._new_manager(self.node_of[position], position)
        self.managers[position] = manager
        return manager

    def _new_manager(self, node_id: str, position: int):
        from stalwart.snapshot.manager import RemoteSnapshotManager

        snapshot = self.config.snapshot
        manager = RemoteSnapshotManager.options(
            runtime_env=self._runtime_env, scheduling_strategy=self._pin(node_id)
        ).remote(
            job_id=self.job_id,
            position=position,
            positions=self.positions,
            ranks=self.ranks_of(position),
            group_size=snapshot.erasure.group_size,
            parity=snapshot.erasure.parity,
            run_dir=str(self.run_dir),
            persist_every=snapshot.persist_every,
            keep=snapshot.keep,
            num_threads=snapshot.manager_num_threads,
            wait_timeout_s=self.config.cluster.hang_timeout_s,
        )
        return manager

    def _check_managers_started(self) -> None:
        """Every first manager is up (a bad snapshot.shm_dir fails here, before any training),
        and the log says what holds the regions."""
        from stalwart.snapshot.shm import describe_text

        refs = {position: m.shm_info.remote() for position, m in self.managers.items()}
        described = set()
        for position, ref in refs.items():
            try:
                described.add(describe_text(ray.get(ref, timeout=120.0)))
            except RayActorError as error:
                lines = str(error).strip().splitlines()
                raise JobFailed(
                    f"the snapshot manager at position {position} did not start: "
                    f"{lines[-1] if lines else type(error).__name__}"
                ) from None
        for line in sorted(described):
            self.log(line)

    def _wire_managers(self) -> None:
        self._call_all(self.managers, "set_peers", self.managers, timeout_s=30.0)

    def _start_workers(
        self,
        *,
        restore_version: int | None,
        durable_step: int | None = None,
        while_waiting=None,
    ) -> float:
        """Create the worker group, rendezvous, build/restore every Trainer. Returns seconds spent.
        `while_waiting()`, if given, runs once every rank has been asked to set up."""
        started = time.perf_counter()
        cluster_config = self.config.cluster
        self.workers = {}
        standby_ranks = []
        for rank in range(self.world_size):
            position = self.position_of_rank(rank)
            node_id = self.node_of[position]
            pool = self.standbys.get(node_id) if self.use_standbys else None
            if pool:
                self.workers[rank] = pool.pop(0)
                standby_ranks.append(rank)
            else:
                self.workers[rank] = self._new_worker(node_id, rank, position)
        if standby_ranks:
            # A standby that died while it waited (its process, not its node) would leave the
            # others waiting at the rendezvous: ask each for its pid first.
            pids = _gather({rank: self.workers[rank].pid.remote() for rank in standby_ranks}, 10.0)
            for rank in [r for r, pid in pids.items() if pid is None]:
                self.log(f"standby worker for rank {rank} does not answer: starting a new one")
                _kill(self.workers[rank])
                self.workers[rank] = self._new_worker(
                    self.node_of[self.position_of_rank(rank)], rank, self.position_of_rank(rank)
                )
                standby_ranks.remove(rank)
        self.last_standby_ranks = len(standby_ranks)
        master_addr, master_port = ray.get(self.workers[0].endpoint.remote())
        setups = [
            worker.setup.remote(
                master_addr,
                master_port,
                manager=self.managers.get(self.position_of_rank(rank)),
                restore_version=restore_version,
                durable_step=durable_step,
                fault_events=self._worker_faults(rank),
                attempt=self.attempt,
                rank=rank,
                world_size=self.world_size,
                position=self.position_of_rank(rank),
                **self._restore_sources.get(rank, {}),
            )
            for rank, worker in self.workers.items()
        ]
        if while_waiting is not None:
            while_waiting()
        results = ray.get(setups, timeout=max(120.0, cluster_config.hang_timeout_s))
        self._restore_sources = {}
        self._retire_managers()
        self.cursors = {rank: 0 for rank in self.workers}
        self.last_restore_s = max(result["restore_s"] for result in results)
        self.last_step = results[0]["step"]
        self.max_step_seen = self.last_step
        return time.perf_counter() - started

    def _start_group(
        self, version: int | None, source: str, *, while_waiting=None, scratch_ok: bool = True
    ) -> tuple[int | None, str, float]:
        """Start the group restoring `version` from `source` ("memory"/"erasure": the managers'
        memory, "durable": the checkpoint of that step, "scratch": nothing). The choice of a
        durable checkpoint checks manifests and sizes; each worker checks its own shard's data
        as it loads it. A shard that fails marks its step in `unusable_durable`, and the next
        older complete checkpoint is tried (step 0 when none is left and `scratch_ok`, else
        JobFailed: a resume must not quietly start over). Returns what was restored, from
        where, and the seconds spent."""
        started = time.perf_counter()
        while True:
            durable_step = version if source == "durable" else None
            memory_version = version if source in ("memory", "erasure") else None
            try:
                self._start_workers(
                    restore_version=memory_version,
                    durable_step=durable_step,
                    while_waiting=while_waiting,
                )
                return version, source, time.perf_counter() - started
            except RayTaskError as error:
                corrupt = getattr(error, "cause", None)
                if durable_step is None or not isinstance(corrupt, CheckpointCorruptError):
                    raise
                self.unusable_durable.add(durable_step)
                for worker in self.workers.values():
                    _kill(worker)
                self.workers = {}
                while_waiting = None  # it ran with the first attempt
                version = self._newest_durable(below=durable_step)
                if version is None and not scratch_ok:
                    raise JobFailed(
                        f"durable checkpoint of step {durable_step} is unusable ({corrupt}) and "
                        f"no older complete one is left in {self.run_dir}"
                    ) from error
                source = "durable" if version is not None else "scratch"
                older = f"step {version}" if version is not None else "step 0 (none is left)"
                self.log(
                    f"durable checkpoint of step {durable_step} is unusable ({corrupt}); "
                    f"restoring {older} instead"
                )
                if self.managers:
                    self._call_all(self.managers, "resume_at", version or 0, timeout_s=30.0)

    def _worker_faults(self, rank: int) -> list[dict]:
        from stalwart.launch.faults import fault_rank

        return [e for e in self.pending_faults if fault_rank(e, self.workers_per_node) == rank]

    # -- running and watching ------------------------------------------------------------------

    def run(self) -> dict:
        max_steps = self.config.trainer.max_steps
        while True:
            refs = self.submit("run", max_steps)
            failure = self._watch(refs)
            if failure is None:
                break
            self.recover(failure)
        self._drain_progress()
        self.flush_durable()
        return {
            "step": self.last_step,
            "recoveries": self.recoveries,
            "faults": self.fault_log,
            "manager_restarts": self.manager_restarts,
            "world_size": self.world_size,
            "standby_manager_takeovers": self.standby_manager_takeovers,
        }

    def watch(self, refs: dict) -> Failure | None:
        """Wait for every rank's call in `refs` ({rank: ref}), looking at the group every
        POLL_S (see `check`): None when all finished, else the classified failure."""
        return self._watch(refs)

    def _watch(self, refs: dict) -> Failure | None:
        pending = dict(refs)
        while pending:
            done, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=POLL_S)
            failure = self.check(pending, done)
            if failure is not None:
                return failure
        return None

    def check(self, pending: dict, done=()) -> Failure | None:
        """One look at the group: `pending` maps ranks to the calls they are running (finished
        ones in `done` are checked and dropped from it). A failed call, a departed node, a rank
        that does not answer, or one running call without progress for cluster.hang_timeout_s
        is a failure, classified; None: all is well. Also reads the ranks' progress, carries
        out due fault injections, restarts dead managers and refills standbys. `run` calls it
        every POLL_S; a caller that steps the group itself (the RL driver) calls it as often.
        """
        hang_timeout_s = self.config.cluster.hang_timeout_s
        for ref in done:
            rank = next(r for r, v in pending.items() if v == ref)
            try:
                ray.get(ref)
                del pending[rank]
            except (RayActorError, RayTaskError) as error:
                cause = str(error).strip().splitlines()[-1] if str(error).strip() else ""
                return self._classify([rank], f"rank {rank}: {type(error).__name__}: {cause}")
        idle = self._drain_progress()
        if self._refill_after_step is not None and self.max_step_seen > self._refill_after_step:
            self._refill_after_step = None
            self._refill_standbys()
        self._controller_faults()
        self._replace_dead_managers()
        self._reserve_standby_slots()
        alive_nodes = {node.node_id for node in self.cluster.alive_nodes()}
        gone = [p for p, node_id in self.node_of.items() if node_id not in alive_nodes]
        if gone:
            return self._classify(
                [r for p in gone for r in self.ranks_of(p)],
                f"node(s) at positions {gone} left the cluster",
            )
        silent = [
            rank for rank, idle_s in idle.items() if idle_s == float("inf") and rank in pending
        ]
        if silent:
            return self._classify(silent, f"rank(s) {silent} do not answer")
        stalled = [
            rank for rank, idle_s in idle.items() if idle_s > hang_timeout_s and rank in pending
        ]
        if stalled:
            failure = self._classify(stalled, f"no progress for {hang_timeout_s:.0f} s")
            if failure.kind == "process":
                failure.kind = "hang"
            return failure
        return None

    def submit(self, method: str, *args) -> dict:
        """Call `method` on every rank of the group (the RL driver's step-by-step mode):
        {rank: what `.remote()` returned}."""
        return {
            rank: getattr(worker, method).remote(*args) for rank, worker in self.workers.items()
        }

    def recover(self, failure: Failure) -> Recovery:
        """Recover the group from `failure` (as `run` does) and return the recovery's record:
        the version the new group restored (`restored_version`) and from where (`source`)."""
        if len(self.recoveries) >= self.config.cluster.max_recoveries:
            raise JobFailed(f"gave up after {len(self.recoveries)} recoveries: {failure.detail}")
        self._recover_through(failure)
        return self.recoveries[-1]

    def committed_version(self) -> int | None:
        """The newest version committed everywhere (the lowest of the managers' reports)."""
        statuses = self._call_all(self.managers, "status", timeout_s=30.0)
        committed = [s["committed"] if s else None for s in statuses.values()]
        if not committed or any(c is None for c in committed):
            return None
        return min(committed)

    def flush_durable(self) -> None:
        """Wait for every manager's durable writes (best effort at the very end of a run)."""
        for manager in self.managers.values():
            try:
                ray.get(manager.flush_durable.remote(), timeout=600)
            except Exception as error:
                self.log(f"durable tier flush failed: {error!r}")

    @staticmethod
    def _call_all(
        handles: dict, method: str, *args, timeout_s: float = 3.0, args_by_key: dict | None = None
    ) -> dict:
        """Call `method` on every actor at once (with `args`, or `args_by_key[key]`); a dead or
        unresponsive actor maps to None."""
        refs = {
            key: getattr(handle, method).remote(*(args_by_key[key] if args_by_key else args))
            for key, handle in handles.items()
        }
        return _gather(refs, timeout_s)

    def _drain_progress(self) -> dict[int, float]:
        """Log the ranks' new records; each rank's seconds since its last step (inf: silent)."""
        reports = self._call_all(
            self.workers, "progress", args_by_key={r: (self.cursors[r],) for r in self.workers}
        )
        idle = {}
        for rank, report in reports.items():
            if report is None:
                idle[rank] = float("inf")
                continue
            self.cursors[rank] = report["cursor"]
            idle[rank] = report["idle_s"]
            if report.get("manager_lost"):
                self._manager_lost_reported = True
            if report.get("pending_fault"):
                self.reported_faults[rank] = report["pending_fault"]
                idle[rank] = 0.0  # paused on purpose, not hung
            self.max_step_seen = max(self.max_step_seen, int(report["step"]))
            if rank == 0:
                for record in report["records"]:
                    record["attempt"] = self.attempt
                    self.history.append(record)
                    self.last_step = int(record["step"])
                    if self.sinks is not None:
                        self.sinks.log(record, int(record["step"]))
        return idle

    def _classify(self, ranks: list[int], detail: str) -> Failure:
        # One question after another, each with its own deadline: the time this takes also
        # lets Ray notice every node a multi-node fault removed (asking all at once missed the
        # second of two nodes lost together).
        idle = self._drain_progress()
        measured_at = time.perf_counter()  # `idle` counts up to here
        pids = self._call_all(self.workers, "pid")
        dead = [rank for rank, pid in pids.items() if pid is None]
        ranks = sorted(set(dead) or set(ranks))
        alive_nodes = {node.node_id for node in self.cluster.alive_nodes()}
        pings = self._call_all(self.managers, "ping")
        lost = [
            position
            for position, node_id in self.node_of.items()
            if node_id not in alive_nodes or (position in self.managers and pings[position] is None)
        ]
        # Time since the failed ranks last completed a step: an upper bound on detection time.
        finite = [idle[r] for r in ranks if idle.get(r, float("inf")) != float("inf")]
        finite = finite or [v for v in idle.values() if v != float("inf")]
        detection_s = max(finite, default=0.0)
        injected_at, self.injected_at = self.injected_at, None
        if injected_at is not None and injected_at >= measured_at - detection_s:
            # A fault this controller carried out after those ranks' last step: its moment is
            # known, so detection is timed from it (not from the step it interrupted, nor the
            # pause while the rank waited for the controller to carry it out).
            detection_s = max(0.0, measured_at - injected_at)
        return Failure(
            kind="node" if lost else "process",
            ranks=ranks,
            lost_positions=lost,
            detail=detail,
            step=self.max_step_seen,
            detected_at=measured_at,
            detection_s=detection_s,
            dead_ranks=dead,
        )

    def _replace_dead_managers(self) -> None:
        """A manager that died on a live node is restarted there; training does not stop.

        Its memory is gone, so versions that it never received can never commit. The order:
        the replacement learns its peers; its ranks switch to it and say from which version on
        every snapshot reaches it (the floor); every manager abandons the versions below the
        floor (waking anyone waiting for them); only then do the peers address the replacement.
        The next version at or above the floor commits everywhere and fills it. A rank that
        reports its manager lost triggers this at once; otherwise managers are pinged every
        MANAGER_CHECK_S.
        """
        due = time.monotonic() >= self._next_manager_check or self._manager_lost_reported
        if not self.managers or not due:
            return
        self._manager_lost_reported = False
        self._next_manager_check = time.monotonic() + MANAGER_CHECK_S
        verdicts = self._manager_verdicts(timeout_s=3.0)
        now = time.monotonic()
        for position, verdict in verdicts.items():
            if verdict == "silent":
                self._manager_silent_since.setdefault(position, now)
            else:
                self._manager_silent_since.pop(position, None)
        # Only Ray's word (the actor died) or a long silence counts: a manager that is merely
        # slow to answer (page-faulting gigabytes on a loaded host) holds committed snapshots
        # that a replacement would throw away.
        alive_nodes = {node.node_id for node in self.cluster.alive_nodes()}
        dead = [
            p
            for p, verdict in verdicts.items()
            if self.node_of[p] in alive_nodes
            and (
                verdict == "dead"
                or (verdict == "silent" and now - self._manager_silent_since[p] >= DEAD_MANAGER_S)
            )
        ]
        # A manager dead *with* its workers means the node is going: the watcher handles that.
        dead = [
            p
            for p in dead
            if all(
                pid is not None
                for pid in self._call_all(
                    {r: self.workers[r] for r in self.ranks_of(p)}, "pid"
                ).values()
            )
        ]
        for position in dead:
            started = time.perf_counter()
            how = "died" if verdicts[position] == "dead" else "stopped answering"
            self.log(f"snapshot manager at position {position} {how}: restarting it on its node")
            self._manager_silent_since.pop(position, None)
            # A silent manager may still be running: it must not outlive its replacement.
            ray.kill(self.managers[position], no_restart=True)
            manager = self._start_manager(position)
            ranks = self.ranks_of(position)
            # Queued before anything the ranks send it; the ranks switch at once (their next
            # snapshot waits for the new process to come up, so none of them runs far ahead).
            peers_set = manager.set_peers.remote(self.managers)
            try:
                floors = ray.get(
                    [self.workers[r].set_manager.remote(manager) for r in ranks], timeout=60
                )
                ray.get(peers_set, timeout=60)
            except (RayActorError, RayTaskError, ray.exceptions.GetTimeoutError) as error:
                # The node is going after all, or its workers died: the watcher sees it and
                # recovers, with the replacement wired in as this position's manager.
                self.log(f"could not hand the new manager to position {position}: {error!r}")
                self._wire_managers()
                continue
            floor = max(floors)
            self._call_all(self.managers, "abandon_below", floor, timeout_s=30.0)
            self._wire_managers()
            self.manager_restarts.append(
                {
                    "position": position,
                    "step": self.max_step_seen,
                    "first_version": floor,
                    "restart_s": time.perf_counter() - started,
                }
            )

    # -- fault injection driven from here (node, manager, fragment) ----------------------------

    def _controller_faults(self) -> None:
        """Carry out the node, manager and fragment faults that a paused rank reports."""
        for rank, event in list(self.reported_faults.items()):
            del self.reported_faults[rank]
            key = (event["kind"], event["step"], event["phase"], event["rank"], event["node"])
            if key in self.executed_faults:  # reported again before the paused rank resumed
                continue
            self.executed_faults.add(key)
            self.pending_faults = [
                e
                for e in self.pending_faults
                if (e["kind"], e["step"], e["phase"], e["rank"], e["node"]) != key
            ]
            self.fault_log.append(event)
            position = (
                event["node"] if event["node"] is not None else self.position_of_rank(event["rank"])
            )
            step = event["at_step"]
            if event["kind"] == "kill_node":
                self.log(
                    f"fault: removing node at position {position} (step {step}, {event['phase']})"
                )
                self.injected_at = time.perf_counter()
                self.cluster.remove_node(self.node_of[position])
                continue  # the paused rank died with its node
            if event["kind"] == "kill_manager":
                self.log(
                    f"fault: killing the snapshot manager at position {position} (step {step})"
                )
                self.injected_at = time.perf_counter()
                ray.kill(self.managers[position], no_restart=True)
            elif event["kind"] == "stall_manager":
                self.log(
                    f"fault: the snapshot manager at position {position} stops answering for "
                    f"{event['duration_s']:.0f} s (step {step})"
                )
                self.managers[position].stall.remote(event["duration_s"])
            elif event["kind"] == "corrupt_fragment":
                self._corrupt(position, event["rank"])
            self.workers[rank].release_fault.remote()

    def _corrupt(self, position: int, rank: int) -> None:
        status = ray.get(self.managers[position].status.remote())
        if status["committed"] is not None:
            self.log(
                f"fault: corrupting rank {rank}'s copy of version {status['committed']} in memory"
            )
            ray.get(self.managers[position].corrupt.remote(rank, status["committed"]))

    # -- recovery ------------------------------------------------------------------------------

    def _recover_through(self, failure: Failure) -> None:
        """Recover; if a worker, manager or node dies while the new group starts (a fault
        still unfolding), classify that and recover again, at most REASSESS_ATTEMPTS times."""
        for attempt in range(REASSESS_ATTEMPTS):
            try:
                self._recover(failure)
                return
            except (ray.exceptions.RayError, TimeoutError) as error:
                if attempt == REASSESS_ATTEMPTS - 1:
                    raise JobFailed(f"recovery kept failing: {error}") from error
                cause = str(error).strip().splitlines()[-1] if str(error).strip() else ""
                again = self._classify(
                    list(self.workers), f"during the recovery: {type(error).__name__}: {cause}"
                )
                if again.kind == "process" and not again.dead_ranks:
                    raise  # nothing died: a real error, not a fault to recover from
                self.log(f"the recovery failed ({again.detail}); recovering again")
                failure = again

    def _recover(self, failure: Failure) -> None:
        detection_s = failure.detection_s + (time.perf_counter() - failure.detected_at)
        self.log(f"failure detected ({failure.kind}): {failure.detail}")
        # Ranks step in lockstep, so every worker-side fault up to the failing step has fired;
        # none may fire again when those steps run a second time.
        self.pending_faults = [e for e in self.pending_faults if e["step"] > failure.step + 1]
        self.attempt += 1

        started = time.perf_counter()
        for worker in self.workers.values():
            ray.kill(worker, no_restart=True)
        self.workers = {}
        teardown_s = time.perf_counter() - started

        started = time.perf_counter()
        version, source, detail = self._restore_point(failure)

        if self.managers:
            # Every manager addresses the current peers, and forgets what the dead attempt left
            # in flight above the restored version (and any floor a manager restart set).
            self._wire_managers()
            self._call_all(self.managers, "resume_at", version or 0, timeout_s=30.0)
        rebuild_s = time.perf_counter() - started

        started = time.perf_counter()
        version, source, restart_and_reform_s = self._start_group(version, source)
        # New standbys start once this group has completed a step: their process starts and
        # model builds would otherwise compete with the first step after the recovery.
        self._refill_after_step = self.last_step
        lost_steps = max(0, failure.step - (version or 0))
        recovery = Recovery(
            kind=failure.kind,
            restored_version=version,
            source=source,
            lost_steps=lost_steps,
            detection_s=detection_s,
            teardown_s=teardown_s,
            rebuild_s=rebuild_s,
            restart_s=restart_and_reform_s,
            restore_s=self.last_restore_s,
            detail=detail,
            standby_ranks=self.last_standby_ranks,
        )
        self.recoveries.append(recovery)
        self.log(recovery.summary())
        if self.sinks is not None:
            self.sinks.log(
                {"recovery_s": recovery.total_s, "lost_steps": float(lost_steps)}, self.last_step
            )

    def _restore_point(self, failure: Failure) -> tuple[int | None, str, str]:
        """Which version to restore and from where; rebuilds lost positions on spares. A
        manager that dies meanwhile (a multi-node fault still unfolding) counts as lost too,
        and the choice is made again."""
        if not self.managers:
            return None, "scratch", "snapshots are disabled: restarting from step 0"
        lost = list(failure.lost_positions)
        replaced: set[int] = set()  # lost positions already moved to a spare in this recovery
        for _ in range(REASSESS_ATTEMPTS):
            outcome = self._try_restore_point(lost, replaced)
            if isinstance(outcome, tuple) and outcome[1] in ("memory", "erasure"):
                # The state is in place only if every manager that holds it is still there.
                outcome = self._dead_managers() or outcome
            if isinstance(outcome, tuple):
                return outcome
            self.log(f"position(s) {outcome} failed during the recovery: assessing again")
            lost = sorted(set(lost) | set(outcome))
            replaced -= set(outcome)  # a replacement that died moves again
        return self._durable_fallback(
            f"managers kept failing during the recovery (lost positions {lost})"
        )

    def _dead_managers(self) -> list[int]:
        """Positions whose manager is dead: its actor is gone (Ray says so), or it has not
        answered a ping within DEAD_MANAGER_S. A manager that is only slow (a busy 2-core
        machine) answers late and is not moved to a spare."""
        verdicts = self._manager_verdicts(timeout_s=DEAD_MANAGER_S)
        return sorted(p for p, verdict in verdicts.items() if verdict != "alive")

    def _manager_verdicts(self, timeout_s: float) -> dict[int, str]:
        """Ping every manager once, waiting at most `timeout_s`: "alive" (answered), "dead"
        (Ray reports the actor died) or "silent" (no answer yet, or unreachable for now)."""
        refs = {position: manager.ping.remote() for position, manager in self.managers.items()}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        return {position: _verdict(ref, timeout_s=0) for position, ref in refs.items()}

    def _try_restore_point(
        self, lost: list[int], replaced: set[int]
    ) -> tuple[int | None, str, str] | list[int]:
        """One assessment: (version, source, detail), or the positions that died during it."""
        lost = sorted(set(lost) | replaced)
        statuses = {}
        for position, manager in self.managers.items():
            if position in lost:
                continue
            try:
                statuses[position] = ray.get(manager.freeze.remote(), timeout=10.0)
            except Exception:
                lost.append(position)
        committed = [s["committed"] for s in statuses.values() if s["committed"] is not None]
        version = max(committed) if committed else None
        corrupt = []
        if version is not None:
            checks = self._call_all(
                {p: m for p, m in self.managers.items() if p not in lost},
                "verify_version",
                version,
                timeout_s=60.0,
            )
            corrupt = [p for p, ok in checks.items() if not ok]
        if not lost and not corrupt:
            return version, "memory", ""
        if not lost:
            self.log(
                f"position(s) {corrupt} hold no valid copy of version {version}: rebuilding it"
            )
            return self._rebuild(version, corrupt, f"rebuilt corrupt copies at positions {corrupt}")
        # Node (or manager) loss: replace the lost positions.
        to_replace = [p for p in lost if p not in replaced]
        if self.config.cluster.elastic and len(self._spare_nodes()) < len(to_replace):
            if len(self._spare_nodes()) < len(self._departed(to_replace)):
                return self._shrink(version, lost, corrupt)
        for position in to_replace:
            # On an embedded cluster the lost node's memory lies on this host: free it.
            self._remove_regions(f"stalwart-{self.job_id}-p{position}-")
            spare = self._take_node(position)
            self.node_of[position] = spare
            self._start_manager(position)
            replaced.add(position)
        self._wire_managers()
        if version is None:
            return self._durable_fallback("no version was committed before the loss")
        return self._rebuild(
            version, lost + corrupt, f"rebuilt positions {lost + corrupt} from parity"
        )

    def _departed(self, positions: list[int]) -> list[int]:
        """Which of `positions` lost their node. Their actors stop answering before Ray declares
        the node dead (its health checks take a few seconds), so wait up to NODE_VERDICT_S for
        Ray's verdict; a position whose node stays alive lost only its manager."""
        deadline = time.monotonic() + NODE_VERDICT_S
        while True:
            alive = self._alive_node_ids()
            departed = [p for p in positions if self.node_of[p] not in alive]
            if len(departed) == len(positions) or time.monotonic() > deadline:
                return departed
            time.sleep(0.25)

    def _alive_node_ids(self) -> set[str]:
        return {node.node_id for node in self.cluster.alive_nodes()}

    def _shrink(
        self, version: int | None, lost: list[int], corrupt: list[int]
    ) -> tuple[int | None, str, str]:
        """Elastic: continue data-parallel on the surviving positions, no spare needed.

        Under DDP every rank holds the whole model and optimizer state, so the survivors' own
        copies of the restored version are enough: new rank i loads what surviving rank
        old(i) saved, from that rank's manager. The global batch is unchanged (each rank takes
        a larger share), so training continues on the same trajectory up to the order of
        floating-point sums. Positions are dropped from the end until the global batch divides
        by the new number of ranks. Managers are restarted for the new layout once the new
        worker group has loaded its state.
        """
        survivors = [p for p in self.positions if p not in lost and p not in corrupt]
        trainer = self.config.trainer
        keep = len(survivors)
        while keep and trainer.batch_size % (
            keep * self.workers_per_node * trainer.grad_accum_steps
        ):
            keep -= 1
        if keep == 0:
            raise JobFailed(
                f"elastic: {len(survivors)} surviving node(s) cannot split trainer.batch_size "
                f"{trainer.batch_size} evenly; no spare node is free"
            )
        kept = survivors[:keep]
        old_world_size = self.world_size
        new_world_size = keep * self.workers_per_node
        old_ranks = {
            new_position * self.workers_per_node + j: old_position * self.workers_per_node + j
            for new_position, old_position in enumerate(kept)
            for j in range(self.workers_per_node)
        }
        if version is not None:
            source, detail_source = "memory", f"memory version {version}"
            self._restore_sources = {
                new_rank: {
                    "restore_rank": old_rank,
                    "restore_manager": self.managers[self.position_of_rank(old_rank)],
                }
                for new_rank, old_rank in old_ranks.items()
            }
        else:
            version = self._newest_durable()
            source = "durable" if version is not None else "scratch"
            detail_source = f"durable step {version}" if version is not None else "step 0"
            self._restore_sources = {
                new_rank: {"restore_rank": old_rank} for new_rank, old_rank in old_ranks.items()
            }
        detail = (
            f"elastic: continuing on {new_world_size} rank(s) instead of {old_world_size} "
            f"(positions {kept} of the old layout) from {detail_source}; same global batch, "
            "results match the full-size run to rounding, not bit for bit"
        )
        self.log(detail)
        for position in lost:  # a lost node's memory lies on this host on an embedded cluster
            self._remove_regions(f"stalwart-{self.job_id}-p{position}-")
        self._retiring_managers = {p: m for p, m in self.managers.items() if p not in lost}
        self.node_of = {i: self.node_of[old] for i, old in enumerate(kept)}
        self.positions = list(range(keep))
        self.world_size = new_world_size
        self.managers = {}
        if self.config.snapshot.enabled:
            for position in self.positions:
                self._start_manager(position)
        return version, source, detail

    def _retire_managers(self) -> None:
        """Stop the managers of the layout before an elastic shrink (their state is loaded)."""
        retiring, self._retiring_managers = self._retiring_managers, {}
        for manager in retiring.values():
            try:
                prefix = ray.get(manager.region_prefix.remote(), timeout=10.0)
            except Exception:  # already gone: nothing of it left to remove here
                prefix = None
            try:
                ray.kill(manager, no_restart=True)
            except Exception:
                pass
            if prefix:
                self._remove_regions(prefix + "-")

    def _rebuild(
        self, version: int, lost: list[int], detail: str
    ) -> tuple[int | None, str, str] | list[int]:
        from stalwart.erasure.layout import ErasureLayout

        layout = ErasureLayout(
            self.positions,
            self.config.snapshot.erasure.group_size,
            self.config.snapshot.erasure.parity,
        )
        plan = layout.recovery_plan(lost)
        if not plan.recoverable:
            return self._durable_fallback(
                plan.reason or f"{len(lost)} positions lost beyond the parity"
            )
        survivor = next(p for p in self.positions if p not in lost)
        try:
            meta = ray.get(self.managers[survivor].version_meta.remote(version), timeout=60)
            reports = ray.get(
                [self.managers[p].rebuild.remote(version, lost, meta) for p in lost], timeout=300
            )
            for report in reports:
                self.log(
                    f"position {report['position']}: rebuilt {report['bytes'] / 2**20:.0f} MiB in "
                    f"{report['rebuild_s']:.2f} s (slots "
                    + ("reserved ahead" if report["reserved_slots"] else "allocated")
                    + f" {report['allocate_s']:.2f} s)"
                )
        except Exception as error:
            dead = self._dead_managers()
            if dead:
                return dead
            return self._durable_fallback(f"erasure rebuild failed: {error}")
        return version, "erasure", detail

    def _take_node(self, position: int) -> str:
        deadline = time.monotonic() + self.config.cluster.capacity_timeout_s
        while True:
            spares = self._spare_nodes()
            if spares:
                self.log(f"position {position} moves to spare node {spares[0][:8]}")
                return spares[0]
            if time.monotonic() > deadline:
                raise JobFailed(
                    f"no spare node for position {position} within cluster.capacity_timeout_s "
                    f"({self.config.cluster.capacity_timeout_s:.0f} s); add a node to the Ray cluster or register spares with cluster.num_spare_nodes"
                )
            time.sleep(1.0)

    def _settle_durable_writes(self) -> None:
        """Before a durable checkpoint is chosen, the managers' writes already underway finish:
        one landing after the choice would prune the chosen checkpoint (`snapshot.keep`) while
        the new workers load it. It also makes the newest checkpoint usable, so fewer steps are
        lost. A manager that does not finish within SETTLE_DURABLE_S, or does not answer, is
        stopped, its write with it (an unfinished write leaves only a temporary directory,
        never listed), and replaced like a dead one."""
        if not self.managers:
            return
        settled = self._call_all(
            self.managers, "settle_durable", SETTLE_DURABLE_S, timeout_s=SETTLE_DURABLE_S + 5.0
        )
        for position, done in settled.items():
            if done:
                continue
            manager = self.managers[position]
            if done is False:
                self.durable_settle_timeouts += 1
                why = f"did not finish its durable writes within {SETTLE_DURABLE_S:.0f} s"
            elif _is_dead(manager):
                continue  # a lost one: nothing of it can still write
            else:
                why = "does not answer"
            self.log(
                f"snapshot manager at position {position} {why}: stopping it before choosing "
                "a durable checkpoint"
            )
            _kill_and_wait(manager, timeout_s=10.0)

    def _newest_durable(self, below: int | None = None) -> int | None:
        """The newest durable checkpoint (of `durable_candidates`, if set) that is complete:
        manifest readable, every file present at its recorded size. A half-deleted or truncated
        one is reported and the next older one used. The data's checksums are verified by the
        workers as each loads its own shard (no single process reads the whole checkpoint
        first); a shard that fails marks its step in `unusable_durable` and the group starts
        again from the newest one `below` it (`_start_group`)."""
        from stalwart.snapshot.persist import newest_usable_step

        return newest_usable_step(
            self.run_dir,
            self.durable_candidates,
            log=self.log,
            checksums=False,
            exclude=self.unusable_durable,
            below=below,
        )

    def _durable_fallback(self, why: str) -> tuple[int | None, str, str]:
        self._settle_durable_writes()
        step = self._newest_durable()
        self._call_all(self.managers, "reset", timeout_s=30.0)  # a dead one is replaced later
        if step is None:
            self.log(
                f"cannot restore from memory ({why}) and no durable checkpoint exists: restarting from step 0"
            )
            return None, "scratch", why
        self.log(
            f"cannot restore from memory ({why}): falling back to the durable checkpoint of step {step}"
        )
        return step, "durable", why

    # -- results and teardown ------------------------------------------------------------------

    def state_arrays(self) -> dict[int, dict]:
        return {
            rank: ray.get(worker.local_state_arrays.remote())
            for rank, worker in self.workers.items()
        }

    def shutdown(self) -> None:
        for pool in self.standbys.values():
            for worker in pool:
                _kill(worker)
        for manager in self.standby_managers.values():
            _kill(manager)
        self.standbys, self.standby_managers = {}, {}
        for worker in self.workers.values():
            try:
                ray.get(worker.shutdown.remote(), timeout=10)
            except Exception:
                pass
            ray.kill(worker, no_restart=True)
        for manager in self.managers.values():
            try:
                ray.get(manager.shutdown.remote(), timeout=10)
            except Exception:
                pass
            ray.kill(manager, no_restart=True)
        self.workers, self.managers = {}, {}
        self._remove_regions(f"stalwart-{self.job_id}-")


def _kill(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone
        pass


def _verdict(ref, timeout_s: float) -> str:
    """What an actor call's ref says of its actor within `timeout_s`: "alive" (it answered),
    "dead" (Ray reports the actor died) or "silent" (no answer yet, or unreachable for now)."""
    try:
        ray.get(ref, timeout=timeout_s)
        return "alive"
    except (ray.exceptions.ActorDiedError, RayTaskError):
        return "dead"
    except ray.exceptions.RayError:  # a timeout, or the actor unreachable for now
        return "silent"


def _is_dead(actor, timeout_s: float = 1.0) -> bool:
    """Whether Ray reports `actor` dead (a live but busy or unreachable one is not)."""
    return _verdict(actor.__ray_ready__.remote(), timeout_s) == "dead"


def _kill_and_wait(actor, timeout_s: float) -> bool:
    """Kill `actor` and wait (up to `timeout_s`) until Ray reports it dead: ray.kill returns
    before the process is gone. True once it is."""
    _kill(actor)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _is_dead(actor, timeout_s=max(0.1, deadline - time.monotonic())):
            return True
        time.sleep(0.05)
    return False


def _gather(refs: dict, timeout_s: float) -> dict:
    """Each ref's result, waiting at most `timeout_s` for all; None for a failed or late one."""
    if not refs:
        return {}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    ready = set(ready)
    results = {}
    for key, ref in refs.items():
        try:
            results[key] = ray.get(ref) if ref in ready else None
        except (RayActorError, RayTaskError):
            results[key] = None
    return results

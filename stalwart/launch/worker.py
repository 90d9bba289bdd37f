"""TrainWorker: the Ray actor that hosts one rank's Trainer.

The controller creates one per rank, pinned to a node, and drives it: `setup` joins a fresh
process group and builds (or restores) the Trainer, `run` steps until a target step, and
`progress` (answered from another thread while `run` works) hands over the metrics recorded
since the last poll, so the driver logs them and sees whether the rank still makes progress.

A standby worker is created before it has a rank and `prepare`s: it builds its Trainer with
no process group. When a recovery hands it a rank, `setup` only joins the new group, wraps the
model for it and loads the state: no process start, no imports, no model build.

Role ``rl_learner``: the worker hosts one rank of a data-parallel RL learner
(`trainer.rl.learner.RLLearner`) instead of a Trainer. The RL driver, not the worker, owns the
loop: it hands every rank the same batch (`rl_step`, one object-store put read by all ranks),
the ranks all-reduce their gradients and step in lockstep, and rank 0 returns the new weights.
Snapshots, standbys, process groups and recovery are the same as for a training rank.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import ray
import torch

from stalwart.config import config_from_dict
from stalwart.snapshot import shm
from stalwart.trainer import parallel

ROLES = ("train", "rl_learner")


class StopRequested(Exception):
    """Raised inside `run` when the controller asked the worker to stop."""


@ray.remote(max_concurrency=4)
class TrainWorker:
    def __init__(
        self,
        config: dict,
        *,
        rank: int,
        world_size: int,
        run_dir: str,
        position: int,
        role: str = "train",
    ):
        if role not in ROLES:
            raise ValueError(f"worker role {role!r}; choose one of {', '.join(ROLES)}")
        self.role = role
        self.config = config_from_dict(config)
        self.rank = rank
        self.world_size = world_size
        self.run_dir = run_dir
        self.position = position
        self.trainer = None
        self.agent = None
        self.records: list[dict] = []
        self.last_progress_s = time.monotonic()
        self._stop = threading.Event()
        self._faults = None
        self._store = None  # rank 0's rendezvous store
        self._build_lock = threading.Lock()  # `setup` waits for a standby's `prepare`
        self._step_turn = threading.Condition()  # rl_step calls run one at a time, in order
        self.prepared_s: float | None = None

    def pid(self) -> int:
        return os.getpid()

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def _group_timeout_s(self) -> float:
        # Longer than the controller's hang watchdog, which should see a hang first and tell
        # it apart from a crash.
        return 2 * self.config.cluster.hang_timeout_s + 30

    def endpoint(self) -> tuple[str, int]:
        """Serve the rendezvous store (rank 0) on a port the OS picks; its address and port."""
        host = ray.util.get_node_ip_address()
        if self._store is None:
            self._store = parallel.serve_store(host, self._group_timeout_s())
        return host, self._store.port

    def _set_threads(self) -> None:
        config = self.config
        torch.set_num_threads(
            config.trainer.num_threads or max(1, int(config.cluster.cpus_per_worker))
        )

    def _build(self, rank: int, *, sync_parameters: bool = True):
        if self.role == "rl_learner":
            from stalwart.trainer.rl.learner import RLLearner

            return RLLearner(self.config, rank=rank, world_size=self.world_size)
        from stalwart.trainer.loop import Trainer

        return Trainer(
            self.config,
            rank=rank,
            world_size=self.world_size,
            run_dir=self.run_dir,
            sync_parameters=sync_parameters,
        )

    def _step(self) -> int:
        """The rank's step: a Trainer's step count, an RL learner's weights version."""
        if self.trainer is None:
            return 0
        return self.trainer.version if self.role == "rl_learner" else self.trainer.step

    def prepare(self) -> dict:
        """Standby: build the Trainer now, before this worker has a rank or a process group."""
        started = time.perf_counter()
        with self._build_lock:
            if self.trainer is None:
                # DistributedDataParallel's constructor imports torch._dynamo: over a second
                # that would otherwise fall inside the recovery.
                import torch._dynamo  # noqa: F401

                self._set_threads()
                self.trainer = self._build(rank=0)
                if self.config.snapshot.enabled:
                    # A standby exists to take over a restore: map its optimizer state now.
                    self.trainer.reserve_restore_memory(fits=shm.can_reserve)
                self.prepared_s = time.perf_counter() - started
        return {"pid": os.getpid(), "build_s": self.prepared_s}

    def setup(
        self,
        master_addr: str,
        master_port: int,
        *,
        manager=None,
        restore_version: int | None = None,
        durable_step: int | None = None,
        fault_events: list[dict] | None = None,
        attempt: int = 0,
        restore_rank: int | None = None,
        restore_manager=None,
        rank: int | None = None,
        world_size: int | None = None,
        position: int | None = None,
    ) -> dict:
        """Join the process group, build the Trainer, restore a snapshot version if asked.

        `restore_rank`/`restore_manager`: load the state another rank saved (from that rank's
        manager), when an elastic job continues on fewer ranks; by default this rank's own.
        `rank`/`world_size`/`position` assign a standby worker its place.
        """
        if rank is not None:
            self.rank = rank
        if world_size is not None:
            self.world_size = world_size
        if position is not None:
            self.position = position
        config = self.config
        with self._build_lock:
            prepared = self.trainer is not None
            self._set_threads()
            if self.world_size > 1:
                store = self._store
                if store is None and self.rank != 0:
                    store = parallel.connect_store(
                        master_addr, master_port, self._group_timeout_s()
                    )
                parallel.init_process_group(
                    backend=parallel.pick_backend(config.parallel.backend, torch.device("cpu")),
                    master_addr=master_addr,
                    master_port=master_port,
                    rank=self.rank,
                    world_size=self.world_size,
                    timeout_s=self._group_timeout_s(),
                    store=store,
                )
            # A restore sets every rank's parameters to the same version's bytes right after:
            # DDP's broadcast of rank 0's would be overwritten unread. Standbys and fresh
            # workers of one group decide alike (the broadcast is a collective).
            restores = durable_step is not None or restore_version is not None
            if prepared:
                self.trainer.attach_process_group(
                    self.rank, self.world_size, sync_parameters=not restores
                )
            else:
                self.trainer = self._build(rank=self.rank, sync_parameters=not restores)
        restored_from = None
        restore_started = time.perf_counter()
        if durable_step is not None:
            from stalwart.snapshot.restore import load_from_durable

            source_rank = self.rank if restore_rank is None else restore_rank
            load_from_durable(self.trainer, self.run_dir, source_rank, durable_step)
            restored_from = f"durable step {durable_step}"
        if manager is not None and config.snapshot.enabled:
            from stalwart.snapshot.agent import SnapshotAgent
            from stalwart.snapshot.restore import load_from_manager

            if restore_version is not None:
                load_from_manager(
                    self.trainer,
                    manager if restore_manager is None else restore_manager,
                    self.rank if restore_rank is None else restore_rank,
                    restore_version,
                )
                restored_from = f"memory version {restore_version}"
            self.agent = SnapshotAgent(
                self.trainer, manager, rank=self.rank, every_steps=config.snapshot.every_steps
            )
        restore_s = time.perf_counter() - restore_started if restored_from else 0.0
        if fault_events and self.role == "train":
            from stalwart.launch.faults import FaultInjector

            self._faults = FaultInjector(fault_events, rank=self.rank, attempt=attempt)
            self.trainer.phase_hooks.append(self._faults.on_phase)
        self.last_progress_s = time.monotonic()
        return {
            "rank": self.rank,
            "step": self._step(),
            "restore_s": restore_s,
            "restored_from": restored_from,
            "pid": os.getpid(),
        }

    def run(self, until_step: int) -> dict:
        """Train until `until_step`; returns the final step."""
        if self.role != "train":
            raise RuntimeError(f"a {self.role} worker is driven step by step, not by run()")
        trainer = self.trainer
        eval_every = self.config.trainer.eval_every
        while trainer.step < until_step:
            if self._stop.is_set():
                raise StopRequested(f"rank {self.rank} stopped at step {trainer.step}")
            record = trainer.train_step()
            record["step"] = trainer.step
            if self.agent is not None:
                record.update(self.agent.metrics())
            if eval_every and trainer.step % eval_every == 0:
                record.update(trainer.evaluate())
            self.records.append(record)
            self.last_progress_s = time.monotonic()
        if self.agent is not None:
            self.agent.flush()
        return {"rank": self.rank, "step": trainer.step}

    def progress(self, cursor: int = 0) -> dict:
        return {
            "rank": self.rank,
            "step": self._step(),
            "idle_s": time.monotonic() - self.last_progress_s,
            "pending_fault": self._faults.pending if self._faults is not None else None,
            "manager_lost": bool(self.agent is not None and self.agent.manager_lost),
            "records": self.records[cursor:],
            "cursor": len(self.records),
        }

    def release_fault(self) -> None:
        if self._faults is not None:
            self._faults.release()

    def set_manager(self, manager) -> int:
        """The node's snapshot manager was replaced: snapshot into the new one from now on.
        Returns the first version sure to reach it (see SnapshotAgent.set_manager)."""
        if self.agent is None:
            return 0
        return self.agent.set_manager(manager)

    def stop(self) -> None:
        self._stop.set()

    # -- role rl_learner: the RL driver calls these on every rank, in the same order -------------

    def rl_warmup(self, num_steps: int) -> dict:
        """Supervised warm-up; every rank runs the same seeded steps, so all end identical."""
        result = self.trainer.warmup(num_steps, on_step=self._made_progress)
        self.last_progress_s = time.monotonic()
        return result

    def _made_progress(self) -> None:
        self.last_progress_s = time.monotonic()

    def rl_snapshot(self) -> int:
        """Snapshot the current version now and wait until the manager has it."""
        self.agent.snapshot(self.trainer.version)
        self.agent.flush()
        return self.trainer.version

    def rl_flush(self) -> int | None:
        """Wait until every snapshot taken so far reached the manager; the newest version."""
        if self.agent is None:
            return None
        self.agent.flush()
        return self.agent.last_version

    def rl_weights(self) -> tuple:
        return self.trainer.weights().as_tuple()

    @ray.method(num_returns=2)
    def rl_step(self, groups: list[dict], step: int) -> tuple[dict, tuple | None]:
        """Learner step `step` (version `step` -> `step + 1`) on the whole batch (this rank
        trains on its share); rank 0 also returns the new weights, the other ranks None.

        The driver queues the next step behind the running one, and this actor runs calls on
        several threads: a call waits for its version, so steps run one at a time, in order."""
        with self._step_turn:
            self._step_turn.wait_for(
                lambda: self.trainer.version >= step or self._stop.is_set(),
                timeout=self._group_timeout_s(),
            )
            if self.trainer.version != step:
                raise RuntimeError(
                    f"rank {self.rank} holds version {self.trainer.version}, asked for step {step}"
                )
            metrics, weights = self._rl_step(groups)
            self._step_turn.notify_all()
        return metrics, weights

    def _rl_step(self, groups: list[dict]) -> tuple[dict, tuple | None]:
        self.last_progress_s = time.monotonic()  # waiting for data is not a hang
        metrics = self.trainer.step(groups)
        if self.agent is not None:
            last = self.agent.last_version
            metrics["snapshot_published_version"] = -1 if last is None else last
            metrics["snapshot_blocking_s"] = self.agent.last_blocking_s
            metrics["snapshot_manager_lost"] = float(self.agent.manager_lost)
        weights = None
        if self.rank == 0:
            started = time.perf_counter()
            weights = self.trainer.weights().as_tuple()
            metrics["weights_pack_s"] = time.perf_counter() - started
        self.last_progress_s = time.monotonic()
        return metrics, weights

    def local_state_arrays(self) -> dict[str, np.ndarray]:
        """This rank's parameters and optimizer state as raw arrays (bf16 viewed as int16)."""
        arrays = {}
        state = self.trainer.state_dict()
        for name, tensor in state["model"].items():
            arrays[f"model/{name}"] = _raw(tensor)
        for name, entries in state["optim"].items():
            for key, tensor in entries.items():
                arrays[f"optim/{name}/{key}"] = _raw(tensor)
        return arrays

    def shutdown(self) -> None:
        if self.agent is not None:
            self.agent.close()
        offload = getattr(self.trainer, "offload", None)
        if offload is not None:
            offload.close()  # removes the rank's NVMe store now, not when the next engine starts
        parallel.destroy_process_group()


def _raw(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy().copy()

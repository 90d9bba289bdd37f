"""The in-trainer snapshotter: copies a rank's state into its node manager's memory off the hot path.

`SnapshotAgent` hooks into a `Trainer`. After step N completes (every `every_steps` steps) it
captures the small parts synchronously (JSON values; tiny tensors such as RNG states and the
optimizer's step counters are cloned), then a background thread copies the large tensors
(parameters, optimizer moments) into the shared-memory slot the manager hands out, while step
N+1's forward and backward run (they only read parameters). Step N+1's optimizer step waits for
that copy first, the CheckFreq rule: parameters may not change under a snapshot. The wait is the
only time the trainer blocks on a snapshot, and it is measured. On CPU the per-entry checksums
are computed piece by piece as the copy goes (each piece hashed while still in cache); on CUDA
the copy is a D2H copy on a side stream into the page-locked region, the optimizer step waits on
a CUDA event, not on the host, and the checksums follow the copy. Then the thread publishes the
version to the manager without holding up the trainer.

The manager is any object (or Ray actor handle) with:
  register(rank, total_bytes) -> [slot0_region_name, slot1_region_name]
  acquire(rank, version) -> slot index (the slot not holding the last committed version;
                                         may block while the previous version is encoded)
  publish(rank, version, slot, layout_json: str, checksums: list[int])

A failure in the background thread is raised by the next hook or `flush()`, never swallowed.
`load_snapshot` is the way back: views over a region's bytes, copied into the live trainer.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from stalwart.snapshot import shm
from stalwart.snapshot.state import (
    Layout,
    buffer_reader,
    checksums,
    copy_and_checksum,
    copy_into,
    layout_tree,
    read_verified,
    unflatten,
)

# Tensors this small are cloned at capture time: cloning costs nothing and frees the background
# copy from caring whether the owner mutates them (RNG states, optimizer step counters).
SMALL_TENSOR_BYTES = 64 * 1024


class SnapshotError(RuntimeError):
    """A snapshot failed in the background (copy, checksum or publish)."""


def call_manager(manager: Any, method: str, *args: Any) -> Any:
    """Call `method` on a plain object or a Ray actor handle (then wait for the result)."""
    function = getattr(manager, method)
    remote = getattr(function, "remote", None)
    if remote is not None:
        import ray

        return ray.get(remote(*args))
    return function(*args)


def _manager_is_gone(error: BaseException) -> bool:
    try:
        from ray.exceptions import ActorUnavailableError, RayActorError
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return isinstance(error, RayActorError | ActorUnavailableError)


@dataclass
class _Job:
    version: int
    tensors: list[tuple[str, torch.Tensor]] | None
    layout: Layout
    capture_s: float
    ready_event: Any = None  # CUDA event on the trainer's stream at capture time
    copied: Future = field(default_factory=Future)  # result: CUDA event or None
    published: Future | None = None


def _balanced_groups(indices_and_sizes: list[tuple[int, int]], num_groups: int) -> list[list[int]]:
    """Split entries into groups of about equal bytes (largest first onto the lightest group)."""
    groups: list[list[int]] = [[] for _ in range(num_groups)]
    loads = [0] * num_groups
    for index, size in sorted(indices_and_sizes, key=lambda item: -item[1]):
        lightest = loads.index(min(loads))
        groups[lightest].append(index)
        loads[lightest] += size
    return [sorted(group) for group in groups if group]


class SnapshotAgent:
    def __init__(
        self,
        trainer: Any,
        manager: Any,
        *,
        rank: int,
        every_steps: int,
        num_threads: int = 1,
        small_tensor_bytes: int = SMALL_TENSOR_BYTES,
    ):
        if not isinstance(every_steps, int) or every_steps < 1:
            raise ValueError(
                f"SnapshotAgent every_steps must be an int >= 1, got {every_steps!r} "
                "(snapshot.every_steps in the run config)"
            )
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"SnapshotAgent num_threads must be an int >= 1, got {num_threads!r}")
        self.trainer = trainer
        self.manager = manager
        self.rank = rank
        self.every_steps = every_steps
        self.num_threads = num_threads
        self.small_tensor_bytes = small_tensor_bytes

        self.num_snapshots = 0
        self.last_blocking_s = 0.0
        self.total_blocking_s = 0.0
        self.last_capture_s = 0.0
        self.last_wait_s = 0.0
        self.last_copy_s = 0.0
        self.last_publish_s = 0.0
        self.last_snapshot_bytes = 0
        self.last_version: int | None = None
        self._last_captured = -1  # newest version handed to the job thread
        self.manager_lost = False
        self.num_skipped = 0

        # One job thread keeps versions in order (acquire of N+1 after publish of N); copy and
        # checksum work may fan out over `num_threads` helpers.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stalwart-snapshot")
        self._helpers = (
            ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="stalwart-snapshot-copy")
            if num_threads > 1
            else None
        )
        self._lock = threading.Lock()
        self._pending_copy: _Job | None = None
        self._in_flight: list[_Job] = []
        self._regions: list[shm.Region] = []
        self._stream = None
        self._closed = False
        self._next_manager: Any = None  # a replacement manager, taken up by the job thread

        trainer.after_step_hooks.append(self._after_step)
        trainer.before_optimizer_hooks.append(self._before_optimizer)

    # -----------------------------------------------------------------------------------------
    # Trainer hooks (main thread)

    def _after_step(self, step: int) -> None:
        self._raise_background_errors()
        if step % self.every_steps:
            return
        if self._pending_copy is not None:  # only if hooks were driven out of order
            self._wait_for_copy()
        self.snapshot(step)

    def _before_optimizer(self, step: int) -> None:
        self._raise_background_errors()
        if self._pending_copy is not None:
            self._wait_for_copy()

    # -----------------------------------------------------------------------------------------

    def snapshot(self, version: int) -> None:
        """Capture now, copy in the background; the next optimizer step (or flush) waits for it."""
        if self._closed:
            raise SnapshotError("this SnapshotAgent is closed")
        started = time.perf_counter()
        state = self.trainer.state_dict()
        tensors, layout = layout_tree(
            state,
            extra={
                "version": version,
                "rank": self.rank,
                "world_size": getattr(self.trainer, "world_size", 1),
            },
        )
        captured = []
        for name, tensor in tensors:
            tensor = tensor.detach()
            if tensor.numel() * tensor.element_size() <= self.small_tensor_bytes:
                tensor = tensor.clone()
            captured.append((name, tensor))
        ready_event = None
        cuda_device = next((tensor.device for _, tensor in captured if tensor.is_cuda), None)
        if cuda_device is not None:
            # Recorded after the clones: the side stream must see them, and every kernel of step N.
            ready_event = torch.cuda.Event()
            ready_event.record(torch.cuda.current_stream(cuda_device))
        job = _Job(
            version=version,
            tensors=captured,
            layout=layout,
            capture_s=time.perf_counter() - started,
            ready_event=ready_event,
        )
        with self._lock:  # with set_manager: a job submitted after it sees the new manager
            self._last_captured = version
            job.published = self._executor.submit(self._run, job)
            self._in_flight.append(job)
        self._pending_copy = job

    def wait_for_copy(self) -> None:
        """Wait for the pending snapshot's copy (what the next optimizer step waits for) and
        count it as blocking time; its checksums and publish may still run after."""
        self._raise_background_errors()
        if self._pending_copy is not None:
            self._wait_for_copy()

    def pause(self) -> None:
        """Take no snapshots until `resume()`: unhook from the trainer (after the pending
        copy, which must finish before parameters change)."""
        self.wait_for_copy()
        for hooks, hook in self._hooks():
            if hook in hooks:
                hooks.remove(hook)

    def resume(self) -> None:
        for hooks, hook in self._hooks():
            if hook not in hooks:
                hooks.append(hook)

    def _hooks(self) -> list[tuple[list, Any]]:
        return [
            (self.trainer.after_step_hooks, self._after_step),
            (self.trainer.before_optimizer_hooks, self._before_optimizer),
        ]

    def _wait_for_copy(self) -> None:
        job, self._pending_copy = self._pending_copy, None
        started = time.perf_counter()
        try:
            done_event = job.copied.result()
        except BaseException as error:
            self._forget(job)
            raise SnapshotError(
                f"snapshot of step {job.version} failed while copying: {error}"
            ) from error
        if done_event is not None:
            # The optimizer's kernels wait for the D2H copy on the GPU; the host does not.
            torch.cuda.current_stream(job.ready_event.device).wait_event(done_event)
        self.last_wait_s = time.perf_counter() - started
        self.last_capture_s = job.capture_s
        self.last_blocking_s = job.capture_s + self.last_wait_s
        self.total_blocking_s += self.last_blocking_s

    def _forget(self, job: _Job) -> None:
        with self._lock:
            if job in self._in_flight:
                self._in_flight.remove(job)

    def _raise_background_errors(self) -> None:
        with self._lock:
            finished = [job for job in self._in_flight if job.published.done()]
            for job in finished:
                self._in_flight.remove(job)
        failed = [job for job in finished if job.published.exception() is not None]
        if not failed:
            return
        if self._pending_copy in failed:
            self._pending_copy = None
        first = failed[0]
        error = first.published.exception()
        later = f" (and {len(failed) - 1} later snapshots failed too)" if len(failed) > 1 else ""
        raise SnapshotError(f"snapshot of step {first.version} failed: {error}{later}") from error

    def flush(self) -> None:
        """Wait until every snapshot taken so far is copied and published; raise any failure."""
        if self._pending_copy is not None:
            self._wait_for_copy()
        while True:
            with self._lock:
                if not self._in_flight:
                    return
                job = self._in_flight[0]
            try:
                job.published.result()
            except BaseException:
                pass  # raised below with the step it belongs to
            self._raise_background_errors()

    def close(self) -> None:
        """Flush, unhook from the trainer, stop the threads and unmap the regions (never unlinks)."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            for hooks, hook in self._hooks():
                if hook in hooks:
                    hooks.remove(hook)
            self._executor.shutdown(wait=True)
            if self._helpers is not None:
                self._helpers.shutdown(wait=True)
            for region in self._regions:
                region.close()
            self._regions = []

    def __enter__(self) -> SnapshotAgent:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def metrics(self) -> dict[str, float]:
        return {
            "snapshot/num_snapshots": float(self.num_snapshots),
            "snapshot/last_blocking_s": self.last_blocking_s,
            "snapshot/total_blocking_s": self.total_blocking_s,
            "snapshot/last_capture_s": self.last_capture_s,
            "snapshot/last_wait_s": self.last_wait_s,
            "snapshot/last_copy_s": self.last_copy_s,
            "snapshot/last_publish_s": self.last_publish_s,
            "snapshot/last_bytes": float(self.last_snapshot_bytes),
            "snapshot/num_skipped": float(self.num_skipped),
        }

    # -----------------------------------------------------------------------------------------
    # Background thread

    def _ensure_regions(self, total_bytes: int, register_cuda: bool) -> None:
        if self._regions and all(region.nbytes >= total_bytes for region in self._regions):
            return
        # First snapshot, or the state grew (e.g. optimizer moments appeared): the manager
        # hands out slots of the new size.
        names = list(call_manager(self.manager, "register", self.rank, total_bytes))
        if len(names) != 2:
            raise SnapshotError(f"manager.register returned {len(names)} region names, expected 2")
        for region in self._regions:
            region.close()
        self._regions = [shm.attach_region(name, register_cuda=register_cuda) for name in names]
        for region in self._regions:
            if region.nbytes < total_bytes:
                raise SnapshotError(
                    f"manager region {region.name!r} holds {region.nbytes} bytes, the snapshot "
                    f"needs {total_bytes}"
                )

    def _map(self, function, layout: Layout, *arguments) -> list:
        """Run `function(sub_layout, indices, *arguments)` over byte-balanced entry groups."""
        indices = list(range(len(layout.entries)))
        if self._helpers is None or len(indices) < 2:
            return [(indices, function(layout, indices, *arguments))]
        groups = _balanced_groups(
            [(index, layout.entries[index].nbytes) for index in indices], self.num_threads
        )
        futures = [
            self._helpers.submit(
                function,
                Layout([layout.entries[i] for i in group], layout.total_bytes, layout.extra),
                group,
                *arguments,
            )
            for group in groups
        ]
        return [(group, future.result()) for group, future in zip(groups, futures)]

    def _per_entry(self, function, layout: Layout) -> list:
        """`_map` of a function returning one value per entry of its sub-layout, gathered
        back into layout order."""
        values = [None] * len(layout.entries)
        for group, group_values in self._map(function, layout):
            for index, value in zip(group, group_values):
                values[index] = value
        return values

    def set_manager(self, manager: Any) -> int:
        """Snapshot into a replacement manager from the next version on.

        Safe to call from any thread while training runs: the job thread, which handles
        versions in order, switches over before its next version (and registers new slots),
        so no copy is cut short and the trainer never waits for the switch. Returns the first
        version that is sure to reach the new manager: every version captured after this call
        (one captured before may or may not).
        """
        with self._lock:
            self._next_manager = manager
            return self._last_captured + 1

    def _switch_manager(self) -> None:
        with self._lock:
            manager, self._next_manager = self._next_manager, None
        if manager is None:
            return
        for region in self._regions:
            region.close()
        self._regions = []
        self.manager = manager
        self.manager_lost = False

    def _run(self, job: _Job) -> None:
        self._switch_manager()
        if self.manager_lost:
            # The node's manager died; the controller is starting a replacement. Training goes
            # on; the versions in between are simply not snapshotted here.
            job.tensors = None
            self.num_skipped += 1
            job.copied.set_result(None)
            return
        try:
            self._run_with_manager(job)
        except BaseException as error:
            if not _manager_is_gone(error):
                raise
            self.manager_lost = True
            self.num_skipped += 1
            job.tensors = None
            if not job.copied.done():
                job.copied.set_result(None)

    def _run_with_manager(self, job: _Job) -> None:
        layout = job.layout
        try:
            self._ensure_regions(layout.total_bytes, register_cuda=job.ready_event is not None)
            slot = int(call_manager(self.manager, "acquire", self.rank, job.version))
            if slot not in (0, 1):
                raise SnapshotError(f"manager.acquire returned slot {slot!r}, expected 0 or 1")
            region = self._regions[slot]
            copy_started = time.perf_counter()
            done_event = None
            if job.ready_event is not None:
                if self._stream is None:
                    self._stream = torch.cuda.Stream(device=job.ready_event.device)
                done_event = copy_into(
                    job.tensors,
                    layout,
                    region.array,
                    stream=self._stream,
                    ready_event=job.ready_event,
                    pinned=region.cuda_registered,
                )
            else:
                # CPU: each piece is hashed as it is copied (one pass over the bytes).
                tensors = job.tensors
                fused_sums = self._per_entry(
                    lambda sub, indices: copy_and_checksum(
                        [tensors[i] for i in indices], sub, region.array
                    ),
                    layout,
                )
        except BaseException as error:
            job.tensors = None
            if not _manager_is_gone(error):  # a lost manager is handled by the caller
                job.copied.set_exception(error)
            raise
        job.copied.set_result(done_event)
        if done_event is not None:
            done_event.synchronize()
        # Only now: a CUDA clone freed earlier could be reused while the side stream still reads it.
        job.tensors = None
        self.last_copy_s = time.perf_counter() - copy_started

        publish_started = time.perf_counter()
        if done_event is None:
            sums = fused_sums
        else:
            sums = self._per_entry(lambda sub, indices: checksums(sub, region.array), layout)
        call_manager(self.manager, "publish", self.rank, job.version, slot, layout.to_json(), sums)
        self.last_publish_s = time.perf_counter() - publish_started
        self.last_snapshot_bytes = layout.total_bytes
        self.last_version = job.version
        self.num_snapshots += 1


def load_snapshot(
    trainer: Any,
    region_buffer: Any,
    layout_json: str | dict | Layout,
    checksums: list[int] | None = None,
) -> None:
    """Restore `trainer` from a snapshot region: views over its bytes, copied in by load_state_dict.

    With `checksums` every entry is verified (SnapshotCorruptError names a bad one) in the same
    pass that copies it (`state.read_verified`): a trainer with `restore_targets()` gets each
    entry written straight into its live tensor. A restore that fails verification may have
    written part of the snapshot into those tensors: restore again from another copy.
    Without checksums, small tensors (RNG states, step counters) are cloned rather than viewed.
    """
    layout = Layout.coerce(layout_json)
    if checksums is None:
        state = unflatten(layout, None, region_buffer, clone_below_bytes=SMALL_TENSOR_BYTES)
    else:
        state = read_verified(
            layout,
            buffer_reader(region_buffer, layout.total_bytes),
            checksums,
            restore_targets(trainer, layout),
        )
    trainer.load_state_dict(state)


def restore_targets(trainer: Any, layout: Layout) -> dict | None:
    """The trainer's live tensors for `layout`'s entries (`Trainer.restore_targets`), if it
    offers them."""
    targets = getattr(trainer, "restore_targets", None)
    return targets(layout.entries) if targets is not None else None

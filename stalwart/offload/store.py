"""Tensor store on NVMe (or host memory) and the budgeted pool of host buffers that feeds it.

`HostBufferPool` hands out page-aligned host buffers of exact (4 KiB-rounded) sizes and counts
every byte it holds, in use or cached for reuse, against a hard budget. Nothing is rounded to
a power of two (torch's pinned allocator does that, up to 1.8x). A blocking `acquire` waits for
buffers to come back (write-backs finishing); `try_acquire` is for prefetching and keeps a
reserve so that prefetches can never starve the buffer the compute is waiting for. On CUDA
hosts buffers are registered with `cudaHostRegister` (pinned) when `pin_memory` is set.

`TensorStore` gives every named tensor a 4 KiB-aligned region in one preallocated file (or in
a host-memory arena for `offload.device: cpu`) and moves bytes between regions and buffers
with futures; it counts the bytes it reads and writes. Transfers that touch the same bytes run
in the order they were asked for (a read after a write sees the write, a write after a read
does not change what the read sees, two writes land in order), whatever the back-end's threads
do: a transfer that must wait is started by a small dispatcher thread once the earlier ones
finished, so neither the caller nor the I/O threads block.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from stalwart.offload.aio import ALIGNMENT_BYTES, AioBackend, OpenFile, align_up

logger = logging.getLogger(__name__)

GIB = 1 << 30


class BudgetExceededError(MemoryError):
    """A buffer could not be had within the host memory budget."""


@dataclass
class HostBuffer:
    """One host buffer from the pool; `tensor` is a uint8 view of exactly `num_bytes`."""

    tensor: torch.Tensor
    num_bytes: int
    pool: HostBufferPool | None = None

    def view(self, dtype: torch.dtype, offset: int, numel: int, shape) -> torch.Tensor:
        size = numel * dtype.itemsize
        return self.tensor[offset : offset + size].view(dtype).view(shape)

    def release(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            pool.release(self)


class HostBufferPool:
    """Host buffers within a hard byte budget; freed buffers are cached by size for reuse."""

    def __init__(self, aio: AioBackend, budget_bytes: int, *, pin_memory: bool = False):
        self.aio = aio
        self.budget_bytes = int(budget_bytes)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.used_bytes = 0  # in use + cached
        self.peak_bytes = 0
        self._cached: dict[int, list[torch.Tensor]] = {}
        self._cached_bytes = 0
        self._condition = threading.Condition()
        # Called with the size before the pool maps a new buffer (the owner can make room).
        self.before_growth: Callable[[int], None] | None = None

    # -- allocation -------------------------------------------------------------------------

    def _new_tensor(self, num_bytes: int) -> torch.Tensor:
        tensor = self.aio.allocate(num_bytes)
        if self.pin_memory:
            result = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.nbytes, 0)
            if int(result) != 0:
                logger.warning("cudaHostRegister failed (%s); buffer stays pageable", result)
        return tensor

    def _drop_tensor(self, tensor: torch.Tensor) -> None:
        if self.pin_memory:
            torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
        self.aio.free(tensor)

    def _evict_cached(self, needed_bytes: int) -> None:
        """Free cached buffers of other sizes until `needed_bytes` more fit in the budget."""
        for size in sorted(self._cached, reverse=True):
            while self._cached[size] and self.used_bytes + needed_bytes > self.budget_bytes:
                self._drop_tensor(self._cached[size].pop())
                self._cached_bytes -= size
                self.used_bytes -= size

    def _take(self, num_bytes: int, reserve_bytes: int) -> HostBuffer | None:
        size = align_up(max(num_bytes, 1))
        # Cached buffers can always be evicted, so what must stay obtainable is budget - in use.
        if self.in_use_bytes + size + reserve_bytes > self.budget_bytes:
            return None
        cached = self._cached.get(size)
        if cached:
            tensor = cached.pop()
            self._cached_bytes -= size
            return HostBuffer(tensor, size, self)
        if self.used_bytes + size > self.budget_bytes:
            self._evict_cached(size)
        if self.used_bytes + size > self.budget_bytes:
            return None
        if self.before_growth is not None:
            self.before_growth(size)
        self.used_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        return HostBuffer(self._new_tensor(size), size, self)

    def try_acquire(self, num_bytes: int, reserve_bytes: int = 0) -> HostBuffer | None:
        """A buffer now if it fits with `reserve_bytes` to spare, else None (for prefetch)."""
        with self._condition:
            return self._take(num_bytes, reserve_bytes)

    def acquire(self, num_bytes: int, timeout_s: float = 600.0) -> HostBuffer:
        """A buffer, waiting for others to be released if the budget is full."""
        size = align_up(max(num_bytes, 1))
        if size > self.budget_bytes:
            raise BudgetExceededError(
                f"a {size / GIB:.3f} GiB buffer cannot fit the {self.budget_bytes / GIB:.3f} GiB "
                "host buffer budget; raise offload.max_host_memory_gb"
            )
        with self._condition:
            buffer = self._take(size, 0)
            if buffer is None:
                if not self._condition.wait_for(lambda: self._can_fit(size), timeout=timeout_s):
                    raise BudgetExceededError(
                        f"waited {timeout_s:.0f} s for {size / GIB:.3f} GiB of host buffers "
                        f"({self.used_bytes / GIB:.3f} of {self.budget_bytes / GIB:.3f} GiB in use)"
                    )
                buffer = self._take(size, 0)
            assert buffer is not None
            return buffer

    def _can_fit(self, size: int) -> bool:
        return self.in_use_bytes + size <= self.budget_bytes

    def release(self, buffer: HostBuffer) -> None:
        with self._condition:
            self._cached.setdefault(buffer.num_bytes, []).append(buffer.tensor)
            self._cached_bytes += buffer.num_bytes
            buffer.tensor = None  # type: ignore[assignment]
            self._condition.notify_all()

    def shrink(self) -> None:
        """Return every cached buffer to the OS."""
        with self._condition:
            self._evict_cached(self.budget_bytes + 1)

    @property
    def in_use_bytes(self) -> int:
        return self.used_bytes - self._cached_bytes

    def close(self) -> None:
        self.shrink()


@dataclass(frozen=True)
class Region:
    """A tensor's place in the store: byte offset, exact size, and the aligned span it owns."""

    offset: int
    num_bytes: int

    @property
    def padded_bytes(self) -> int:
        return align_up(self.num_bytes)


class TensorStore:
    """Byte regions in one file (`nvme`) or one host arena (`cpu`), moved with futures."""

    def __init__(self, aio: AioBackend, *, device: str, directory: str | None, name: str = "state"):
        if device not in ("nvme", "cpu"):
            raise ValueError(f"TensorStore device must be 'nvme' or 'cpu', got {device!r}")
        self.aio = aio
        self.device = device
        self.directory = directory
        self.capacity_bytes = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self._counter_lock = threading.Lock()
        self._file: OpenFile | None = None
        self._arena: torch.Tensor | None = None
        # (start, end, is_write, future) of transfers not known to be finished, in order.
        self._in_flight: list[tuple[int, int, bool, Future]] = []
        self._order_lock = threading.Lock()
        self._dispatcher: ThreadPoolExecutor | None = None
        if device == "nvme":
            assert directory is not None
            self.path = os.path.join(directory, f"{name}.bin")
        else:
            self.path = None

    # -- layout -----------------------------------------------------------------------------

    def reserve(self, num_bytes: int) -> Region:
        region = Region(self.capacity_bytes, num_bytes)
        self.capacity_bytes += align_up(max(num_bytes, 1))
        return region

    def open(self) -> None:
        """Create the backing file (or arena) at its full size; fails early if the disk is full."""
        if self.device == "cpu":
            self._arena = torch.zeros(self.capacity_bytes, dtype=torch.uint8)
            return
        check_free_space(self.directory, self.capacity_bytes)
        self._file = OpenFile(self.path)
        try:
            os.posix_fallocate(self._file.fd, 0, max(self.capacity_bytes, ALIGNMENT_BYTES))
        except OSError as error:
            self.close()
            raise ValueError(
                f"offload.nvme_path={self.directory!r}: cannot allocate {self.capacity_bytes / GIB:.2f} GiB "
                f"for the offloaded state ({error.strerror}); free space or choose another path"
            ) from None

    # -- asynchronous transfers ----------------------------------------------------------------

    def read(self, region: Region, buffer: HostBuffer, buffer_offset: int = 0) -> Future:
        target = buffer.tensor[buffer_offset : buffer_offset + region.padded_bytes]
        self._count(read=region.padded_bytes)
        if self._arena is not None:
            return _done(
                lambda: target.copy_(
                    self._arena[region.offset : region.offset + region.padded_bytes]
                )
            )
        return self._ordered(
            region, False, lambda: self.aio.read(self._file, region.offset, target)
        )

    def write(self, region: Region, buffer: HostBuffer, buffer_offset: int = 0) -> Future:
        source = buffer.tensor[buffer_offset : buffer_offset + region.padded_bytes]
        self._count(written=region.padded_bytes)
        if self._arena is not None:
            return _done(
                lambda: self._arena[region.offset : region.offset + region.padded_bytes].copy_(
                    source
                )
            )
        return self._ordered(
            region, True, lambda: self.aio.write(self._file, region.offset, source)
        )

    def _ordered(self, region: Region, is_write: bool, start) -> Future:
        """Start the transfer `start()` once every earlier unfinished transfer that conflicts
        with it (overlapping bytes, at least one of the two a write) has finished."""
        begin, end = region.offset, region.offset + region.padded_bytes
        with self._order_lock:
            self._in_flight = [entry for entry in self._in_flight if not entry[3].done()]
            earlier = [
                future
                for first, last, writes, future in self._in_flight
                if first < end and begin < last and (writes or is_write)
            ]
            if not earlier:
                future = start()
            else:
                if self._dispatcher is None:
                    self._dispatcher = ThreadPoolExecutor(
                        max_workers=1, thread_name_prefix="stalwart-store-order"
                    )
                future = Future()
                _start_after(earlier, start, future, self._dispatcher)
            self._in_flight.append((begin, end, is_write, future))
        return future

    def read_span(self, offset: int, num_bytes: int, buffer: HostBuffer) -> Future:
        """Read several adjacent regions at once (`num_bytes` a multiple of 4 KiB)."""
        return self.read(Region(offset, num_bytes), buffer)

    def write_span(self, offset: int, num_bytes: int, buffer: HostBuffer) -> Future:
        return self.write(Region(offset, num_bytes), buffer)

    # -- synchronous access at arbitrary offsets (checkpoint streaming) --------------------------

    def pread(self, offset: int, target: memoryview) -> None:
        """Copy bytes at `offset` into `target` (any alignment), bypassing the buffer pool."""
        if self._arena is not None:
            source = self._arena[offset : offset + len(target)].numpy()
            memoryview(target).cast("B")[:] = source.tobytes()
            return
        with open(self.path, "rb", buffering=0) as handle:
            done = 0
            while done < len(target):
                moved = os.preadv(handle.fileno(), [target[done:]], offset + done)
                if moved <= 0:
                    raise OSError(f"short read from {self.path} at {offset + done}")
                done += moved
            os.posix_fadvise(handle.fileno(), offset, len(target), os.POSIX_FADV_DONTNEED)

    def pwrite(self, offset: int, source: memoryview) -> None:
        if self._arena is not None:
            data = torch.frombuffer(bytearray(source), dtype=torch.uint8)
            self._arena[offset : offset + len(source)].copy_(data)
            return
        with open(self.path, "r+b", buffering=0) as handle:
            done = 0
            while done < len(source):
                done += os.pwritev(handle.fileno(), [source[done:]], offset + done)
            os.fsync(handle.fileno())
            os.posix_fadvise(handle.fileno(), offset, len(source), os.POSIX_FADV_DONTNEED)

    def _count(self, read: int = 0, written: int = 0) -> None:
        with self._counter_lock:
            self.bytes_read += read
            self.bytes_written += written

    def close(self, remove: bool = False) -> None:
        with self._order_lock:
            pending = [entry[3] for entry in self._in_flight]
            self._in_flight = []
        for future in pending:  # nothing may touch the file once it is closed
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - its owner sees the error
                pass
        if self._dispatcher is not None:
            self._dispatcher.shutdown(wait=True)
            self._dispatcher = None
        if self._file is not None:
            self._file.close()
            self._file = None
            if remove and self.path and os.path.exists(self.path):
                os.remove(self.path)
        self._arena = None


def _start_after(earlier: list[Future], start, future: Future, dispatcher) -> None:
    """Run `start()` on `dispatcher` when every future in `earlier` is done (failed or not: the
    failure belongs to its own caller) and pass its outcome on to `future`."""
    remaining = [len(earlier)]
    lock = threading.Lock()

    def launch() -> None:
        try:
            inner = start()
        except BaseException as error:  # noqa: BLE001 - delivered through the future
            future.set_exception(error)
            return
        inner.add_done_callback(lambda done: _pass_on(done, future))

    def one_done(_done_future: Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            dispatcher.submit(launch)

    for earlier_future in earlier:
        earlier_future.add_done_callback(one_done)


def _pass_on(source: Future, target: Future) -> None:
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())


def completed_future() -> Future:
    """A future that is already done (for a transfer that had nothing to move)."""
    future: Future = Future()
    future.set_result(None)
    return future


def _done(action) -> Future:
    """Run `action` now; its outcome, result or exception, as a completed future."""
    try:
        action()
    except BaseException as error:  # noqa: BLE001 - delivered through the future
        future: Future = Future()
        future.set_exception(error)
        return future
    return completed_future()


def check_nvme_path(path: str | None) -> str:
    """The NVMe directory as an absolute path; a clear error when it is unusable.

    A missing directory is an error rather than created: a typo or an unmounted drive would
    otherwise put the offloaded state on whatever disk holds the parent.
    """
    if not path:
        raise ValueError(
            "offload.nvme_path is not set; point it at a directory on a fast local SSD"
        )
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise ValueError(
            f"offload.nvme_path={path!r} does not exist; create the directory (on a fast local "
            "SSD) or fix the path"
        )
    if not os.path.isdir(path):
        raise ValueError(f"offload.nvme_path={path!r} is a file, not a directory")
    probe = os.path.join(path, f".stalwart-probe-{os.getpid()}")
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * ALIGNMENT_BYTES)
        os.remove(probe)
    except OSError as error:
        raise ValueError(
            f"offload.nvme_path={path!r} is not writable ({error.strerror}); choose a writable directory"
        ) from None
    return path


def check_free_space(directory: str, needed_bytes: int) -> None:
    free_bytes = shutil.disk_usage(directory).free
    if free_bytes < needed_bytes:
        raise ValueError(
            f"offload.nvme_path={directory!r} has {free_bytes / GIB:.2f} GiB free but the offloaded "
            f"state needs {needed_bytes / GIB:.2f} GiB; free space or choose a bigger disk"
        )

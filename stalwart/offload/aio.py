"""Asynchronous block I/O on files: one interface, two back-ends, bandwidth measurement.

`make_aio(aio_config)` returns DeepSpeed's libaio op (`AsyncIOBuilder`) when it builds and
page-locked buffers can be had, else a thread pool on `os.preadv`/`os.pwritev`. Both read and
write whole page-aligned host buffers at 4 KiB-aligned file offsets with O_DIRECT, so what we
measure and what we move is the device, not the page cache, and the page cache never grows
the process's memory footprint. Requests are split into `block_size` pieces and at most
`queue_depth` pieces are in flight (DeepSpeed's aio key names).

Buffers come from the back-end (`allocate`) because libaio wants page-locked memory it owns;
the thread pool hands out page-aligned anonymous mappings, returned to the OS on `free`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import resource
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from stalwart.offload.ops import load_op

logger = logging.getLogger(__name__)

ALIGNMENT_BYTES = 4096
_CAP_IPC_LOCK_BIT = 14


def align_up(num_bytes: int, alignment: int = ALIGNMENT_BYTES) -> int:
    return (num_bytes + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class AioSettings:
    """DeepSpeed's `aio` keys that matter here (block_size, queue_depth, thread_count)."""

    block_size: int = 1 << 20
    queue_depth: int = 8
    thread_count: int = 1
    single_submit: bool = False
    overlap_events: bool = True

    @classmethod
    def from_config(cls, aio_config) -> AioSettings:
        if aio_config is None:
            return cls()
        settings = cls(
            block_size=int(aio_config.block_size),
            queue_depth=int(aio_config.queue_depth),
            thread_count=int(aio_config.thread_count),
            single_submit=bool(getattr(aio_config, "single_submit", False)),
            overlap_events=bool(getattr(aio_config, "overlap_events", True)),
        )
        if settings.block_size % ALIGNMENT_BYTES:
            raise ValueError(
                f"offload.aio.block_size={settings.block_size} must be a multiple of "
                f"{ALIGNMENT_BYTES} (direct I/O works in whole pages); try {align_up(settings.block_size)}"
            )
        return settings


class OpenFile:
    """A file opened for direct I/O (falls back to buffered I/O where O_DIRECT is refused)."""

    def __init__(self, path: str):
        self.path = path
        self.direct = True
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            # tmpfs and some network file systems refuse O_DIRECT; correctness is unaffected.
            logger.info("O_DIRECT not supported for %s; using buffered I/O", path)
            self.direct = False
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class AioBackend(Protocol):
    name: str
    settings: AioSettings

    def allocate(self, num_bytes: int) -> torch.Tensor: ...

    def free(self, buffer: torch.Tensor) -> None: ...

    def read(self, file: OpenFile, offset: int, buffer: torch.Tensor) -> Future: ...

    def write(self, file: OpenFile, offset: int, buffer: torch.Tensor) -> Future: ...

    def close(self) -> None: ...


def _check_request(offset: int, buffer: torch.Tensor) -> None:
    if offset % ALIGNMENT_BYTES or buffer.nbytes % ALIGNMENT_BYTES:
        raise ValueError(
            f"direct I/O needs {ALIGNMENT_BYTES}-byte aligned offsets and sizes "
            f"(got offset {offset}, {buffer.nbytes} bytes)"
        )
    if buffer.data_ptr() % ALIGNMENT_BYTES:
        raise ValueError("direct I/O buffer is not page aligned; allocate it with backend.allocate")


class _Gather:
    """Completes one request's future when all of its block-sized pieces have completed."""

    def __init__(self, future: Future, num_pieces: int):
        self.future = future
        self.remaining = num_pieces
        self.lock = threading.Lock()

    def piece_done(self, error: BaseException | None) -> None:
        with self.lock:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
                return
            self.remaining -= 1
            if self.remaining == 0:
                self.future.set_result(None)


class ThreadPoolAio:
    """Block I/O on a pool of `thread_count` threads using positional vectored reads/writes."""

    name = "threadpool"

    def __init__(self, settings: AioSettings):
        self.settings = settings
        self._executor = ThreadPoolExecutor(
            max_workers=max(settings.thread_count, 1), thread_name_prefix="stalwart-aio"
        )
        self._in_flight = threading.BoundedSemaphore(settings.queue_depth)
        self._mappings: dict[int, mmap.mmap] = {}
        self._mapping_lock = threading.Lock()

    def allocate(self, num_bytes: int) -> torch.Tensor:
        size = align_up(max(num_bytes, 1))
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        tensor = torch.frombuffer(mapping, dtype=torch.uint8)
        with self._mapping_lock:
            self._mappings[tensor.data_ptr()] = mapping
        return tensor

    def free(self, buffer: torch.Tensor) -> None:
        with self._mapping_lock:
            mapping = self._mappings.pop(buffer.data_ptr(), None)
        if mapping is not None:
            del buffer
            try:
                mapping.close()
            except BufferError:
                # A view of the buffer is still alive somewhere; the mapping is released
                # when that view dies.
                pass

    def _submit(self, file: OpenFile, offset: int, buffer: torch.Tensor, is_read: bool) -> Future:
        _check_request(offset, buffer)
        future: Future = Future()
        view = memoryview(buffer.numpy()).cast("B")
        block = self.settings.block_size
        starts = list(range(0, buffer.nbytes, block)) or [0]
        gather = _Gather(future, len(starts))
        if buffer.nbytes == 0:
            future.set_result(None)
            return future
        for start in starts:
            piece = view[start : start + block]
            self._in_flight.acquire()
            task = self._executor.submit(_move_piece, file.fd, offset + start, piece, is_read)
            task.add_done_callback(lambda t, g=gather: self._piece_finished(t, g))
        return future

    def _piece_finished(self, task: Future, gather: _Gather) -> None:
        self._in_flight.release()
        gather.piece_done(task.exception())

    def read(self, file: OpenFile, offset: int, buffer: torch.Tensor) -> Future:
        return self._submit(file, offset, buffer, is_read=True)

    def write(self, file: OpenFile, offset: int, buffer: torch.Tensor) -> Future:
        return self._submit(file, offset, buffer, is_read=False)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _move_piece(fd: int, offset: int, piece: memoryview, is_read: bool) -> None:
    done = 0
    total = len(piece)
    while done < total:
        part = piece[done:]
        moved = (
            os.preadv(fd, [part], offset + done)
            if is_read
            else os.pwritev(fd, [part], offset + done)
        )
        if moved <= 0:
            if is_read:
                # Reading past the end of a sparse/short file: the region was never written.
                piece[done:] = b"\0" * (total - done)
                return
            raise OSError(errno.EIO, f"write of {total} bytes at offset {offset} made no progress")
        done += moved


class LibAio:
    """DeepSpeed's libaio op: one handle for reads and one for writes, each driven by a thread."""

    name = "libaio"

    def __init__(self, settings: AioSettings, aio_module):
        self.settings = settings

        def new_handle():
            return aio_module.aio_handle(
                settings.block_size,
                settings.queue_depth,
                settings.single_submit,
                settings.overlap_events,
                settings.thread_count,
            )

        self._read_handle = new_handle()
        self._write_handle = new_handle()
        self._buffer_handle = self._read_handle
        # DeepSpeed's handle waits for all its outstanding ops at once; one op at a time per
        # handle (each parallelised inside over `thread_count` threads) gives per-request futures.
        self._read_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stalwart-aio-r")
        self._write_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="stalwart-aio-w"
        )
        self._example = torch.empty(0, dtype=torch.uint8)

    def allocate(self, num_bytes: int) -> torch.Tensor:
        size = align_up(max(num_bytes, 1))
        tensor = self._buffer_handle.new_cpu_locked_tensor(size, self._example)
        if tensor.data_ptr() == 0:
            raise MemoryError(
                f"could not page-lock {size} bytes for libaio (raise `ulimit -l` or run with "
                "CAP_IPC_LOCK, or set offload.aio.thread_count and let the thread pool be used)"
            )
        return tensor.view(torch.uint8)

    def free(self, buffer: torch.Tensor) -> None:
        self._buffer_handle.free_cpu_locked_tensor(buffer)

    def read(self, file: OpenFile, offset: int, buffer: torch.Tensor) -> Future:
        _check_request(offset, buffer)

        def run():
            if self._read_handle.sync_pread(buffer, file.path, offset) < 0:
                raise OSError(
                    errno.EIO,
                    f"libaio read of {buffer.nbytes} bytes at {offset} in {file.path} failed",
                )

        return self._read_executor.submit(run)

    def write(self, file: OpenFile, offset: int, buffer: torch.Tensor) -> Future:
        _check_request(offset, buffer)

        def run():
            if self._write_handle.sync_pwrite(buffer, file.path, offset) < 0:
                raise OSError(
                    errno.EIO,
                    f"libaio write of {buffer.nbytes} bytes at {offset} in {file.path} failed",
                )

        return self._write_executor.submit(run)

    def close(self) -> None:
        self._read_executor.shutdown(wait=True)
        self._write_executor.shutdown(wait=True)


def _can_lock_memory(num_bytes: int) -> bool:
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft_limit == resource.RLIM_INFINITY or soft_limit >= num_bytes:
        return True
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK_BIT & 1)
    except OSError:
        pass
    return False


_LIBAIO_MODULE = None
_LIBAIO_FAILURE: str | None = None


def load_libaio_module():
    """DeepSpeed's compiled aio op, or None (the reason is logged once)."""
    global _LIBAIO_MODULE, _LIBAIO_FAILURE
    if _LIBAIO_MODULE is not None or _LIBAIO_FAILURE is not None:
        return _LIBAIO_MODULE
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        from deepspeed.ops.op_builder import AsyncIOBuilder

        builder = AsyncIOBuilder()
        if not builder.is_compatible(verbose=False):
            raise RuntimeError(
                "AsyncIOBuilder reports libaio is not usable (is libaio-dev installed?)"
            )
        _LIBAIO_MODULE = load_op(builder)
    except Exception as error:  # any build/import failure degrades to the thread pool
        _LIBAIO_FAILURE = f"{type(error).__name__}: {error}"
        logger.warning(
            "DeepSpeed libaio op unavailable (%s); using the thread-pool back-end", _LIBAIO_FAILURE
        )
    return _LIBAIO_MODULE


def libaio_unavailable_reason() -> str | None:
    load_libaio_module()
    return _LIBAIO_FAILURE


def make_aio(aio_config=None, *, backend: str = "auto", lockable_bytes: int = 0) -> AioBackend:
    """The libaio back-end when it builds and `lockable_bytes` can be page-locked, else threads.

    `backend` forces one ("libaio" raises if it cannot be had, "threadpool" never tries libaio).
    """
    settings = (
        aio_config if isinstance(aio_config, AioSettings) else AioSettings.from_config(aio_config)
    )
    if backend not in ("auto", "libaio", "threadpool"):
        raise ValueError(f"aio backend {backend!r} is not one of auto, libaio, threadpool")
    if backend == "threadpool":
        return ThreadPoolAio(settings)
    module = load_libaio_module()
    if module is not None and _can_lock_memory(lockable_bytes):
        return LibAio(settings, module)
    if backend == "libaio":
        reason = _LIBAIO_FAILURE or f"cannot page-lock {lockable_bytes} bytes (ulimit -l too small)"
        raise RuntimeError(f"libaio back-end unavailable: {reason}")
    if module is not None:
        logger.warning(
            "page-locked memory limit too small for %d bytes of libaio buffers; using the thread pool",
            lockable_bytes,
        )
    return ThreadPoolAio(settings)


@dataclass(frozen=True)
class Bandwidth:
    read_bytes_per_s: float
    write_bytes_per_s: float
    num_bytes: int
    backend: str


def measure_bandwidth(
    aio: AioBackend, directory: str, num_bytes: int = 256 << 20, chunk_bytes: int = 64 << 20
) -> Bandwidth:
    """Write then read `num_bytes` through `aio` in a scratch file under `directory`.

    With O_DIRECT this is the device's bandwidth; where the file system refuses O_DIRECT the
    written pages are evicted from the page cache before reading so the read is not a memcpy.
    """
    num_bytes = align_up(num_bytes)
    chunk_bytes = align_up(min(num_bytes, chunk_bytes))
    path = os.path.join(directory, f".stalwart-bandwidth-{os.getpid()}.bin")
    file = OpenFile(path)
    buffers = [aio.allocate(chunk_bytes) for _ in range(2)]
    try:
        for buffer in buffers:
            buffer.copy_(
                torch.from_numpy(
                    np.random.default_rng(0).integers(0, 255, chunk_bytes, dtype=np.uint8)
                )
            )
        os.ftruncate(file.fd, num_bytes)
        offsets = list(range(0, num_bytes, chunk_bytes))
        start = time.perf_counter()
        pending = [aio.write(file, off, buffers[i % 2]) for i, off in enumerate(offsets)]
        for future in pending:
            future.result()
        os.fsync(file.fd)
        write_s = time.perf_counter() - start
        if not file.direct:
            os.posix_fadvise(file.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        pending = []
        for i, off in enumerate(offsets):
            if len(pending) >= 2:
                pending.pop(0).result()
            pending.append(aio.read(file, off, buffers[i % 2]))
        for future in pending:
            future.result()
        read_s = time.perf_counter() - start
    finally:
        for buffer in buffers:
            aio.free(buffer)
        file.close()
        os.remove(path)
    return Bandwidth(num_bytes / read_s, num_bytes / write_s, num_bytes, aio.name)


_M_MMAP_THRESHOLD = -3


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


_LIBC = None


def limit_heap_retention(threshold_bytes: int = 32 << 20) -> None:
    """Serve allocations above `threshold_bytes` with mmap, and fix the threshold there.

    Below it, freed blocks stay in the heap and the next block's activations reuse them
    without page faults (a 256 KiB threshold, which returned every activation to the OS at
    once, spent 20-30% of a step's CPU time in page faults on a 2-core host). glibc would
    otherwise move its threshold on its own (up to 32 MiB) and with it its trim threshold. What
    the heap keeps is bounded by the caller: `OffloadEngine` hands free pages back with
    `malloc_trim` at block boundaries when the process nears its host budget.
    Process-wide, harmless elsewhere.
    """
    libc = _libc()
    if libc:
        libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes))


def malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, inflating RSS)."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)

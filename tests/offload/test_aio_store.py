"""Block I/O back-ends read back exactly what they wrote; the buffer pool never exceeds its budget."""

import os
import time

import numpy as np
import pytest
import torch

from stalwart.offload.aio import (
    AioSettings,
    OpenFile,
    libaio_unavailable_reason,
    make_aio,
    measure_bandwidth,
)
from stalwart.offload.store import (
    BudgetExceededError,
    HostBufferPool,
    TensorStore,
    check_free_space,
    check_nvme_path,
)

SETTINGS = AioSettings(block_size=64 << 10, queue_depth=4, thread_count=2)


def _round_trip(aio, directory):
    """Write random tensors of awkward sizes into regions, read them back, compare bytes."""
    rng = np.random.default_rng(1)
    sizes = [1, 4095, 4096, 4097, 300_001, 1 << 20]
    store = TensorStore(aio, device="nvme", directory=str(directory), name=f"round-{aio.name}")
    regions = [store.reserve(size) for size in sizes]
    store.open()
    pool = HostBufferPool(aio, budget_bytes=16 << 20)
    payloads, pending = [], []
    for size, region in zip(sizes, regions):
        data = rng.integers(0, 256, size, dtype=np.uint8)
        buffer = pool.acquire(size)
        buffer.tensor[:size].copy_(torch.from_numpy(data))
        payloads.append(data)
        pending.append((store.write(region, buffer), buffer))
    for future, buffer in pending:
        future.result()
        buffer.release()
    # Read back in reverse order with fresh buffers so a stale buffer cannot pass the test.
    pool.shrink()
    for size, region, data in reversed(list(zip(sizes, regions, payloads))):
        buffer = pool.acquire(size)
        buffer.tensor.zero_()
        store.read(region, buffer).result()
        assert np.array_equal(buffer.tensor[:size].numpy(), data)
        buffer.release()
    assert store.bytes_written == store.bytes_read == sum(region.padded_bytes for region in regions)
    store.close(remove=True)
    pool.close()


def test_threadpool_round_trip(tmp_path):
    aio = make_aio(SETTINGS, backend="threadpool")
    _round_trip(aio, tmp_path)
    aio.close()


def test_libaio_round_trip(tmp_path):
    reason = libaio_unavailable_reason()
    if reason is not None:
        pytest.skip(f"DeepSpeed's libaio op cannot be built here: {reason}")
    aio = make_aio(SETTINGS, backend="libaio", lockable_bytes=16 << 20)
    assert aio.name == "libaio"
    _round_trip(aio, tmp_path)
    aio.close()


class _SlowAio:
    """Delegates to a real back-end after a per-kind delay, on its own threads: a transfer
    asked for later can overtake an earlier one unless the store orders them."""

    def __init__(self, inner, *, read_delay_s=0.0, write_delay_s=0.0):
        from concurrent.futures import ThreadPoolExecutor

        self.inner, self.name = inner, inner.name
        self.delays = {"read": read_delay_s, "write": write_delay_s}
        self._threads = ThreadPoolExecutor(max_workers=4)

    def allocate(self, num_bytes):
        return self.inner.allocate(num_bytes)

    def free(self, buffer):
        self.inner.free(buffer)

    def _later(self, kind, *args):
        def run():
            time.sleep(self.delays[kind])
            getattr(self.inner, kind)(*args).result()

        return self._threads.submit(run)

    def read(self, file, offset, buffer):
        return self._later("read", file, offset, buffer)

    def write(self, file, offset, buffer):
        return self._later("write", file, offset, buffer)

    def close(self):
        self._threads.shutdown(wait=True)
        self.inner.close()


def _filled(pool, size, value):
    buffer = pool.acquire(size)
    buffer.tensor.fill_(value)
    return buffer


@pytest.mark.parametrize("slow", ["write", "read"])
def test_overlapping_transfers_run_in_the_order_asked(tmp_path, slow):
    """Read-after-write sees the write, write-after-read does not change what the read got,
    and two writes land in order, even when the back-end would finish them the other way
    round; transfers of other regions do not wait."""
    delay = 0.3
    aio = _SlowAio(make_aio(SETTINGS, backend="threadpool"), **{f"{slow}_delay_s": delay})
    store = TensorStore(aio, device="nvme", directory=str(tmp_path), name="ordered")
    size = 3 * 4096
    region, other = store.reserve(size), store.reserve(size)
    store.open()
    pool = HostBufferPool(aio, budget_bytes=1 << 20)
    store.write(region, _filled(pool, size, 1)).result()
    # Read after write, write after write.
    store.write(region, _filled(pool, size, 2))
    seen = _filled(pool, size, 0)
    read = store.read(region, seen)
    store.write(region, _filled(pool, size, 3))
    # Write after read.
    late = _filled(pool, size, 0)
    read_again = store.read(region, late)
    store.write(region, _filled(pool, size, 4))
    # A region nobody else touches is not held up by the queue on `region`.
    started = time.perf_counter()
    store.write(other, _filled(pool, size, 9)).result()
    assert time.perf_counter() - started < 3 * delay
    read.result()
    read_again.result()
    assert torch.all(seen.tensor == 2)
    assert torch.all(late.tensor == 3)
    final = _filled(pool, size, 0)
    store.read(region, final).result()
    assert torch.all(final.tensor == 4)
    store.close(remove=True)
    pool.close()
    aio.close()


def test_host_store_round_trip():
    aio = make_aio(SETTINGS, backend="threadpool")
    store = TensorStore(aio, device="cpu", directory=None)
    region = store.reserve(10_000)
    store.open()
    pool = HostBufferPool(aio, budget_bytes=1 << 20)
    buffer = pool.acquire(10_000)
    buffer.tensor[:10_000].copy_(torch.arange(10_000) % 251)
    store.write(region, buffer).result()
    target = bytearray(10_000)
    store.pread(region.offset, memoryview(target))
    assert bytes(target) == bytes((torch.arange(10_000) % 251).to(torch.uint8).numpy())
    aio.close()


def test_unaligned_request_is_rejected(tmp_path):
    aio = make_aio(SETTINGS, backend="threadpool")
    file = OpenFile(str(tmp_path / "x.bin"))
    buffer = aio.allocate(8192)
    with pytest.raises(ValueError, match="aligned"):
        aio.read(file, 100, buffer)
    file.close()
    aio.close()


def test_pool_budget_is_hard_and_exact():
    aio = make_aio(SETTINGS, backend="threadpool")
    pool = HostBufferPool(aio, budget_bytes=1 << 20)
    first = pool.acquire(300_000)  # rounds to 303_104 (4 KiB pages), not to a power of two
    assert first.num_bytes == 303_104
    second = pool.acquire(300_000)
    third = pool.acquire(300_000)
    assert pool.in_use_bytes == 3 * 303_104
    # A prefetch must leave the reserve free; a fourth buffer does not fit at all.
    assert pool.try_acquire(100_000, reserve_bytes=200_000) is None
    assert pool.try_acquire(300_000) is None
    with pytest.raises(BudgetExceededError, match="max_host_memory_gb"):
        pool.acquire(2 << 20)
    with pytest.raises(BudgetExceededError, match="waited"):
        pool.acquire(300_000, timeout_s=0.2)
    third.release()
    reused = pool.acquire(300_000)  # the cached buffer of the same size comes back
    assert pool.used_bytes == 3 * 303_104
    # A different size evicts the cached buffers it needs room for.
    reused.release()
    second.release()
    big = pool.acquire(700_000)
    assert pool.used_bytes <= pool.budget_bytes
    assert pool.peak_bytes <= pool.budget_bytes
    big.release()
    first.release()
    pool.close()
    assert pool.used_bytes == 0
    aio.close()


def test_the_pool_asks_its_owner_before_it_maps_a_new_buffer():
    """`before_growth` lets the engine make room (trim its heap) before the pool's RSS grows;
    a cached buffer coming back maps nothing and asks nothing."""
    aio = make_aio(SETTINGS, backend="threadpool")
    pool = HostBufferPool(aio, budget_bytes=1 << 20)
    asked = []
    pool.before_growth = lambda num_bytes: asked.append((num_bytes, pool.used_bytes))
    first = pool.acquire(300_000)
    assert asked == [(303_104, 0)]  # before the buffer counts
    first.release()
    again = pool.acquire(300_000)
    assert asked == [(303_104, 0)]
    other = pool.acquire(100_000)
    assert asked[-1] == (102_400, 303_104)
    again.release()
    other.release()
    pool.close()
    aio.close()


def test_bandwidth_is_measured(tmp_path):
    aio = make_aio(SETTINGS, backend="threadpool")
    bandwidth = measure_bandwidth(aio, str(tmp_path), num_bytes=8 << 20)
    assert bandwidth.read_bytes_per_s > 0 and bandwidth.write_bytes_per_s > 0
    assert not any(name.startswith(".stalwart-bandwidth") for name in os.listdir(tmp_path))
    aio.close()


def test_nvme_path_errors(tmp_path):
    with pytest.raises(ValueError, match="nvme_path is not set"):
        check_nvme_path(None)
    with pytest.raises(ValueError, match="does not exist; create the directory"):
        check_nvme_path(str(tmp_path / "missing"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_nvme_path(str(a_file))
    # /proc refuses new files even for root: a read-only location.
    with pytest.raises(ValueError, match="not writable"):
        check_nvme_path("/proc/self")
    assert check_nvme_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match="GiB free but the offloaded state needs"):
        check_free_space(str(tmp_path), 1 << 60)

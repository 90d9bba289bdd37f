"""DeepSpeed op loading survives a build lock left by a killed builder."""

import os
import subprocess
import sys
import time

import pytest

from stalwart.offload import ops


class FakeBuilder:
    name = "fake_op"

    def __init__(self):
        self.loads = 0

    def load(self, verbose=False):
        self.loads += 1
        return "module"


@pytest.fixture
def extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = ops.build_directory(FakeBuilder.name)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _lock(directory, age_s):
    lock = directory / "lock"
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_a_dead_builders_lock_is_removed_and_the_op_loads(extensions_dir):
    lock = _lock(extensions_dir, age_s=7200)
    builder = FakeBuilder()
    assert ops.load_op(builder, max_wait_s=5) == "module"
    assert builder.loads == 1 and not lock.exists()


def test_a_young_lock_is_left_to_its_builder(extensions_dir):
    lock = _lock(extensions_dir, age_s=1)
    assert not ops.clear_stale_lock(extensions_dir)
    with pytest.raises(TimeoutError, match="STALWART_OP_BUILD_WAIT_S"):
        ops.load_op(FakeBuilder(), max_wait_s=0.5)
    assert lock.exists()


def test_a_lock_with_a_process_working_in_the_directory_is_kept(extensions_dir):
    lock = _lock(extensions_dir, age_s=7200)
    # ninja runs with the build directory as its working directory
    builder_process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], cwd=extensions_dir
    )
    try:
        deadline = time.time() + 10
        while os.readlink(f"/proc/{builder_process.pid}/cwd") != str(extensions_dir):
            assert time.time() < deadline
            time.sleep(0.05)
        assert not ops.clear_stale_lock(extensions_dir)
        assert lock.exists()
    finally:
        builder_process.kill()
        builder_process.wait()
    assert ops.clear_stale_lock(extensions_dir)
    assert not lock.exists()


def test_clear_stale_locks_walks_every_build_directory(extensions_dir):
    other = extensions_dir.parent / "other_op"
    other.mkdir()
    stale = [_lock(extensions_dir, age_s=7200), _lock(other, age_s=7200)]
    assert sorted(ops.clear_stale_locks(extensions_dir.parent)) == sorted(stale)
    assert not any(lock.exists() for lock in stale)


def test_no_lock_means_a_plain_load(extensions_dir):
    builder = FakeBuilder()
    assert ops.load_op(builder, max_wait_s=0) == "module" and builder.loads == 1

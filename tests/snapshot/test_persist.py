"""Durable tier: bit-exact round trips, atomic writes that survive SIGKILL, refused corruption."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

from stalwart.snapshot import persist
from stalwart.snapshot.persist import (
    CheckpointCorruptError,
    DurableWriter,
    latest_step,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    write_checkpoint,
)

DTYPES = [
    ("float32", torch.float32),
    ("bfloat16", torch.bfloat16),
    ("int64", torch.int64),
    ("uint8", torch.uint8),
    ("float16", torch.float16),
    ("bool", torch.bool),
]


def random_shard(rng, num_entries=12, extra_tail=0):
    """A shard buffer + layout with alignment gaps, scalars and empty tensors."""
    entries = []
    offset = int(rng.integers(0, 16))
    for i in range(num_entries):
        name, torch_dtype = DTYPES[int(rng.integers(0, len(DTYPES)))]
        itemsize = torch.tensor([], dtype=torch_dtype).element_size()
        offset = -(-offset // itemsize) * itemsize + int(rng.integers(0, 3)) * 64
        shape = [int(s) for s in rng.integers(0, 5, int(rng.integers(0, 3)))]
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        entries.append(
            {
                "name": f"t{i}.{name}",
                "dtype": name,
                "shape": shape,
                "offset": offset,
                "nbytes": nbytes,
            }
        )
        offset += nbytes
    total_bytes = offset + int(rng.integers(0, 40))
    buffer = rng.integers(0, 256, total_bytes + extra_tail, dtype=np.uint8)
    # bool tensors must hold 0/1 for safetensors readers to make sense of them
    for entry in entries:
        if entry["dtype"] == "bool":
            buffer[entry["offset"] : entry["offset"] + entry["nbytes"]] &= 1
    layout = {"entries": entries, "total_bytes": total_bytes, "extra": {"step": 7, "note": "x"}}
    return buffer, layout


class ArrayStream:
    """A streaming shard backed by an array; records the largest read it was asked for."""

    def __init__(self, buffer, layout):
        self.buffer, self.layout = buffer, layout
        self.max_read_nbytes = 0

    def read_into(self, offset, out):
        self.max_read_nbytes = max(self.max_read_nbytes, len(out))
        out[:] = memoryview(self.buffer)[offset : offset + len(out)]


def test_round_trip_is_bit_exact_for_buffers_and_streaming_shards(tmp_path):
    rng = np.random.default_rng(0)
    plain, plain_layout = random_shard(rng, extra_tail=100)  # slot larger than the shard
    streamed, streamed_layout = random_shard(rng, num_entries=30)
    stream = ArrayStream(streamed, streamed_layout)
    run_meta = {"version": 12, "config": {"lr": 0.001}, "ranks": [0, 1]}
    path = write_checkpoint(
        tmp_path,
        12,
        {"rank00000": (plain, plain_layout), "rank00001": stream},
        run_meta,
        keep=2,
        chunk_nbytes=256,
    )
    assert path == tmp_path / "checkpoints" / "step_12"
    assert stream.max_read_nbytes == 256  # streamed in chunks, never read whole
    loaded = load_checkpoint(tmp_path)
    assert loaded.step == 12 and loaded.run_meta == run_meta
    array, layout = loaded.shards["rank00000"]
    assert array.dtype == np.uint8 and layout == plain_layout
    assert array.tobytes() == plain[: plain_layout["total_bytes"]].tobytes()
    array, layout = loaded.shards["rank00001"]
    assert layout == streamed_layout and array.tobytes() == streamed.tobytes()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_12"


def test_shard_files_are_standard_safetensors(tmp_path):
    rng = np.random.default_rng(1)
    buffer, layout = random_shard(rng, num_entries=20)
    path = write_checkpoint(tmp_path, 1, {"rank00000": (buffer, layout)}, {}, keep=1)
    covered = np.zeros(layout["total_bytes"], dtype=bool)
    with safe_open(str(path / "rank00000.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()[persist.LAYOUT_METADATA_KEY]) == layout
        for entry in layout["entries"]:
            tensor = handle.get_tensor(entry["name"])
            torch_dtype = dict(DTYPES)[entry["dtype"]]
            raw = bytearray(buffer[entry["offset"] : entry["offset"] + entry["nbytes"]].tobytes())
            expected = (
                torch.frombuffer(raw, dtype=torch_dtype).reshape(entry["shape"])
                if raw
                else torch.empty(entry["shape"], dtype=torch_dtype)
            )
            assert tensor.dtype == torch_dtype and tensor.shape == expected.shape
            assert torch.equal(
                tensor.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)
            )
            covered[entry["offset"] : entry["offset"] + entry["nbytes"]] = True
        gaps = [key for key in handle.keys() if key.startswith(persist.GAP_PREFIX)]
        for key in gaps:
            start = int(key.split("@")[1])
            gap = handle.get_tensor(key).numpy()
            assert np.array_equal(gap, buffer[start : start + len(gap)])
            covered[start : start + len(gap)] = True
    assert covered.all()


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time, pathlib
    import numpy as np
    from stalwart.snapshot.persist import write_checkpoint

    root, marker = sys.argv[1], pathlib.Path(sys.argv[2])
    total = 64 << 20

    class SlowShard:
        layout = {"entries": [{"name": "w", "dtype": "uint8", "shape": [total],
                               "offset": 0, "nbytes": total}], "total_bytes": total, "extra": {}}

        def read_into(self, offset, out):
            out[:] = b"\\x07" * len(out)
            marker.touch()
            time.sleep(0.05)

    write_checkpoint(root, 2, {"rank00000": SlowShard()}, {"who": "killed"}, keep=3,
                     chunk_nbytes=1 << 20)
    """
)


def test_a_write_killed_midway_leaves_the_previous_checkpoint_and_latest(tmp_path):
    rng = np.random.default_rng(2)
    buffer, layout = random_shard(rng)
    write_checkpoint(tmp_path, 1, {"rank00000": (buffer, layout)}, {"who": "first"}, keep=3)
    latest_before = (tmp_path / "checkpoints" / "latest").read_bytes()

    marker = tmp_path / "writing"
    writer = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert writer.poll() is None, "the writer exited before it started writing"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.01)
        time.sleep(0.2)  # a few chunks into the 64-chunk file
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(30)
    assert writer.returncode == -signal.SIGKILL

    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert leftovers == [f"step_2.tmp-{writer.pid}"]  # it really died mid-write
    assert (tmp_path / "checkpoints" / "latest").read_bytes() == latest_before
    assert list_checkpoints(tmp_path) == [1] and latest_step(tmp_path) == 1
    loaded = load_checkpoint(tmp_path)
    assert loaded.step == 1 and loaded.run_meta == {"who": "first"}
    assert loaded.shards["rank00000"][0].tobytes() == buffer.tobytes()

    # The next write cleans up after the dead writer.
    write_checkpoint(tmp_path, 3, {"rank00000": (buffer, layout)}, {}, keep=3)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert list_checkpoints(tmp_path) == [1, 3]


def _flip_byte(path, position):
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


def test_corrupt_or_truncated_shard_files_are_refused_with_the_file_named(tmp_path):
    rng = np.random.default_rng(3)
    buffer, layout = random_shard(rng)
    path = write_checkpoint(
        tmp_path, 5, {"rank00000": (buffer, layout), "rank00001": (buffer, layout)}, {}, keep=2
    )
    shard_file = path / "rank00001.safetensors"
    original = shard_file.read_bytes()

    _flip_byte(shard_file, len(original) - 3)  # in the data section
    with pytest.raises(
        CheckpointCorruptError, match=r"rank00001\.safetensors: xxh3-64 .* does not match"
    ):
        load_checkpoint(tmp_path)
    shard_file.write_bytes(original)
    _flip_byte(shard_file, 20)  # in the JSON header
    with pytest.raises(CheckpointCorruptError, match="rank00001.safetensors"):
        load_checkpoint(tmp_path, 5)

    shard_file.write_bytes(original[:-1])
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        load_checkpoint(tmp_path)

    shard_file.write_bytes(original)
    assert (
        load_checkpoint(tmp_path).shards["rank00001"][0].tobytes()
        == buffer[: layout["total_bytes"]].tobytes()
    )

    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointCorruptError, match="manifest.json: not valid JSON"):
        load_checkpoint(tmp_path, 5)


def test_verification_streams_every_file_and_the_newest_usable_step_skips_bad_ones(tmp_path):
    rng = np.random.default_rng(7)
    buffer, layout = random_shard(rng)
    shards = {"rank00000": (buffer, layout), "rank00001": (buffer, layout)}
    for step in (2, 4, 6):
        write_checkpoint(tmp_path, step, shards, {}, keep=5)
    for step in (2, 4, 6):  # a chunk smaller than a file: the streaming path
        persist.verify_checkpoint(tmp_path, step, chunk_nbytes=64)
    assert persist.newest_usable_step(tmp_path) == 6
    newest = persist.checkpoint_dir(tmp_path, 6) / "rank00001.safetensors"
    _flip_byte(newest, newest.stat().st_size - 5)
    with pytest.raises(CheckpointCorruptError, match=r"rank00001\.safetensors: xxh3-64"):
        persist.verify_checkpoint(tmp_path, 6, chunk_nbytes=64)
    middle = persist.checkpoint_dir(tmp_path, 4) / "rank00000.safetensors"
    middle.write_bytes(middle.read_bytes()[:-1])
    reports = []
    assert persist.newest_usable_step(tmp_path, log=reports.append) == 2
    assert [r.split(" is unusable")[0] for r in reports] == [
        "durable checkpoint of step 6",
        "durable checkpoint of step 4",
    ]
    assert "truncated" in reports[1]
    # Without checksums only manifests and sizes count: the flipped byte of step 6 passes (its
    # loader will catch it), the truncated step 4 does not; excluded steps are skipped.
    assert persist.newest_usable_step(tmp_path, checksums=False) == 6
    assert persist.newest_usable_step(tmp_path, checksums=False, exclude={6}) == 2
    assert persist.newest_usable_step(tmp_path, checksums=False, below=6) == 2
    assert persist.newest_usable_step(tmp_path, checksums=False, below=2) is None
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        persist.verify_checkpoint(tmp_path, 4, checksums=False)
    # Candidates restrict the choice (e.g. to the checkpoints that carry an RL pipeline state).
    assert persist.newest_usable_step(tmp_path, [4, 2]) == 2
    assert persist.newest_usable_step(tmp_path, [6, 4]) is None
    (persist.checkpoint_dir(tmp_path, 2) / "manifest.json").write_text("[]")
    assert persist.newest_usable_step(tmp_path) is None


def test_listing_ignores_incomplete_checkpoints_and_latest_falls_back(tmp_path):
    rng = np.random.default_rng(4)
    buffer, layout = random_shard(rng)
    for step in (1, 2):
        write_checkpoint(tmp_path, step, {"r": (buffer, layout)}, {}, keep=5)
    (tmp_path / "checkpoints" / "step_9").mkdir()  # no manifest: never complete
    (tmp_path / "checkpoints" / "step_8.tmp-1").mkdir()
    assert list_checkpoints(tmp_path) == [1, 2] and latest_step(tmp_path) == 2
    (tmp_path / "checkpoints" / "latest").write_text("step_7\n")  # points at nothing
    assert latest_step(tmp_path) == 2
    with pytest.raises(CheckpointCorruptError, match="manifest.json: missing"):
        load_checkpoint(tmp_path, 9)
    with pytest.raises(FileNotFoundError, match=r"available steps: \[1, 2\]"):
        load_checkpoint(tmp_path, 4)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "elsewhere")


def test_pruning_keeps_the_newest_and_never_the_latest_target(tmp_path):
    rng = np.random.default_rng(5)
    buffer, layout = random_shard(rng)
    for step in range(1, 6):
        write_checkpoint(tmp_path, step, {"r": (buffer, layout)}, {}, keep=2)
        assert list_checkpoints(tmp_path) == list(range(max(1, step - 1), step + 1))
    (tmp_path / "checkpoints" / "latest").write_text("step_4\n")
    write_checkpoint(tmp_path, 6, {"r": (buffer, layout)}, {}, keep=3)
    (tmp_path / "checkpoints" / "latest").write_text("step_4\n")
    assert prune_checkpoints(tmp_path, keep=1) == [5]
    assert list_checkpoints(tmp_path) == [4, 6]


def test_rewriting_a_step_replaces_it(tmp_path):
    rng = np.random.default_rng(6)
    first, layout = random_shard(rng)
    write_checkpoint(tmp_path, 3, {"r": (first, layout)}, {"take": 1}, keep=2)
    second = first.copy()
    second[:] = 1
    write_checkpoint(tmp_path, 3, {"r": (second, layout)}, {"take": 2}, keep=2)
    loaded = load_checkpoint(tmp_path, 3)
    assert loaded.run_meta == {"take": 2} and loaded.shards["r"][0].tobytes() == second.tobytes()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_3"]


class GatedStream(ArrayStream):
    def __init__(self, buffer, layout, gate):
        super().__init__(buffer, layout)
        self.gate = gate

    def read_into(self, offset, out):
        assert self.gate.wait(30)
        super().read_into(offset, out)


def test_durable_writer_runs_in_the_background_and_reports(tmp_path):
    rng = np.random.default_rng(7)
    buffer, layout = random_shard(rng)
    gate = threading.Event()
    reported = []
    writer = DurableWriter(tmp_path, keep=2, max_pending=1, on_done=reported.append)
    try:
        assert writer.submit(1, {"r": GatedStream(buffer, layout, gate)}, {"v": 1})
        time.sleep(0.1)  # the thread picks version 1 up and blocks on the gate
        assert writer.submit(2, {"r": (buffer, layout)}, {"v": 2}, block=False)  # fills the queue
        assert not writer.submit(3, {"r": (buffer, layout)}, {"v": 3}, block=False)  # full: skipped
        assert writer.num_pending == 2 and list_checkpoints(tmp_path) == []
        gate.set()
        bad_layout = {"entries": [], "total_bytes": len(buffer) + 1}
        assert writer.submit(4, {"r": (buffer, bad_layout)}, {})  # fails inside the thread
        assert writer.submit(5, {"r": (buffer, layout)}, {"v": 5})
        results = writer.flush(timeout_s=60)
    finally:
        writer.close()
    assert [r.step for r in results] == [1, 2, 4, 5] == [r.step for r in reported]
    assert [r.ok for r in results] == [True, True, False, True]
    assert isinstance(results[2].error, ValueError) and "total_bytes" in str(results[2].error)
    assert results[0].num_bytes > layout["total_bytes"]
    assert list_checkpoints(tmp_path) == [2, 5]
    assert load_checkpoint(tmp_path).run_meta == {"v": 5}


@pytest.mark.parametrize(
    "shards, run_meta, match",
    [
        ({"../evil": None}, {}, "shard name '../evil' is invalid"),
        ({"r": "not a shard"}, {}, "pass \\(buffer, layout\\)"),
        (
            {"r": (b"abc", {"entries": [], "total_bytes": 3})},
            {"f": object()},
            "run_meta is not JSON",
        ),
        (
            {
                "r": (
                    b"\0" * 16,
                    {
                        "entries": [
                            {
                                "name": "a",
                                "dtype": "float32",
                                "shape": [2],
                                "offset": 0,
                                "nbytes": 8,
                            },
                            {
                                "name": "b",
                                "dtype": "float32",
                                "shape": [2],
                                "offset": 4,
                                "nbytes": 8,
                            },
                        ],
                        "total_bytes": 16,
                    },
                )
            },
            {},
            "entry 'b' at offset 4 overlaps",
        ),
        (
            {
                "r": (
                    b"\0" * 16,
                    {
                        "entries": [
                            {
                                "name": "a",
                                "dtype": "float32",
                                "shape": [3],
                                "offset": 0,
                                "nbytes": 8,
                            }
                        ],
                        "total_bytes": 16,
                    },
                )
            },
            {},
            "needs 12",
        ),
    ],
)
def test_bad_inputs_raise_value_errors_and_leave_nothing(tmp_path, shards, run_meta, match):
    with pytest.raises(ValueError, match=match):
        write_checkpoint(tmp_path, 1, shards, run_meta, keep=1)
    assert list_checkpoints(tmp_path) == []
    directory = tmp_path / "checkpoints"
    assert not directory.exists() or not any(directory.iterdir())


def test_cold_read_helper_advises_every_file(tmp_path):
    rng = np.random.default_rng(8)
    buffer, layout = random_shard(rng)
    write_checkpoint(tmp_path, 1, {"a": (buffer, layout), "b": (buffer, layout)}, {}, keep=1)
    expected = 3 if hasattr(os, "posix_fadvise") else 0
    assert persist.evict_from_page_cache(tmp_path, 1) == expected
    assert (
        load_checkpoint(tmp_path).shards["b"][0].tobytes()
        == buffer[: layout["total_bytes"]].tobytes()
    )


def test_newest_usable_step_lists_again_when_a_newer_checkpoint_prunes_the_one_it_checks(
    tmp_path, monkeypatch
):
    """A recovery looks for the newest checkpoint while the managers are still writing one: the
    writer completes step 4 and prunes step 2 (keep=1) between the listing and the check. The
    choice must be step 4, not "nothing usable" (which would restart the job from step 0)."""
    rng = np.random.default_rng(8)
    buffer, layout = random_shard(rng)
    shards = {"rank00000": (buffer, layout), "rank00001": (buffer, layout)}
    write_checkpoint(tmp_path, 2, shards, {}, keep=1)
    verify = persist.verify_checkpoint
    calls = []

    def verify_while_a_writer_finishes(root, step, **kwargs):
        calls.append(step)
        if len(calls) == 1:  # the writer lands step 4 and prunes step 2 under the check
            write_checkpoint(tmp_path, 4, shards, {}, keep=1)
        return verify(root, step, **kwargs)

    monkeypatch.setattr(persist, "verify_checkpoint", verify_while_a_writer_finishes)
    reports = []
    assert persist.newest_usable_step(tmp_path, log=reports.append) == 4
    assert calls == [2, 4] and reports == []
    # An explicit candidate that never existed is reported and passed over, not retried.
    assert persist.newest_usable_step(tmp_path, [9, 4], log=reports.append) == 4
    assert len(reports) == 1 and "step 9" in reports[0]
    # Candidates may come from a function, asked again after a prune.
    assert persist.newest_usable_step(tmp_path, lambda: [4]) == 4

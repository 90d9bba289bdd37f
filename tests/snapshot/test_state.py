"""Snapshot state layout (flatten / layout / copy / checksum / unflatten) and shared-memory regions."""

import json
import multiprocessing
import os
import signal
import uuid

import numpy as np
import pytest
import torch

from stalwart.snapshot import shm
from stalwart.snapshot.state import (
    ALIGNMENT_BYTES,
    Layout,
    SnapshotCorruptError,
    checksums,
    copy_into,
    flatten,
    layout_of,
    layout_tree,
    unflatten,
    verify,
)
from stalwart.trainer.rng import rng_state


def realistic_tree() -> dict:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 5, generator=generator)
    special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-45])
    # A NaN with a non-default payload: a value-converting copy would canonicalise it.
    special_bits = special.view(torch.int32).clone()
    special_bits[0] = 0x7FC0_1234
    return {
        "model": {
            "blocks.0.attn.wq.weight": weight,
            "blocks.0.mlp.w_up.weight": torch.randn(3, 7, generator=generator).to(torch.bfloat16),
            "norm.weight": torch.ones(5),
            "special": special_bits.view(torch.float32),
            "transposed": weight.t(),  # non-contiguous source
        },
        "optim": {
            "blocks.0.attn.wq.weight": {
                "step": torch.tensor(7.0),  # 0-dim
                "exp_avg": torch.randn(6, 5, generator=generator),
                "exp_avg_sq": torch.rand(6, 5, generator=generator),
            }
        },
        "empty": torch.empty(0, 4, dtype=torch.float16),
        "counts": torch.arange(11, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(9, dtype=torch.uint8),
        "nested": [1, [2.5, None, "x", torch.tensor([3, 4], dtype=torch.int32)], {"k": False}],
        "tuple": (1, 2),
        "schedule": {"step": 7, "peak_lr": 3e-4},
        "rng": rng_state(),
        "step": 7,
    }


def assert_bit_equal(left, right, path="") -> None:
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor), path
        assert left.dtype == right.dtype and left.shape == right.shape, path
        size = left.element_size()
        twin = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
        assert torch.equal(left.contiguous().view(twin), right.contiguous().view(twin)), path
    elif isinstance(left, dict):
        assert set(left) == set(right), path
        for key in left:
            assert_bit_equal(left[key], right[key], f"{path}/{key}")
    elif isinstance(left, list | tuple):
        assert isinstance(right, list) and len(left) == len(right), path
        for index, (a, b) in enumerate(zip(left, right)):
            assert_bit_equal(a, b, f"{path}/{index}")
    else:
        assert left == right and type(left) is type(right), path


def snapshot_bytes(tree):
    tensors, layout = layout_tree(tree)
    buffer = np.zeros(layout.total_bytes, dtype=np.uint8)
    assert copy_into(tensors, layout, buffer) is None  # CPU path copies synchronously
    return tensors, layout, buffer


def test_round_trip_is_byte_identical_through_json():
    tree = realistic_tree()
    _, layout, buffer = snapshot_bytes(tree)
    # The metadata travels as JSON text; the bytes as raw memory.
    restored_layout = Layout.from_json(layout.to_json())
    restored = unflatten(restored_layout, None, memoryview(buffer))
    expected = dict(tree, tuple=[1, 2])
    assert_bit_equal(expected, restored)
    # The NaN payload survived: bits, not values, were copied.
    assert restored["model"]["special"].view(torch.int32)[0].item() == 0x7FC0_1234


def test_layout_offsets_aligned_and_disjoint():
    tensors, layout, _ = snapshot_bytes(realistic_tree())
    assert [entry.name for entry in layout.entries] == [name for name, _ in tensors]
    previous_end = 0
    for entry in layout.entries:
        assert entry.offset % ALIGNMENT_BYTES == 0
        assert entry.offset >= previous_end
        previous_end = entry.offset + entry.nbytes
    assert layout.total_bytes >= previous_end and layout.total_bytes % ALIGNMENT_BYTES == 0
    by_name = {entry.name: entry for entry in layout.entries}
    bf16 = by_name["model/blocks.0.mlp.w_up.weight"]
    assert (bf16.dtype, bf16.shape, bf16.nbytes) == ("bfloat16", (3, 7), 42)
    assert by_name["optim/blocks.0.attn.wq.weight/step"].shape == ()
    assert by_name["empty"].nbytes == 0
    data = json.loads(layout.to_json())
    assert set(data) == {"entries", "total_bytes", "extra"}
    assert set(data["entries"][0]) == {"name", "dtype", "shape", "offset", "nbytes"}


def test_unflatten_views_share_the_buffer_and_materialize_copies():
    tensors, layout, buffer = snapshot_bytes({"w": torch.zeros(4)})
    view = unflatten(layout, None, buffer)
    copy = unflatten(layout, None, buffer, materialize=True)
    buffer[layout.entries[0].offset : layout.entries[0].offset + 4] = np.frombuffer(
        np.float32(2.0).tobytes(), dtype=np.uint8
    )
    assert view["w"][0].item() == 2.0  # zero copy: sees the change
    assert copy["w"][0].item() == 0.0


def test_flatten_rejects_non_json_leaves_naming_the_path():
    with pytest.raises(ValueError, match=r"'optim/3/lr'.*numpy"):
        flatten({"optim": [0, 1, 2, {"lr": np.ones(2)}]})
    with pytest.raises(ValueError, match="keys must be str"):
        flatten({"rng": {0: torch.zeros(1)}})
    with pytest.raises(ValueError, match="reserved key"):
        flatten({"a": {"__tensor__": 1}})


def test_checksum_detects_a_flipped_byte_and_names_the_entry():
    tree = realistic_tree()
    _, layout, buffer = snapshot_bytes(tree)
    sums = checksums(layout, buffer)
    verify(layout, buffer, sums)
    target = next(
        entry
        for entry in layout.entries
        if entry.name == "optim/blocks.0.attn.wq.weight/exp_avg_sq"
    )
    buffer[target.offset + 17] ^= 0x01
    with pytest.raises(SnapshotCorruptError, match="exp_avg_sq") as caught:
        verify(layout, buffer, sums)
    assert caught.value.entry == target.name
    buffer[target.offset + 17] ^= 0x01
    verify(Layout.from_json(layout.to_json()), buffer, sums)


def test_copy_into_rejects_mismatched_tensors_and_small_buffers():
    tensors, layout, buffer = snapshot_bytes({"w": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="recompute the layout"):
        copy_into([("w", torch.zeros(4, 4, dtype=torch.float64))], layout, buffer)
    with pytest.raises(ValueError, match="needs 64"):
        copy_into(tensors, layout, np.zeros(32, dtype=np.uint8))


def test_layout_from_json_rejects_inconsistent_entries():
    layout = layout_of([("w", torch.zeros(3))])
    data = layout.to_dict()
    data["entries"][0]["nbytes"] = 16
    with pytest.raises(ValueError, match="'w'.*expected nbytes=12"):
        Layout.from_dict(data)
    data["entries"][0].update(nbytes=12, dtype="float33")
    with pytest.raises(ValueError, match="float33"):
        Layout.from_dict(data)


@pytest.mark.gpu
def test_cuda_copy_into_registered_region_is_byte_identical():
    tree = realistic_tree()
    tensors, layout, reference = snapshot_bytes(tree)
    cuda_tensors = [(name, tensor.cuda()) for name, tensor in tensors]
    name = shm.region_name(f"test{uuid.uuid4().hex[:8]}", "gpu")
    region = shm.create_region(name, layout.total_bytes, register_cuda=True)
    try:
        assert region.cuda_registered
        stream = torch.cuda.Stream()
        done = copy_into(cuda_tensors, layout, region.array, stream=stream, pinned=True)
        done.synchronize()
        assert checksums(layout, region.array) == checksums(layout, reference)
    finally:
        region.close()
        region.unlink()


# ---------------------------------------------------------------------------------------------
# Shared memory


@pytest.fixture
def job_id():
    job = f"test{uuid.uuid4().hex[:10]}"
    yield job
    shm.remove_regions(shm.job_prefix(job))


def _write_then_hang(name: str, ready) -> None:
    region = shm.attach_region(name)
    region.array[:] = np.arange(region.nbytes, dtype=np.uint64).astype(np.uint8)
    ready.set()
    signal.pause()  # killed here, mapping still open


def test_region_survives_a_sigkilled_writer(job_id):
    name = shm.region_name(job_id, "rank0", "slot0")
    owner = shm.create_region(name, 1 << 20)
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    child = context.Process(target=_write_then_hang, args=(name, ready))
    child.start()
    try:
        assert ready.wait(60), "child never wrote the region"
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        assert child.exitcode == -signal.SIGKILL
        expected = np.arange(1 << 20, dtype=np.uint64).astype(np.uint8)
        assert np.array_equal(owner.array, expected)
        assert name in shm.list_regions(shm.job_prefix(job_id))
        # A new process (a replacement trainer) can still attach and read it.
        again = shm.attach_region(name)
        assert np.array_equal(again.array, expected)
        again.close()
        assert (shm.shm_dir() / name).exists()
    finally:
        if child.is_alive():
            child.kill()
        owner.close()


def test_attach_close_never_unlinks_and_remove_regions_is_scoped(job_id):
    slot0 = shm.create_region(shm.region_name(job_id, "rank0", "slot0"), 4096)
    slot1 = shm.create_region(shm.region_name(job_id, "rank0", "slot1"), 4096)
    other_job = f"{job_id}x"  # shares the text prefix but not the job prefix
    other = shm.create_region(shm.region_name(other_job, "rank0", "slot0"), 4096)
    try:
        attached = shm.attach_region(slot0.name)
        attached.buffer[:5] = b"hello"
        attached.close()
        assert attached.closed
        assert bytes(slot0.buffer[:5]) == b"hello"
        with pytest.raises(FileExistsError, match="already exists"):
            shm.create_region(slot0.name, 4096)
        removed = shm.remove_regions(shm.job_prefix(job_id))
        assert removed == sorted([slot0.name, slot1.name])
        assert shm.list_regions(shm.job_prefix(other_job)) == [other.name]
        with pytest.raises(FileNotFoundError, match="manager creates it"):
            shm.attach_region(slot0.name)
        # The owner's mapping stays valid after its name is gone.
        assert bytes(slot0.buffer[:5]) == b"hello"
    finally:
        for region in (slot0, slot1, other):
            region.close()
        shm.remove_regions(shm.job_prefix(other_job))


def test_close_with_live_views_keeps_them_valid(job_id):
    region = shm.create_region(shm.region_name(job_id, "views"), 4096)
    tensors, layout = layout_tree({"w": torch.arange(8, dtype=torch.float32)})
    copy_into(tensors, layout, region.buffer)
    restored = unflatten(layout, None, region.buffer)
    region.close()  # a restored tensor still references the mapping
    assert torch.equal(restored["w"], torch.arange(8, dtype=torch.float32))


def test_bad_region_names_and_sizes_are_rejected():
    with pytest.raises(ValueError, match="invalid"):
        shm.create_region("../escape", 10)
    with pytest.raises(ValueError, match="positive"):
        shm.create_region("stalwart-ok", 0)
    with pytest.raises(ValueError, match="non-empty prefix"):
        shm.remove_regions("")


def test_fused_copy_and_checksum_equals_copy_then_checksums():
    """Same bytes and same checksums as copy_into + checksums, for pieces that split entries,
    non-contiguous and empty tensors, and every dtype width."""
    from stalwart.snapshot.state import checksums, copy_and_checksum, copy_into, layout_of

    generator = torch.Generator().manual_seed(0)
    tensors = [
        ("big", torch.randn(300, 170, generator=generator)),
        ("half", torch.randn(999, generator=generator).to(torch.bfloat16)),
        ("transposed", torch.randn(40, 70, generator=generator).t()),
        ("empty", torch.empty(0)),
        ("ints", torch.randint(-9, 9, (13,), generator=generator)),
        ("flags", torch.rand(33, generator=generator) > 0.5),
    ]
    layout = layout_of(tensors)
    expected = np.zeros(layout.total_bytes, np.uint8)
    copy_into(tensors, layout, expected)
    for piece_bytes in (1, 64, 4096, 1 << 20):
        actual = np.zeros(layout.total_bytes, np.uint8)
        sums = copy_and_checksum(tensors, layout, actual, piece_bytes=piece_bytes)
        assert np.array_equal(actual, expected)
        assert sums == checksums(layout, expected)
    with pytest.raises(ValueError, match="layout says"):
        copy_and_checksum([("big", torch.zeros(3))] + tensors[1:], layout, actual)


def test_read_verified_from_memory_copies_into_targets_and_catches_a_flipped_byte():
    """One pass over bytes in memory: entries with a matching target are hashed and copied into
    it (and the target stands for them), the others land in new tensors; the tree equals
    unflatten's; a flipped byte in a copied or a new entry names that entry."""
    from stalwart.snapshot.state import buffer_reader, read_verified

    tree = realistic_tree()
    tensors, layout, buffer = snapshot_bytes(tree)
    sums = checksums(layout, buffer)
    by_name = dict(tensors)
    targets = {
        "model/blocks.0.attn.wq.weight": torch.zeros(6, 5),
        "optim/blocks.0.attn.wq.weight/exp_avg": torch.zeros(6, 5),
        "model/blocks.0.mlp.w_up.weight": torch.zeros(3, 7),  # wrong dtype: not written
        "counts": torch.zeros(11, dtype=torch.int64),
    }
    reader = buffer_reader(buffer, layout.total_bytes)
    for piece_bytes in (8, 1 << 20):
        restored = read_verified(layout, reader, sums, targets, piece_bytes=piece_bytes)
        assert_bit_equal(unflatten(layout, None, buffer), restored)
        assert (
            restored["model"]["blocks.0.attn.wq.weight"] is targets["model/blocks.0.attn.wq.weight"]
        )
        assert restored["counts"] is targets["counts"]
        assert torch.equal(targets["counts"], by_name["counts"])
        assert torch.equal(targets["model/blocks.0.mlp.w_up.weight"], torch.zeros(3, 7))
    entry = {e.name: e for e in layout.entries}
    for name in ("optim/blocks.0.attn.wq.weight/exp_avg", "model/norm.weight"):
        corrupt = buffer.copy()
        corrupt[entry[name].offset + 3] ^= 0x10
        with pytest.raises(SnapshotCorruptError, match="fails its checksum") as raised:
            read_verified(
                layout, buffer_reader(corrupt, layout.total_bytes), sums, targets, piece_bytes=8
            )
        assert raised.value.entry == name
    with pytest.raises(SnapshotCorruptError, match="checksums for"):
        read_verified(layout, reader, sums[:-1], targets)


def test_read_verified_reads_a_region_file_into_targets_and_new_tensors(job_id):
    """The pread path: the same tree as unflatten's, entries read into their targets (fused
    ones) or into new tensors (never views of the region), a flipped byte named."""
    from stalwart.snapshot.state import read_verified

    tree = realistic_tree()
    tensors, layout, buffer = snapshot_bytes(tree)
    sums = checksums(layout, buffer)
    name = f"{shm.job_prefix(job_id)}read"
    region = shm.create_region(name, layout.total_bytes)
    region.array[:] = buffer
    target = torch.zeros(6, 5)
    with shm.RegionReader(name) as reader:
        for piece_bytes in (8, 1 << 20):
            restored = read_verified(
                layout,
                reader.read_into,
                sums,
                {"optim/blocks.0.attn.wq.weight/exp_avg": target},
                piece_bytes=piece_bytes,
            )
            assert_bit_equal(unflatten(layout, None, buffer), restored)
            assert restored["optim"]["blocks.0.attn.wq.weight"]["exp_avg"] is target
        region.array[layout.entries[0].offset] ^= 0x01
        with pytest.raises(SnapshotCorruptError) as raised:
            read_verified(layout, reader.read_into, sums)
        assert raised.value.entry == layout.entries[0].name
        region.array[layout.entries[0].offset] ^= 0x01
        with pytest.raises(EOFError, match="ends at"):
            reader.read_into(layout.total_bytes, memoryview(bytearray(100)))
    restored["model"]["norm.weight"].add_(1.0)  # its own memory: the region is untouched
    assert np.array_equal(region.array, buffer)
    region.close()


def test_reservations_keep_a_quarter_of_the_host_memory_available():
    assert shm.can_reserve(0)
    assert not shm.can_reserve(1 << 60)  # more than any host has


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
25 22 0:21 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw,size=24684084k
31 22 0:30 / /mnt/huge\\040shm rw,relatime shared:9 - tmpfs tmpfs rw,size=4194304k,huge=within_size
32 22 0:31 / /mnt/pages rw,relatime shared:10 - hugetlbfs hugetlbfs rw,pagesize=2M
"""


def test_describe_dir_reads_the_mount_that_holds_the_directory(tmp_path):
    describe = shm.describe_dir
    assert describe("/dev/shm", MOUNTINFO) == {
        "path": "/dev/shm",
        "fs_type": "tmpfs",
        "in_memory": True,
        "huge_pages": "never",
    }
    # The longest mount point containing the path wins; an escaped space is unescaped.
    huge = describe("/mnt/huge shm/job", MOUNTINFO)
    assert (huge["fs_type"], huge["huge_pages"]) == ("tmpfs", "within_size")
    assert describe("/mnt/pages", MOUNTINFO)["huge_pages"] == "always"
    on_disk = describe("/var/lib/regions", MOUNTINFO)
    assert (on_disk["fs_type"], on_disk["in_memory"], on_disk["huge_pages"]) == (
        "ext4",
        False,
        None,
    )
    assert describe("/x", "")["fs_type"] is None
    assert "NOT in memory" in shm.describe_text(on_disk)
    assert "4 KiB pages" in shm.describe_text(describe("/dev/shm", MOUNTINFO))
    assert "2 MiB pages" in shm.describe_text(huge)
    # On this machine: whatever holds the default directory is described without error.
    assert shm.describe_dir()["path"] == os.path.realpath(shm.shm_dir())


def test_shm_dir_settings_reach_remote_processes_and_are_checked(tmp_path, monkeypatch):
    monkeypatch.delenv(shm.SHM_DIR_ENV, raising=False)
    assert shm.env_vars("") == {}
    assert shm.env_vars("/mnt/regions") == {shm.SHM_DIR_ENV: "/mnt/regions"}
    monkeypatch.setenv(shm.SHM_DIR_ENV, str(tmp_path))
    assert shm.env_vars("") == {shm.SHM_DIR_ENV: str(tmp_path)}  # the driver's own setting
    with pytest.raises(ValueError, match=r"snapshot\.shm_dir='/no/such/dir' is not a directory"):
        shm.check_dir("/no/such/dir")
    # A directory on a disk filesystem is refused; one in memory (or unknown) passes.
    monkeypatch.setattr(shm, "describe_dir", lambda path: {"in_memory": False, "fs_type": "ext4"})
    with pytest.raises(ValueError, match="is on ext4, not in memory"):
        shm.check_dir(tmp_path)
    monkeypatch.setattr(shm, "describe_dir", lambda path: {"in_memory": True, "fs_type": "tmpfs"})
    assert shm.check_dir(tmp_path) == tmp_path
    monkeypatch.setattr(shm, "describe_dir", lambda path: {"in_memory": None, "fs_type": None})
    assert shm.check_dir(tmp_path) == tmp_path


def test_regions_are_listed_and_removed_in_a_given_directory(tmp_path, job_id):
    directory = tmp_path / "regions"
    directory.mkdir()
    name = shm.region_name(job_id, "elsewhere")
    (directory / name).write_bytes(b"x")
    assert shm.list_regions(shm.job_prefix(job_id)) == []  # not in the default directory
    assert shm.list_regions(shm.job_prefix(job_id), directory) == [name]
    assert shm.remove_regions(shm.job_prefix(job_id), directory) == [name]
    assert not (directory / name).exists()
    assert shm.list_regions(shm.job_prefix(job_id), tmp_path / "missing") == []

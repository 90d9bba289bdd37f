"""An offloaded job killed mid-step resumes from its durable checkpoint bit-identically."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from offload_helpers import lm_loss, offload_config, optim_config, tiny_gpt
from safetensors.torch import load_file

from stalwart.offload.engine import OffloadEngine

HERE = Path(__file__).parent


def _run(tmp_path, *args):
    environment = dict(
        os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    )
    return subprocess.run(
        [sys.executable, str(HERE / "resume_job.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
        env=environment,
        cwd=tmp_path,
    )


def test_killed_job_resumes_bit_identical(tmp_path):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    total_steps = 4
    straight = _run(
        tmp_path,
        nvme,
        tmp_path / "ckpt-straight",
        total_steps,
        -1,
        "fresh",
        tmp_path / "straight.safetensors",
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = _run(
        tmp_path, nvme, tmp_path / "ckpt", total_steps, 3, "fresh", tmp_path / "unused.safetensors"
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "unused.safetensors").exists()

    resumed = _run(
        tmp_path,
        nvme,
        tmp_path / "ckpt",
        total_steps,
        -1,
        "resume",
        tmp_path / "resumed.safetensors",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert report == {"started_at": 2, "step_count": total_steps}

    expected = load_file(tmp_path / "straight.safetensors")
    actual = load_file(tmp_path / "resumed.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_checkpoint_shards_round_trip_in_process(tmp_path):
    """Streaming export/import without the durable tier: layout entries and bytes agree."""
    first = OffloadEngine(
        tiny_gpt(seed=1), offload_config(tmp_path), optim_config(), loss_fn=lm_loss
    )
    tokens = torch.randint(0, 259, (2, 13), generator=torch.Generator().manual_seed(0))
    first.train_step([(tokens[:, :-1], tokens[:, 1:])], lr=1e-2)
    shard = first.checkpoint_shards()["offload"]
    layout = shard.layout
    data = bytearray(layout["total_bytes"])
    shard.read_into(0, memoryview(data))
    names = {entry["name"] for entry in layout["entries"]}
    assert "param/blocks.0.attn.wq.weight" in names and "exp_avg_sq/lm_head.weight" in names
    entry = next(e for e in layout["entries"] if e["name"] == "param/norm.weight")
    partial = bytearray(entry["nbytes"])
    shard.read_into(entry["offset"], memoryview(partial))  # an unaligned read of one tensor
    assert torch.equal(
        torch.frombuffer(partial, dtype=torch.float32), first.gather_parameters()["norm.weight"]
    )

    second = OffloadEngine(
        tiny_gpt(seed=2), offload_config(tmp_path), optim_config(), loss_fn=lm_loss
    )
    second.load_checkpoint_shards({"offload": (memoryview(data), layout)})
    assert second.step_count == 1
    for name, tensor in first.gather_parameters().items():
        assert torch.equal(tensor, second.gather_parameters()[name]), name
    first.close()
    second.close()


def test_streaming_checkpoint_restores_without_loading_the_shard(tmp_path):
    """The durable tier's streaming reader verifies the file, then the store is filled from it
    piece by piece; a flipped byte is caught before anything is read."""
    import pytest
    from offload_helpers import batches

    from stalwart.snapshot.persist import (
        CheckpointCorruptError,
        checkpoint_dir,
        open_checkpoint_streaming,
        write_checkpoint,
    )

    optim = optim_config(grad_clip=1.0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    options = dict(loss_fn=lm_loss, optimizer_kernel="torch", aio_backend="threadpool")
    trained = OffloadEngine(tiny_gpt(), offload_config(tmp_path / "a"), optim, **options)
    for micro_batches in batches(2, num_micro=1, vocab=259):
        trained.train_step(micro_batches, 1e-2)
    write_checkpoint(tmp_path / "run", 2, trained.checkpoint_shards(), {"step": 2}, keep=1)
    restored = OffloadEngine(tiny_gpt(seed=3), offload_config(tmp_path / "b"), optim, **options)
    restored.load_checkpoint_shards(
        open_checkpoint_streaming(tmp_path / "run", 2, names=["offload"])
    )
    expected, actual = trained.gather_parameters(), restored.gather_parameters()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert restored.step_count == 2

    shard_file = next(checkpoint_dir(tmp_path / "run", 2).glob("*.safetensors"))
    data = bytearray(shard_file.read_bytes())
    data[-100] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="xxh3-64"):
        open_checkpoint_streaming(tmp_path / "run", 2, names=["offload"])
    trained.close()
    restored.close()

"""Metric sinks: complete JSONL lines even after a crash, readable progress, TensorBoard events,
loss plots with markers, and the `stalwart report` entry points."""

import argparse
import io
import json
import math
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from stalwart.trainer.metrics import (
    JsonlSink,
    MultiSink,
    StdoutSink,
    TensorBoardSink,
    add_report_arguments,
    build_sinks,
    format_metrics,
    plot_run,
    read_metrics,
    run_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_jsonl_lines_are_complete_and_flushed_before_close(tmp_path):
    sink = JsonlSink(tmp_path)
    for step in range(1, 4):
        sink.log({"loss": 3.0 / step, "lr": torch.tensor(0.01), "skipped": False}, step)
    # Read while the sink is still open: every line must already be on disk.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] == 1.5 and records[1]["lr"] == pytest.approx(0.01)
    assert all(isinstance(r["time_s"], float) for r in records)
    sink.log({"loss": float("nan")}, 4)
    sink.close()
    assert math.isnan(read_metrics(tmp_path)[-1]["loss"])
    with pytest.raises(ValueError, match="metric 'note' has value 'hi'"):
        JsonlSink(tmp_path).log({"note": "hi"}, 5)


def test_jsonl_survives_a_crash_without_close(tmp_path):
    script = textwrap.dedent(
        f"""
        import os
        from stalwart.trainer.metrics import JsonlSink
        sink = JsonlSink({str(tmp_path)!r})
        for step in range(1, 6):
            sink.log({{"loss": 1.0 / step}}, step)
        os._exit(1)  # no close, no interpreter shutdown: what a killed worker looks like
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == 1, result.stderr.decode()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_a_torn_last_line_is_cut_when_the_run_resumes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    sink = JsonlSink(tmp_path)
    sink.log({"loss": 1.9}, 2)
    sink.close()
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 2 and all(line.endswith("}\n") for line in lines)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 2.0), (2, 1.9)]


def test_progress_lines_are_readable():
    stream = io.StringIO()
    sink = StdoutSink(max_steps=500, progress="lines", stream=stream)
    metrics = {
        "loss": 2.345678,
        "lr": 3e-4,
        "grad_norm": 0.8123,
        "tokens_per_s": 12345.0,
        "step_time_s": 0.25,
        "skipped": 0.0,
        "reward": 0.5,
    }
    sink.log(metrics, 12)
    sink.log(metrics | {"skipped": 1.0}, 22)
    first, second = stream.getvalue().splitlines()
    assert first == (
        "step  12/500 | loss 2.3457 | lr 3.00e-04 | grad 0.812 | tok/s 12.3k | time 250ms | reward 0.5"
    )
    assert "skipped 1" in second and "eta " in second
    assert format_metrics({"tokens_per_s": 2.5e6}) == "tok/s 2.5M"


def test_worker_records_keep_their_step_and_hide_namespaced_detail(tmp_path):
    record = {"loss": 1.5, "step": 7, "attempt": 0, "snapshot/last_copy_s": 0.01}
    stream = io.StringIO()
    StdoutSink(progress="lines", stream=stream).log(record, 7)
    assert stream.getvalue() == "step 7 | loss 1.5000\n"
    stream = io.StringIO()
    StdoutSink(progress="lines", stream=stream, extra_keys=["snapshot/last_copy_s"]).log(
        record | {"attempt": 1}, 7
    )
    assert stream.getvalue() == "step 7 | loss 1.5000 | snapshot/last_copy_s 0.01\n"
    assert format_metrics(record | {"attempt": 2}) == "loss 1.5000 | attempt 2"
    sink = JsonlSink(tmp_path)
    sink.log(record, 7)
    sink.close()
    (logged,) = read_metrics(tmp_path)
    assert logged["step"] == 7 and isinstance(logged["step"], int)
    assert logged["snapshot/last_copy_s"] == 0.01


def test_progress_bar_mode_draws_a_tqdm_bar():
    stream = io.StringIO()
    sink = StdoutSink(max_steps=10, progress="bar", stream=stream)
    sink.log({"loss": 1.25}, 3)
    sink.log({"loss": 1.0}, 4)
    sink.close()
    output = stream.getvalue()
    assert "4/10" in output and "loss 1.0000" in output
    # A StringIO is not a terminal: auto falls back to lines.
    assert StdoutSink(progress="auto", stream=io.StringIO()).progress == "lines"


def test_build_sinks_only_rank_zero_logs(tmp_path, capsys):
    config = SimpleNamespace(
        progress="lines", progress_keys=None, tensorboard=False, tensorboard_dir=None, fsync=True
    )
    silent = build_sinks(config, tmp_path / "rank1", rank=1)
    silent.log({"loss": 1.0}, 1)
    silent.close()
    assert not (tmp_path / "rank1").exists()
    assert capsys.readouterr().out == ""

    sinks = build_sinks(config, tmp_path / "rank0", rank=0, max_steps=5)
    sinks.log({"loss": 1.0}, 1)
    sinks.close()
    assert [type(s).__name__ for s in sinks.sinks] == ["JsonlSink", "StdoutSink"]
    assert read_metrics(tmp_path / "rank0")[0]["loss"] == 1.0
    assert capsys.readouterr().out.startswith("step 1/5 | loss 1.0000")


def test_tensorboard_sink_writes_an_event_file_with_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = SimpleNamespace(progress="off", tensorboard=True, tensorboard_dir=None, fsync=False)
    sinks = build_sinks(config, tmp_path, rank=0)
    for step in (1, 2, 3):
        sinks.log({"loss": 4.0 - step, "lr": 0.1}, step)
    sinks.close()
    event_files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 3.0), (2, 2.0), (3, 1.0)]


def test_tensorboard_missing_gives_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardSink(tmp_path)


def test_multi_sink_closes_every_sink_even_when_one_fails():
    closed = []

    class Failing:
        def log(self, metrics, step):
            pass

        def close(self):
            closed.append("failing")
            raise RuntimeError("disk full")

    class Fine(Failing):
        def close(self):
            closed.append("fine")

    with pytest.raises(RuntimeError, match="disk full"):
        MultiSink([Failing(), Fine()]).close()
    assert closed == ["failing", "fine"]


def write_run(run_dir):
    """A run that crashed after step 6 and resumed from the snapshot of step 4."""
    sink = JsonlSink(run_dir)
    for step in range(1, 7):
        sink.log({"loss": 10.0 - step}, step)
    sink.log_event("kill_node", 6)
    for step in range(5, 11):
        sink.log({"loss": 5.0 - 0.1 * step}, step)
        if step % 5 == 0:
            sink.log({"eval_loss": 5.5 - 0.1 * step}, step)
    sink.close()


def test_plot_run_writes_a_png_with_markers(tmp_path):
    write_run(tmp_path)
    out = plot_run(tmp_path, tmp_path / "plots" / "loss.png", markers={3: "slow node", 6: "kill"})
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    # Without explicit markers the logged events are drawn; the figure differs.
    default = plot_run(tmp_path, tmp_path / "events.png")
    assert default.read_bytes().startswith(PNG_MAGIC)
    assert default.read_bytes() != data
    (tmp_path / "empty").mkdir()
    JsonlSink(tmp_path / "empty").log({"lr": 1.0}, 1)
    with pytest.raises(ValueError, match="no 'loss' values"):
        plot_run(tmp_path / "empty", tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="no metrics at"):
        plot_run(tmp_path / "missing", tmp_path / "x.png")


def test_report_entry_points_use_the_resumed_values(tmp_path, capsys):
    write_run(tmp_path)
    parser = add_report_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(tmp_path), "--marker", "6:node-lost", "--marker", "8"])
    assert args.marker == [(6, "node-lost"), (8, "")]
    assert run_report(args) == 0
    output = capsys.readouterr().out
    # Steps 5 and 6 were replayed after the resume: the later values count.
    assert "10 steps (1..10), final loss 4.0000, best 4.0000 at step 10" in output
    assert f"loss curve written to {tmp_path / 'loss.png'}" in output
    assert (tmp_path / "loss.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(SystemExit):
        parser.parse_args([str(tmp_path), "--marker", "six"])

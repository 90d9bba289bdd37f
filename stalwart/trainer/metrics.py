"""Metric sinks: one interface (`log(metrics, step)`, `close()`), several backends.

- `JsonlSink` is always on: `run_dir/metrics.jsonl`, one JSON object per line with `step` and
  wall-clock `time_s`, flushed after every line so a crashed process loses nothing it logged.
  Reopening the file (a resumed run) appends; a line torn by a crash is cut off first.
- `StdoutSink` prints rank 0's progress: a tqdm bar on a terminal, plain lines otherwise.
- `TensorBoardSink` is optional and imported only when asked for.
- `build_sinks` picks them from the `metrics` config section; ranks other than 0 log nothing.

`read_metrics` and `plot_run` read a run back (the `stalwart report` command): the loss curve
as a PNG, with vertical markers at given steps, e.g. where failures were injected.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

METRICS_FILE = "metrics.jsonl"
EVENT_KEY = "event"


class MetricSink(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _as_float(key: str, value: Any) -> float:
    if hasattr(value, "item"):  # 0-d tensors and numpy scalars
        value = value.item()
    if isinstance(value, bool | int | float):
        return float(value)
    raise ValueError(
        f"metric {key!r} has value {value!r} of type {type(value).__name__}; log numbers only"
    )


# Every record carries these itself; a metric of the same name (a worker's record that
# includes its step) would only duplicate or contradict them.
_RESERVED_KEYS = {"step", "time_s"}


def _as_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        str(key): _as_float(key, value)
        for key, value in metrics.items()
        if key not in _RESERVED_KEYS
    }


# ---------------------------------------------------------------------------------------------
# JSONL


class JsonlSink:
    """Append-only `metrics.jsonl`; `fsync=True` also survives a power loss, at a cost per line."""

    def __init__(
        self, run_dir: str | os.PathLike, filename: str = METRICS_FILE, fsync: bool = False
    ):
        self.path = Path(run_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        _cut_torn_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        # NaN and inf are written as the JSON extensions NaN/Infinity (Python reads them back):
        # a diverging loss is exactly what the log must keep.
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._write({"step": int(step), "time_s": round(time.time(), 3), **_as_floats(metrics)})

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        """A labelled point in the run (a failure, a recovery); `plot_run` draws it."""
        self._write(
            {"step": int(step), "time_s": round(time.time(), 3), EVENT_KEY: event, **fields}
        )

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (the process died mid-write)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        content = handle.read()
        handle.truncate(content.rfind(b"\n") + 1)


# ---------------------------------------------------------------------------------------------
# Stdout


def _compact_number(value: float) -> str:
    magnitude = abs(value)
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= threshold:
            return f"{value / threshold:.3g}{suffix}"
    return f"{value:.3g}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


# key -> (label, format); keys not listed are shown as `key value` with 4 significant digits.
_KNOWN_FIELDS: dict[str, tuple[str, Any]] = {
    "loss": ("loss", lambda v: f"{v:.4f}"),
    "eval_loss": ("eval", lambda v: f"{v:.4f}"),
    "lr": ("lr", lambda v: f"{v:.2e}"),
    "grad_norm": ("grad", lambda v: f"{v:.3f}"),
    "tokens_per_s": ("tok/s", _compact_number),
    "step_time_s": ("time", lambda v: f"{v * 1000:.0f}ms" if v < 10 else f"{v:.1f}s"),
}
# Flags are shown only when set, so a healthy run's line stays short.
_FLAGS = {"skipped", "attempt"}


def format_metrics(metrics: Mapping[str, float], extra_keys: Sequence[str] | None = None) -> str:
    """`loss 2.3456 | lr 3.00e-04 | grad 0.812 | tok/s 12.3k | ...` in a stable order.

    After the known fields come `extra_keys` when given, else every other top-level key:
    namespaced keys (`snapshot/last_copy_s`) are detail for the JSONL file and TensorBoard.
    """
    parts = []
    for key, (label, formatter) in _KNOWN_FIELDS.items():
        if key in metrics:
            parts.append(f"{label} {formatter(metrics[key])}")
    if extra_keys is None:
        extra_keys = [key for key in metrics if "/" not in key]
    for key in extra_keys:
        value = metrics.get(key)
        if value is None or key in _KNOWN_FIELDS or key in _RESERVED_KEYS:
            continue
        if key in _FLAGS and not value:
            continue
        parts.append(f"{key} {value:.4g}")
    return " | ".join(parts)


class StdoutSink:
    """Rank 0's progress: `progress="bar"` (tqdm), `"lines"` (one line per log), or `"auto"`
    (a bar on a terminal, lines otherwise, e.g. in a Ray job log)."""

    def __init__(
        self,
        max_steps: int | None = None,
        progress: str = "auto",
        stream: TextIO | None = None,
        extra_keys: Sequence[str] | None = None,
    ):
        if progress not in ("auto", "bar", "lines"):
            raise ValueError(f"metrics.progress must be auto, bar or lines, got {progress!r}")
        self.stream = stream if stream is not None else sys.stdout
        self.max_steps = max_steps
        self.extra_keys = list(extra_keys) if extra_keys is not None else None
        if progress == "auto":
            progress = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.progress = progress
        self._bar = None
        self._first: tuple[float, int] | None = None  # (time, step) of the first log: rate, ETA

    def _step_text(self, step: int) -> str:
        if self.max_steps:
            width = len(str(self.max_steps))
            return f"step {step:>{width}}/{self.max_steps}"
        return f"step {step}"

    def _eta_text(self, step: int) -> str:
        now = time.perf_counter()
        if self._first is None:
            self._first = (now, step)
            return ""
        started, first_step = self._first
        if not self.max_steps or step <= first_step or step >= self.max_steps:
            return ""
        remaining_s = (self.max_steps - step) * (now - started) / (step - first_step)
        return f" | eta {_duration(remaining_s)}"

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        metrics = _as_floats(metrics)
        if self.progress == "bar":
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(
                    total=self.max_steps,
                    initial=step,
                    file=self.stream,
                    unit="step",
                    dynamic_ncols=True,
                )
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(format_metrics(metrics, self.extra_keys), refresh=True)
            return
        eta = self._eta_text(step)
        line = format_metrics(metrics, self.extra_keys)
        self.stream.write(f"{self._step_text(step)} | {line}{eta}\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---------------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardSink:
    def __init__(self, log_dir: str | os.PathLike, flush_s: float = 10.0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "metrics.tensorboard is true but tensorboard is not installed: "
                "pip install tensorboard (or pip install 'stalwart[tensorboard]'), "
                "or set metrics.tensorboard=false"
            ) from error
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_s)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in _as_floats(metrics).items():
            self._writer.add_scalar(key, value, global_step=int(step))

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


# ---------------------------------------------------------------------------------------------
# Composition


class MultiSink:
    """Fans out to several sinks; an empty one (ranks other than 0) logs nothing."""

    def __init__(self, sinks: Iterable[MetricSink] = ()):
        self.sinks = list(sinks)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def log_event(self, event: str, step: int, **fields: Any) -> None:
        for sink in self.sinks:
            if hasattr(sink, "log_event"):
                sink.log_event(event, step, **fields)

    def close(self) -> None:
        # Close every sink even if one fails, then report the first failure.
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as error:
                errors.append(error)
        if errors:
            raise errors[0]

    def __enter__(self) -> MultiSink:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def build_sinks(
    metrics_config, run_dir: str | os.PathLike, rank: int, max_steps: int | None = None
) -> MultiSink:
    """The sinks `metrics_config` (the run's `metrics` section) asks for; nothing off rank 0."""
    if rank != 0:
        return MultiSink()
    run_dir = Path(run_dir)
    sinks: list[MetricSink] = [JsonlSink(run_dir, fsync=getattr(metrics_config, "fsync", False))]
    progress = getattr(metrics_config, "progress", "auto")
    if progress != "off":
        extra_keys = getattr(metrics_config, "progress_keys", None)
        sinks.append(StdoutSink(max_steps=max_steps, progress=progress, extra_keys=extra_keys))
    if getattr(metrics_config, "tensorboard", False):
        log_dir = getattr(metrics_config, "tensorboard_dir", None) or run_dir / "tensorboard"
        sinks.append(TensorBoardSink(log_dir))
    return MultiSink(sinks)


# ---------------------------------------------------------------------------------------------
# Reading a run back


def _metrics_path(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics at {path}: is {run_dir} a run directory?")
    return path


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of `run_dir/metrics.jsonl` (or of that file itself), in file order.

    A resumed run replays steps after the snapshot it resumed from, so a step may appear more
    than once; the later record is the one the run kept (`plot_run` uses it).
    """
    path = _metrics_path(run_dir)
    records, num_bad = [], 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                num_bad += 1
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
            else:
                num_bad += 1
    if num_bad:
        warnings.warn(f"{path}: skipped {num_bad} unreadable line(s)", stacklevel=2)
    return records


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) for `key`, the last record winning for a repeated step."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            by_step[int(record["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


MarkerSpec = Mapping[int, str] | Sequence[tuple[int, str]] | Sequence[int]


def _normalise_markers(markers: MarkerSpec | None) -> list[tuple[int, str]]:
    if markers is None:
        return []
    items = markers.items() if isinstance(markers, Mapping) else markers
    normalised = []
    for item in items:
        step, label = (item, "") if isinstance(item, int) else item
        normalised.append((int(step), str(label)))
    return normalised


def plot_run(
    run_dir: str | os.PathLike,
    out_png: str | os.PathLike,
    markers: MarkerSpec | None = None,
    title: str | None = None,
) -> Path:
    """Draw the run's loss (and eval loss, when logged) against the step into a PNG.

    `markers` are vertical lines with labels, e.g. `{120: "node lost"}`. Without `markers`,
    the events logged through `JsonlSink.log_event` are drawn.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(run_dir)
    loss_keys = [key for key in ("loss", "eval_loss") if any(key in r for r in records)]
    loss_keys += sorted(
        {key for r in records for key in r if key.endswith("_loss")} - set(loss_keys)
    )
    if "loss" not in loss_keys:
        raise ValueError(f"{_metrics_path(run_dir)}: no 'loss' values to plot")
    if markers is None:
        markers = [(int(r["step"]), str(r[EVENT_KEY])) for r in records if EVENT_KEY in r]

    # The Agg canvas directly: no global backend switch, safe inside any process.
    figure = Figure(figsize=(9, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key in loss_keys:
        steps, values = _series(records, key)
        finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
        if not finite:
            continue
        style = {"linewidth": 1.4} if key == "loss" else {"marker": "o", "markersize": 3}
        axes.plot([s for s, _ in finite], [v for _, v in finite], label=key, **style)
    for index, (step, label) in enumerate(_normalise_markers(markers)):
        axes.axvline(
            step,
            color="tab:red",
            linestyle="--",
            linewidth=1.0,
            alpha=0.8,
            label="marker" if index == 0 else None,
        )
        if label:
            axes.text(
                step,
                0.98,
                f" {label}",
                transform=axes.get_xaxis_transform(),
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
                color="tab:red",
            )
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title or Path(run_dir).resolve().name)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=120)
    return out_png


# ---------------------------------------------------------------------------------------------
# `stalwart report <run_dir>`


def _parse_marker(text: str) -> tuple[int, str]:
    step, _, label = text.partition(":")
    try:
        return int(step), label
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"marker {text!r} must be STEP or STEP:LABEL, e.g. 120:node-lost"
        ) from None


def add_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("run_dir", help="a run directory (holding metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/loss.png)")
    parser.add_argument(
        "--marker",
        action="append",
        type=_parse_marker,
        default=None,
        metavar="STEP[:LABEL]",
        help="vertical line at STEP (repeatable); default: the events the run logged",
    )
    return parser


def run_report(args: argparse.Namespace) -> int:
    out_png = Path(args.out) if args.out else Path(args.run_dir) / "loss.png"
    plot_run(args.run_dir, out_png, markers=args.marker)
    steps, losses = _series(read_metrics(args.run_dir), "loss")
    finite = [(v, s) for s, v in zip(steps, losses) if math.isfinite(v)]
    summary = f"{len(steps)} steps ({steps[0]}..{steps[-1]}), final loss {losses[-1]:.4f}"
    if finite:
        best_loss, best_step = min(finite)
        summary += f", best {best_loss:.4f} at step {best_step}"
    print(summary)
    print(f"loss curve written to {out_png}")
    return 0

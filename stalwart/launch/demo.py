"""`stalwart demo` (what `make demo` runs): the promise, shown end to end on one machine.

A local 3-node Ray cluster (2 active nodes + 1 spare) trains the tiny GPT on the arithmetic
task with DDP, in-memory erasure-coded snapshots every step, and standby workers (Trainers
built ahead, so a recovery is a rendezvous and a state load, not process starts). A worker process is killed,
later a whole node is removed; the controller recovers from memory both times (the second time
rebuilding the lost node's state from parity on the spare). The demo then runs the same job
without faults and checks that the final parameters and optimizer state are bit-identical,
prints the recovery table and writes a PNG with both loss curves and the failure points.
"""

from __future__ import annotations

import time
from pathlib import Path

from stalwart.config import config_from_dict
from stalwart.launch.faults import states_equal
from stalwart.launch.job import run_job

MAX_STEPS = 60
WORKER_KILL_STEP = 20
NODE_LOSS_STEP = 40


def demo_config(run_dir: Path, faults: list[dict]) -> dict:
    return {
        "name": "demo",
        "run_dir": str(run_dir),
        "model": {"depth": 2, "context_length": 32},
        "data": {"kind": "arithmetic", "num_examples": 8000, "max_operand": 99},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "trainer": {"max_steps": MAX_STEPS, "batch_size": 16, "seed": 0, "num_threads": 1},
        "parallel": {"strategy": "ddp", "world_size": 2},
        "cluster": {
            "num_nodes": 2,
            "num_spare_nodes": 1,
            "cpus_per_worker": 1,
            "hang_timeout_s": 60,
            "standby_workers": True,
        },
        "snapshot": {
            "every_steps": 1,
            "persist_every": 20,
            "erasure": {"group_size": 2, "parity": 1},
        },
        "faults": {"events": faults},
        "metrics": {"progress": "lines"},
    }


def _plot(reference: dict, faulted: dict, recoveries, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    clean = [(r["step"], r["loss"]) for r in reference["history"] if "loss" in r]
    axis.plot(*zip(*clean), label="uninterrupted run", linewidth=2.5, alpha=0.6)
    by_attempt: dict[int, list] = {}
    for record in faulted["history"]:
        if "loss" in record:
            by_attempt.setdefault(record["attempt"], []).append((record["step"], record["loss"]))
    for attempt, points in sorted(by_attempt.items()):
        label = "with faults" if attempt == 0 else f"after recovery {attempt}"
        axis.plot(*zip(*points), linestyle="--" if attempt else "-", label=label)
    for fault in faulted["faults_at"]:
        axis.axvline(fault["step"], color="red", linestyle=":", alpha=0.8)
        axis.annotate(
            fault["label"], (fault["step"], axis.get_ylim()[1]), rotation=90, va="top", color="red"
        )
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.set_title("stalwart: recovery from a worker kill and a node loss, bit-for-bit")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_png, dpi=120)
    plt.close(figure)


def run_demo(root: Path = Path("runs/demo"), log=print) -> bool:
    root = Path(root)
    faults = [
        {"kind": "kill_worker", "step": WORKER_KILL_STEP, "phase": "backward", "rank": 1},
        {"kind": "kill_node", "step": NODE_LOSS_STEP, "node": 0},
    ]
    started = time.perf_counter()
    log(
        f"== run with faults: kill rank 1 at step {WORKER_KILL_STEP}, remove node 0 at step {NODE_LOSS_STEP}"
    )
    log(
        "   (Ray reports each killed process and removed node itself, in lines that start with "
        "'(raylet)': those are the injected faults, expected)"
    )
    faulted = run_job(config_from_dict(demo_config(root / "faulted", faults)), log=log)
    log("== the same job without faults (reference)")
    reference = run_job(config_from_dict(demo_config(root / "reference", [])), log=log)

    recoveries = faulted["recoveries"]
    faulted["faults_at"] = [
        {"step": fault["at_step"] if "at_step" in fault else fault["step"], "label": fault["kind"]}
        for fault in faulted["faults"]
    ] + [{"step": WORKER_KILL_STEP, "label": "kill_worker"}]
    out_png = root / "demo.png"
    _plot(reference, faulted, recoveries, out_png)

    log("")
    log(
        f"{'failure':<10}{'restored':>10}{'source':>10}{'lost':>6}{'detect s':>10}{'rebuild s':>11}{'restart s':>11}{'total s':>9}"
    )
    for recovery in recoveries:
        log(
            f"{recovery.kind:<10}{recovery.restored_version!s:>10}{recovery.source:>10}{recovery.lost_steps:>6}"
            f"{recovery.detection_s:>10.2f}{recovery.rebuild_s:>11.2f}{recovery.restart_s:>11.2f}{recovery.total_s:>9.2f}"
        )
    same, detail = states_equal(reference["state"], faulted["state"])
    from_memory = (
        all(r.source in ("memory", "erasure") for r in recoveries) and len(recoveries) >= 2
    )
    log("")
    log(f"recoveries from memory: {'yes' if from_memory else 'NO'} ({len(recoveries)})")
    log(f"final parameters and optimizer state vs the uninterrupted run: {detail}")
    log(f"loss plot with failure points: {out_png}")
    log(f"metrics: {root / 'faulted' / 'metrics.jsonl'} and {root / 'reference' / 'metrics.jsonl'}")
    log(f"demo took {time.perf_counter() - started:.0f} s")
    return same and from_memory

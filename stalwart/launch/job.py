"""Run a training job end to end: cluster, controller, metrics, summary; and `resume`."""

from __future__ import annotations

import time
from pathlib import Path

from stalwart.config import RunConfig, load_config
from stalwart.launch.cluster import connect
from stalwart.launch.controller import JobController


def cpus_per_node(config: RunConfig) -> float:
    # One CPU slot per worker plus room for the node's snapshot manager (which asks for none).
    return config.cluster.workers_per_node * config.cluster.cpus_per_worker


def run_job(
    config: RunConfig,
    *,
    address: str | None = None,
    run_dir: Path | None = None,
    resume_step: int | None = None,
    log=print,
) -> dict:
    """Train `config` on a Ray cluster; returns the controller's summary (plus the final state)."""
    from stalwart.trainer.metrics import build_sinks, plot_run

    run_dir = Path(run_dir or config.resolved_run_dir())
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster = connect(
        address,
        num_nodes=config.cluster.num_nodes,
        num_spare_nodes=config.cluster.num_spare_nodes,
        cpus_per_node=cpus_per_node(config),
    )
    sinks = build_sinks(config.metrics, run_dir, rank=0, max_steps=config.trainer.max_steps)
    controller = JobController(config, cluster, run_dir, sinks=sinks, log=log)
    started = time.perf_counter()
    try:
        controller.start(resume_step=resume_step)
        summary = controller.run()
        summary["state"] = controller.state_arrays()
        summary["wall_s"] = time.perf_counter() - started
        summary["history"] = controller.history
    finally:
        sinks.close()
        controller.shutdown()
        cluster.shutdown()
    plot = plot_run(run_dir, run_dir / "loss.png")
    log(
        f"done: {summary['step']} steps in {summary['wall_s']:.1f} s, "
        f"{len(summary['recoveries'])} recoveries; metrics {run_dir / 'metrics.jsonl'}, plot {plot}"
    )
    return summary


def resume_job(
    run_dir: Path, *, overrides: list[str] | None = None, address: str | None = None, log=print
) -> dict:
    """Start a stopped run again from its newest durable checkpoint, with its saved config."""
    from stalwart.snapshot.persist import list_checkpoints, newest_usable_step

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: is it a stalwart run directory?")
    if (run_dir / "rl_state").is_dir():
        raise ValueError(f"{run_dir} is an RL run: resume it with `stalwart rl resume {run_dir}`")
    config = load_config(config_path, overrides)
    if not list_checkpoints(run_dir):
        raise FileNotFoundError(
            f"{run_dir} has no durable checkpoint; set snapshot.persist_every to write one"
        )
    # Manifests and file sizes here; each worker checks its own shard's data as it loads it,
    # and a shard that fails sends the job to the next older checkpoint (JobController.start).
    step = newest_usable_step(run_dir, log=log, checksums=False)
    if step is None:
        raise FileNotFoundError(f"{run_dir}: no durable checkpoint is complete (see above)")
    log(f"resuming {run_dir} from the durable checkpoint of step {step}")
    return run_job(config, address=address, run_dir=run_dir, log=log, resume_step=step)

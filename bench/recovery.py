"""Recovery time: from a failure to the first completed step after it, memory vs durable tier.

Two jobs of the same 2-node DDP run (a GPT with >= 100M parameters, AdamW, snapshots every
step, one spare node) run through the real `JobController` on an embedded Ray cluster:

  job "memory"   RS(g=2, m=1) parity; a worker is SIGKILLed (restored from its node manager's
                 memory), later a node is removed (rebuilt on the spare from the survivor's
                 parity, then restored from memory);
  job "durable"  no parity (m=0); a node is removed, the erasure code cannot cover it, and the
                 run falls back to the newest checkpoint of the durable tier, read cold
                 (evicted from the page cache first, as shared storage would be).

For each recovery the controller's `Recovery` record gives detection, teardown, rebuild and
restart (rendezvous and state load of the standby workers that take over, or with --no-standby
new worker processes and Trainer builds as well); the first step after the recovery completes
`step_time_s` later. Failure-to-first-step = the record's total + that step.

Restart itself is mostly process start on this machine, so the restore phase is also timed on
its own, each in a fresh process that starts Python, imports torch and stalwart, builds the
same Trainer (one rank's state), restores the same state, and takes one step:
  memory      views over a shared-memory region laid out as the manager holds it (`load_snapshot`);
  durable     `restore.load_from_durable` on a two-rank checkpoint evicted from the page cache;
  torch_load  `torch.load` of a `torch.save` file evicted from the page cache + load_state_dict.
The plain torch.load restart of the same state is then estimated as the worker-kill recovery's
detection + teardown, plus this probe's process start, build, restore and first step.

    python bench/recovery.py                     # the table (several minutes)
    python bench/recovery.py --json out.json
    python bench/recovery.py --small             # tiny model: checks the plumbing only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SPEEDUP = 5.0
PROBE_SOURCES = ("memory", "durable", "torch_load")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model (plumbing check)")
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--width", type=int, default=832, help="12 x 832 gives ~100M parameters")
    parser.add_argument("--num-heads", type=int, default=13)
    parser.add_argument("--context-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--no-standby",
        action="store_true",
        help="cluster.standby_workers: false (every recovery starts fresh worker processes)",
    )
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument(
        "--shm-dir",
        default="",
        help="directory of the snapshot regions (snapshot.shm_dir; default /dev/shm); a tmpfs "
        "mounted with huge=within_size gives them 2 MiB pages",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--probe", nargs=3, metavar=("SOURCE", "CONFIG_JSON", "ARTIFACT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.small:
        args.depth, args.width, args.num_heads, args.context_length = 1, 64, 1, 16
    return args


def job_config(
    args: argparse.Namespace,
    *,
    name: str,
    parity: int,
    faults: list[dict],
    max_steps: int,
    persist_every: int,
) -> dict:
    return {
        "name": name,
        "model": {
            "depth": args.depth,
            "width": args.width,
            "num_heads": args.num_heads,
            "context_length": args.context_length,
        },
        "data": {"kind": "synthetic", "num_examples": 1024},
        "trainer": {"max_steps": max_steps, "batch_size": args.batch_size, "num_threads": 1},
        "parallel": {"strategy": "ddp", "world_size": 2, "backend": "gloo"},
        "cluster": {
            "num_nodes": 2,
            "num_spare_nodes": 1,
            "cpus_per_worker": 1,
            "hang_timeout_s": 300,
            "capacity_timeout_s": 120,
            "standby_workers": not args.no_standby,
        },
        "snapshot": {
            "every_steps": 1,
            "persist_every": persist_every,
            "keep": 1,
            "erasure": {"group_size": 2, "parity": parity},
        },
        "metrics": {"progress": "off"},
        "faults": {"events": faults},
    }


def run_controller_job(config_dict: dict, run_dir: Path) -> list[dict]:
    """Train the job to the end; one row per recovery with its breakdown and first step."""
    from stalwart.config import config_from_dict
    from stalwart.launch.cluster import connect
    from stalwart.launch.controller import JobController
    from stalwart.launch.job import cpus_per_node

    config = config_from_dict(config_dict)
    cluster = connect(
        num_nodes=config.cluster.num_nodes,
        num_spare_nodes=config.cluster.num_spare_nodes,
        cpus_per_node=cpus_per_node(config),
    )

    class ColdDurableController(JobController):
        """Reads the durable tier cold, as a spare node reads it from shared storage: on one
        machine the checkpoint the survivors just wrote would otherwise sit in the page cache."""

        def _durable_fallback(self, why: str):
            from stalwart.snapshot.persist import evict_from_page_cache

            step, source, detail = super()._durable_fallback(why)
            if source == "durable":
                evict_from_page_cache(self.run_dir, step)
            return step, source, detail

    controller = ColdDurableController(
        config, cluster, run_dir, log=lambda line: print(f"  {line}")
    )
    try:
        controller.start()
        summary = controller.run()
    finally:
        controller.shutdown()
        cluster.shutdown()
    # A normal step for comparison: the median over the steps that follow another step of the
    # same attempt (no recovery, no start-up, right before them).
    steady = [
        float(record["step_time_s"])
        for previous, record in zip(controller.history, controller.history[1:])
        if previous["attempt"] == record["attempt"] and record["step"] > 2
    ]
    steady_step_s = statistics.median(steady) if steady else float("nan")
    rows = []
    for attempt, recovery in enumerate(summary["recoveries"], start=1):
        first = next((r for r in controller.history if r["attempt"] == attempt), None)
        first_step_s = float(first["step_time_s"]) if first else float("nan")
        rows.append(
            {
                "kind": recovery.kind,
                "source": recovery.source,
                "restored_version": recovery.restored_version,
                "lost_steps": recovery.lost_steps,
                "detection_s": recovery.detection_s,
                "teardown_s": recovery.teardown_s,
                "rebuild_s": recovery.rebuild_s,
                "restart_s": recovery.restart_s,
                "standby_ranks": recovery.standby_ranks,
                "recovery_s": recovery.total_s,
                "first_step_s": first_step_s,
                "steady_step_s": steady_step_s,
                "failure_to_first_step_s": recovery.total_s + first_step_s,
                # A durable write that never finished held the fallback for SETTLE_DURABLE_S.
                "durable_settle_timeouts": controller.durable_settle_timeouts,
            }
        )
    if summary["step"] != config.trainer.max_steps:
        raise RuntimeError(f"job stopped at step {summary['step']}, not {config.trainer.max_steps}")
    return rows


# ---------------------------------------------------------------------------------------------
# Restore-phase probes (each in a fresh process)


def prepare_artifacts(config_dict: dict, work_dir: Path) -> dict:
    """One rank's state after a step, as the manager's region, a durable checkpoint, a .pt file."""
    import torch

    from stalwart.config import config_from_dict
    from stalwart.snapshot import shm
    from stalwart.snapshot.persist import write_checkpoint
    from stalwart.snapshot.state import copy_into, layout_tree
    from stalwart.trainer.loop import Trainer

    probe_config = {**config_dict, "parallel": {"strategy": "none", "world_size": 1}}
    trainer = Trainer(config_from_dict(probe_config), run_dir=work_dir / "probe-train")
    trainer.train_step()
    state = trainer.state_dict()
    tensors, layout = layout_tree(state, extra={"version": 1, "rank": 0, "world_size": 2})
    region = shm.create_region(shm.region_name(f"benchrec{os.getpid()}", "r0"), layout.total_bytes)
    copy_into(tensors, layout, region.array)
    # What a rank of the two-rank job finds on disk: a checkpoint holding both ranks' shards.
    shards = {
        f"rank{rank:05d}": (region.array[: layout.total_bytes], layout.to_dict())
        for rank in range(2)
    }
    durable_root = work_dir / "durable"
    write_checkpoint(durable_root, 1, shards, {"version": 1, "num_ranks": 2}, keep=1)
    torch_file = work_dir / "state.pt"
    torch.save(state, torch_file)
    (work_dir / "layout.json").write_text(layout.to_json())
    (work_dir / "probe_config.json").write_text(json.dumps(probe_config))
    region.close()
    return {
        "region": region,
        "state_bytes": layout.total_bytes,
        "artifacts": {
            "memory": region.name,
            "durable": str(durable_root),
            "torch_load": str(torch_file),
        },
    }


def evict(path: Path) -> None:
    """Drop a file (or every file under a directory) from the page cache: a cold read."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def probe(source: str, config_path: str, artifact: str) -> dict:
    """Runs in a fresh process: start, build, restore from `source`, one step; times each."""
    import torch

    from stalwart.config import config_from_dict
    from stalwart.trainer.loop import Trainer

    # Wall clock across the two processes: the launcher stamped when it started this one.
    process_start_s = time.time() - float(os.environ["STALWART_PROBE_LAUNCHED_AT"])
    imported = time.perf_counter()
    config = config_from_dict(json.loads(Path(config_path).read_text()))
    trainer = Trainer(config, run_dir=Path(config_path).parent / f"probe-{source}")
    built = time.perf_counter()
    if source == "memory":
        from stalwart.snapshot import shm
        from stalwart.snapshot.agent import load_snapshot

        layout_json = (Path(config_path).parent / "layout.json").read_text()
        region = shm.attach_region(artifact)
        load_snapshot(trainer, region.buffer, layout_json)
    elif source == "durable":
        from stalwart.snapshot.restore import load_from_durable

        load_from_durable(trainer, artifact, 0, 1)
    else:
        trainer.load_state_dict(torch.load(artifact, weights_only=True))
    restored = time.perf_counter()
    trainer.train_step()
    stepped = time.perf_counter()
    return {
        "source": source,
        "step_after_restore": trainer.step,
        "process_start_s": process_start_s,
        "build_s": built - imported,
        "restore_s": restored - built,
        "first_step_s": stepped - restored,
    }


def run_probe(source: str, work_dir: Path, artifact: str) -> dict:
    if source in ("durable", "torch_load"):
        evict(Path(artifact))
    environment = {**os.environ, "STALWART_PROBE_LAUNCHED_AT": repr(time.time())}
    output = subprocess.run(
        [
            sys.executable,
            __file__,
            "--probe",
            source,
            str(work_dir / "probe_config.json"),
            artifact,
        ],
        check=True,
        capture_output=True,
        text=True,
        env=environment,
        timeout=900,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(*args.probe)))
        return {}
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="stalwart-bench-recovery-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"thread budget on {os.cpu_count()} cores: 2 ranks x 1 torch thread, 1 copy thread "
        "per rank, 1 encode thread per manager"
    )
    from stalwart.snapshot import shm

    if args.shm_dir:  # every process started from here (cluster, probes) inherits it
        shm.check_dir(args.shm_dir)
        os.environ[shm.SHM_DIR_ENV] = args.shm_dir
    shm_info = shm.describe_dir()
    print(shm.describe_text(shm_info))
    try:
        # Node faults fire from the controller's poll (every 0.5 s): a tiny model must run long
        # enough for the poll to see the fault step before the job ends.
        # A 100M model needs a few steps before its first version commits (slot allocation,
        # first copy): faults earlier than step 5 would restart from scratch, not from memory.
        memory_faults = [
            {"kind": "kill_worker", "step": 5, "rank": 1, "phase": "forward"},
            {"kind": "kill_node", "step": 9, "node": 1},
        ]
        print("job 'memory': RS(2,1) parity, kill a worker at step 5, remove node 1 at step 9")
        memory_rows = run_controller_job(
            job_config(
                args,
                name="bench-recovery-memory",
                parity=1,
                faults=memory_faults,
                max_steps=300 if args.small else 12,
                persist_every=0,
            ),
            work_dir / "memory",
        )
        print("job 'durable': no parity, durable tier every 2 steps, remove node 1 at step 7")
        durable_faults = [{"kind": "kill_node", "step": 7, "node": 1}]
        durable_rows = run_controller_job(
            job_config(
                args,
                name="bench-recovery-durable",
                parity=0,
                faults=durable_faults,
                max_steps=300 if args.small else 9,
                persist_every=2,
            ),
            work_dir / "durable",
        )
        artifacts = prepare_artifacts(
            job_config(
                args, name="bench-recovery-probe", parity=1, faults=[], max_steps=4, persist_every=0
            ),
            work_dir,
        )
        try:
            probes = {
                source: run_probe(source, work_dir, artifacts["artifacts"][source])
                for source in PROBE_SOURCES
            }
        finally:
            artifacts["region"].unlink()
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)

    worker_kill = next(r for r in memory_rows if r["kind"] == "process")
    node_loss = next(r for r in memory_rows if r["kind"] == "node")
    node_loss_durable = next(r for r in durable_rows if r["kind"] == "node")
    if node_loss_durable["source"] != "durable" or worker_kill["source"] != "memory":
        raise RuntimeError(f"unexpected recovery sources: {memory_rows + durable_rows}")
    torch_load = probes["torch_load"]
    torch_load_restart_s = (
        worker_kill["detection_s"]
        + worker_kill["teardown_s"]
        + torch_load["process_start_s"]
        + torch_load["build_s"]
        + torch_load["restore_s"]
        + torch_load["first_step_s"]
    )
    from stalwart.config import config_from_dict
    from stalwart.models import build_model

    model = build_model(
        config_from_dict(
            job_config(args, name="x", parity=1, faults=[], max_steps=1, persist_every=0)
        ).model,
        seed=0,
    )
    num_params = sum(p.numel() for p in model.parameters())
    result = {
        "num_params": num_params,
        "shm": shm_info,
        "standby_workers": not args.no_standby,
        "state_bytes_per_rank": artifacts["state_bytes"],
        "recoveries": {
            "worker_kill_memory": worker_kill,
            "node_loss_erasure": node_loss,
            "node_loss_durable": node_loss_durable,
        },
        "probes": probes,
        "worker_kill_recovery_s": worker_kill["failure_to_first_step_s"],
        "node_loss_recovery_s": node_loss["failure_to_first_step_s"],
        "node_loss_durable_recovery_s": node_loss_durable["failure_to_first_step_s"],
        "torch_load_restart_estimate_s": torch_load_restart_s,
        "memory_vs_durable_speedup": node_loss_durable["failure_to_first_step_s"]
        / node_loss["failure_to_first_step_s"],
        "worker_kill_vs_durable_speedup": node_loss_durable["failure_to_first_step_s"]
        / worker_kill["failure_to_first_step_s"],
        "restore_phase_speedup_vs_durable": probes["durable"]["restore_s"]
        / probes["memory"]["restore_s"],
        "restore_phase_speedup_vs_torch_load": probes["torch_load"]["restore_s"]
        / probes["memory"]["restore_s"],
    }
    print_table(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


def print_table(result: dict) -> None:
    print(
        f"\n{result['num_params'] / 1e6:.1f}M parameters, "
        f"{result['state_bytes_per_rank'] / 2**30:.2f} GiB of state per rank, 2 ranks"
    )
    print(
        f"{'recovery':<22}{'source':>9}{'detect':>8}{'teardown':>9}{'rebuild':>8}"
        f"{'restart':>8}{'1st step':>9}{'total s':>9}{'standby':>8}{'normal step':>12}"
    )
    for name, row in result["recoveries"].items():
        print(
            f"{name:<22}{row['source']:>9}{row['detection_s']:>8.2f}{row['teardown_s']:>9.2f}"
            f"{row['rebuild_s']:>8.2f}{row['restart_s']:>8.2f}{row['first_step_s']:>9.2f}"
            f"{row['failure_to_first_step_s']:>9.2f}{row['standby_ranks']:>8}"
            f"{row['steady_step_s']:>12.2f}"
        )
    print(f"\n{'restart probe':<14}{'start s':>9}{'build s':>9}{'restore s':>11}{'1st step':>10}")
    for source, row in result["probes"].items():
        print(
            f"{source:<14}{row['process_start_s']:>9.2f}{row['build_s']:>9.2f}"
            f"{row['restore_s']:>11.3f}{row['first_step_s']:>10.2f}"
        )
    speedup = result["memory_vs_durable_speedup"]
    verdict = "met" if speedup >= TARGET_SPEEDUP else "NOT met"
    if result["recoveries"]["node_loss_durable"]["durable_settle_timeouts"]:
        # The durable path then measures a stuck write, not the tier: no verdict from it.
        verdict = "not comparable: the durable path waited for a write that never finished"
    print(
        f"\nnode loss, failure to first step: memory (erasure) "
        f"{result['node_loss_recovery_s']:.2f} s vs durable tier "
        f"{result['node_loss_durable_recovery_s']:.2f} s = {speedup:.2f}x "
        f"(target >= {TARGET_SPEEDUP:.0f}x: {verdict})"
    )
    print(
        f"worker kill (memory) {result['worker_kill_recovery_s']:.2f} s; plain torch.load "
        f"restart (estimate) {result['torch_load_restart_estimate_s']:.2f} s"
    )
    print(
        f"restore phase alone: memory {result['probes']['memory']['restore_s']:.3f} s, "
        f"{result['restore_phase_speedup_vs_durable']:.1f}x faster than the durable tier, "
        f"{result['restore_phase_speedup_vs_torch_load']:.1f}x faster than torch.load"
    )


if __name__ == "__main__":
    main()

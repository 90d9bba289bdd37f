"""Snapshot cost: in-memory erasure-coded snapshots every step vs torch.save vs DCP async_save.

One run, two data-parallel ranks (DDP over gloo) of a GPT with >= 100M parameters and its AdamW
state, on an embedded two-node Ray cluster (one simulated node per rank, on loopback). Each rank
is a Ray actor that builds a real `Trainer`; each node runs the real `SnapshotManager` actor
(two shared-memory slots per rank, checksum verification on publish, Reed-Solomon parity
across the two nodes, commit protocol). The benchmark drives the two trainers and the two
managers directly instead of through the `JobController`, so the only thing timed is the
training step and the checkpointing around it.

The same trainers take, in interleaved rounds, blocks of steps with:
  none        no checkpointing at all (the baseline step time);
  memory      `SnapshotAgent` -> `SnapshotManager` every step (capture after step N, copy in the
              background during step N+1's forward/backward, parity + commit in the manager);
  torch_save  `torch.save(trainer.state_dict())` to local disk after every step (synchronous);
  dcp_async   `torch.distributed.checkpoint.async_save` every step, configured as its docs
              recommend: a dedicated gloo process group, `AsyncCheckpointerType.PROCESS`, and
              the previous save awaited before the next one starts.
Blocking time is what the training loop waits for a snapshot (memory: capture + CheckFreq wait
before the optimizer; torch_save: the whole save; dcp_async: waiting for the previous save plus
the async_save call, i.e. staging). Step overhead compares mean step times (training step plus
blocking time) against `none` in the same run.

Restore: the newest committed version is loaded into both trainers from the managers' memory
(`restore.load_from_manager`) and, after the manager at position 0 wrote the same version to
the durable tier and its files were evicted from the page cache, from disk
(`restore.load_from_durable`). Erasure-code throughput: `measure_encode_throughput` on a rank's
snapshot bytes against raw zfec on the same buffers.

    python bench/snapshot.py                      # the table (a few minutes)
    python bench/snapshot.py --json out.json      # plus one JSON object
    python bench/snapshot.py --small --json x.json  # a quick smoke run (tiny model)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray

TARGET_OVERHEAD_RATIO = 1.03
TARGET_STALL_RATIO_TORCH_SAVE = 20.0
TARGET_STALL_RATIO_DCP = 5.0
TARGET_RESTORE_SPEEDUP = 10.0
MODES = ("none", "memory", "torch_save", "dcp_async")


MEMORY_WARMUP_STEPS = 3
RESTORE_REPEATS = 3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny model, few steps (smoke run)")
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--width", type=int, default=832, help="12 x 832 gives ~100M parameters")
    parser.add_argument("--num-heads", type=int, default=13)
    parser.add_argument("--context-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4, help="global batch (sequences)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the modes")
    parser.add_argument("--steps-per-block", type=int, default=3, help="timed steps per mode/round")
    parser.add_argument("--trainer-threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--agent-threads", type=int, default=1, help="snapshot copy threads/rank")
    parser.add_argument("--manager-threads", type=int, default=1, help="encode threads/manager")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument(
        "--shm-dir",
        default="",
        help="directory of the snapshot regions (snapshot.shm_dir; default /dev/shm); a tmpfs "
        "mounted with huge=within_size gives them 2 MiB pages",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.small:
        args.depth, args.width, args.num_heads = 1, 64, 1
        args.context_length, args.rounds, args.steps_per_block = 16, 1, 2
    for name in ("rounds", "steps_per_block", "trainer_threads", "agent_threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def run_config(args: argparse.Namespace, total_steps: int) -> dict:
    return {
        "name": "bench-snapshot",
        "model": {
            "depth": args.depth,
            "width": args.width,
            "num_heads": args.num_heads,
            "context_length": args.context_length,
        },
        "data": {"kind": "synthetic", "num_examples": max(1024, total_steps * args.batch_size)},
        "trainer": {
            "max_steps": total_steps + 10,
            "batch_size": args.batch_size,
            "num_threads": args.trainer_threads,
        },
        "parallel": {"strategy": "ddp", "world_size": 2, "backend": "gloo"},
        "metrics": {"progress": "off"},
    }


@ray.remote(max_concurrency=2)
class BenchRank:
    """One DDP rank: a real Trainer, and every checkpointing mode the benchmark compares."""

    def __init__(self, config: dict, rank: int, work_dir: str, shared_dir: str):
        from stalwart.config import config_from_dict

        self.config = config_from_dict(config)
        self.rank = rank
        self.work_dir = Path(work_dir)
        self.shared_dir = Path(shared_dir)  # DCP: every rank writes into one checkpoint dir
        self.trainer = None
        self.agent = None
        self.dcp_group = None
        self.store = None

    def endpoint(self) -> tuple[str, int]:
        from stalwart.trainer import parallel

        self.store = parallel.serve_store("127.0.0.1", 600)
        return "127.0.0.1", self.store.port

    def setup(self, master_addr: str, master_port: int) -> dict:
        import torch

        from stalwart.trainer import parallel
        from stalwart.trainer.loop import Trainer

        torch.set_num_threads(self.config.trainer.num_threads)
        store = self.store or parallel.connect_store(master_addr, master_port, 600)
        parallel.init_process_group(
            backend="gloo",
            master_addr=master_addr,
            master_port=master_port,
            rank=self.rank,
            world_size=2,
            timeout_s=600,
            store=store,
        )
        self.trainer = Trainer(self.config, rank=self.rank, world_size=2, run_dir=self.work_dir)
        num_params = sum(p.numel() for p in self.trainer.model.parameters())
        return {"num_params": num_params, "torch_threads": torch.get_num_threads()}

    def run_block(
        self, mode: str, num_steps: int, manager=None, agent_threads: int = 1
    ) -> dict[str, list[float]]:
        """`num_steps` training steps, checkpointing after each as `mode` says; times each."""
        import torch
        import torch.distributed as dist

        trainer = self.trainer
        step_s, blocking_s = [], []
        parts: dict[str, list[float]] = {"copy_s": [], "publish_s": []}
        if mode == "memory":
            # One agent for the whole run, as in training: its first snapshot registers and maps
            # the slots (the warm-up block pays that once); between memory blocks its hooks are
            # off so the other modes run without it.
            if self.agent is None:
                from stalwart.snapshot.agent import SnapshotAgent

                self.agent = SnapshotAgent(
                    trainer, manager, rank=self.rank, every_steps=1, num_threads=agent_threads
                )
            else:
                self.agent.resume()
        if mode == "dcp_async" and self.dcp_group is None:
            # DCP's recommendation: checkpoint collectives on their own gloo group.
            self.dcp_group = dist.new_group(backend="gloo")
        pending = None
        for _ in range(num_steps):
            started = time.perf_counter()
            blocked_before = self.agent.total_blocking_s if self.agent else 0.0
            trainer.train_step()
            save_started = time.perf_counter()
            if mode == "torch_save":
                torch.save(trainer.state_dict(), self.work_dir / f"torch_save_rank{self.rank}.pt")
            elif mode == "dcp_async":
                pending = self._dcp_async_save(pending)
            saved = time.perf_counter()
            step_s.append(saved - started)
            if mode == "memory":
                # Capture of this step's snapshot counts now; its copy wait lands in the next step.
                blocking_s.append(self.agent.total_blocking_s - blocked_before)
            elif mode != "none":
                blocking_s.append(saved - save_started)
        if mode == "memory":
            # The last snapshot's copy overlaps the next step, as every earlier one did: one
            # more step runs, untimed, and the last snapshot's capture plus the time that step's
            # optimizer waited for its copy are charged to this block (the extra step's own
            # snapshot is flushed untimed). Each block is thus charged one capture and one wait
            # per timed step.
            trainer.train_step()
            wait_s = self.agent.last_blocking_s
            if blocking_s:
                blocking_s[-1] += wait_s
                step_s[-1] += wait_s
            self.agent.flush()
            self.agent.pause()
            # The background thread's times for the block's last snapshot (copy, which on CPU
            # includes the checksums; then the publish call).
            for key in parts:
                parts[key].append(getattr(self.agent, f"last_{key}"))
        if pending is not None:
            pending.result()  # outside the timing: the background write finishes
        return {"step_s": step_s, "blocking_s": blocking_s, **parts}

    def _dcp_async_save(self, pending):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        if pending is not None:
            pending.result()  # DCP docs: one save in flight; wait before staging the next
        step = self.trainer.step
        checkpoint_dir = self.shared_dir / f"dcp_step{step}"
        old = self.shared_dir / f"dcp_step{step - 2}"
        if self.rank == 0 and old.exists():
            shutil.rmtree(old, ignore_errors=True)
        state = self.trainer.state_dict()
        response = dcp.async_save(
            {"model": state["model"], "optim": state["optim"], "rest": _without_tensors(state)},
            checkpoint_id=str(checkpoint_dir),
            process_group=self.dcp_group,
            async_checkpointer_type=AsyncCheckpointerType.PROCESS,
        )
        return getattr(response, "upload_completion", response)

    def restore(
        self, source: str, manager=None, version: int = 0, run_dir: str = ""
    ) -> dict[str, float]:
        """Restore `version` from `source`; its seconds, total and by part."""
        from stalwart.snapshot import restore

        parts: dict[str, float] = {}
        started = time.perf_counter()
        if source == "memory":
            restore.load_from_manager(self.trainer, manager, self.rank, version, timings=parts)
        else:
            restore.load_from_durable(self.trainer, run_dir, self.rank, version, timings=parts)
        return {"total_s": time.perf_counter() - started, **parts}

    def step(self) -> int:
        return self.trainer.step

    def close_agent(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None

    def shutdown(self) -> None:
        from stalwart.trainer import parallel

        parallel.destroy_process_group()


def _without_tensors(state: dict) -> dict:
    return {key: value for key, value in state.items() if key not in ("model", "optim")}


def summarize(values: list[float]) -> float:
    return statistics.mean(values) if values else 0.0


def use_shm_dir(directory: str) -> dict:
    """Put the snapshot regions of every process started from here in `directory` (default:
    where they would go anyway); print and return what backs it."""
    from stalwart.snapshot import shm

    if directory:
        shm.check_dir(directory)
        os.environ[shm.SHM_DIR_ENV] = directory
    info = shm.describe_dir()
    print(shm.describe_text(info))
    return info


def main(argv=None) -> dict:
    args = parse_args(argv)
    from stalwart.erasure.codec import measure_encode_throughput
    from stalwart.erasure.layout import ErasureLayout
    from stalwart.launch.cluster import connect
    from stalwart.snapshot import shm
    from stalwart.snapshot.manager import RemoteSnapshotManager
    from stalwart.snapshot.persist import evict_from_page_cache

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="stalwart-bench-snapshot-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    run_dir = work_dir / "run"
    # Steps: untimed warm-up per mode, then rounds x modes x steps_per_block timed steps. The
    # memory mode warms up with 3 snapshots: both slots and the managers' parity buffers are
    # then allocated and mapped (a one-time cost, printed with the warm-up), as in a long run.
    # The memory mode runs last in the final round so its newest version is the one persisted
    # and restored. DCP runs after everything else: its background process and shared-memory
    # staging stay alive once started, and on a 24 GiB host they do not fit next to the
    # managers' slots and parity.
    in_memory_modes = [m for m in MODES if m != "dcp_async"]
    plan = [
        (mode, MEMORY_WARMUP_STEPS if mode == "memory" else 1, False) for mode in in_memory_modes
    ]
    for round_index in range(args.rounds):
        order = [m for m in in_memory_modes if m != "memory"]
        if round_index % 2:
            order.reverse()
        if round_index == args.rounds - 1:
            order.append("memory")
        else:
            order.insert(len(order) // 2, "memory")
        plan += [(mode, args.steps_per_block, True) for mode in order]
    # The memory mode's final step (each memory block runs one extra step, see run_block).
    persist_version = sum(num + (mode == "memory") for mode, num, _ in plan)
    dcp_plan = [("dcp_async", 1, False)] + [("dcp_async", args.steps_per_block, True)] * args.rounds
    total_steps = persist_version + sum(num for _, num, _ in dcp_plan)
    config = run_config(args, total_steps)
    num_cores = os.cpu_count()
    print(
        f"thread budget on {num_cores} cores: 2 ranks x {args.trainer_threads} torch thread(s), "
        f"{args.agent_threads} snapshot copy thread(s) per rank, {args.manager_threads} encode "
        "thread(s) per manager, DCP: 1 background process per rank"
    )

    shm_info = use_shm_dir(args.shm_dir)
    cluster = connect(num_nodes=2, cpus_per_node=1.0)
    job_id = f"bench{os.getpid()}"
    managers, ranks = {}, {}
    result: dict = {}
    try:
        nodes = cluster.alive_nodes()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        def pinned(position: int):
            return NodeAffinitySchedulingStrategy(node_id=nodes[position].node_id, soft=False)

        for position in range(2):
            managers[position] = RemoteSnapshotManager.options(
                scheduling_strategy=pinned(position)
            ).remote(
                job_id=job_id,
                position=position,
                positions=[0, 1],
                ranks=[position],
                group_size=2,
                parity=1,
                run_dir=str(run_dir),
                persist_every=persist_version,
                keep=1,
                num_threads=args.manager_threads,
                wait_timeout_s=600.0,
            )
        ray.get([m.set_peers.remote(managers) for m in managers.values()])
        for rank in range(2):
            ranks[rank] = BenchRank.options(num_cpus=1, scheduling_strategy=pinned(rank)).remote(
                config, rank, str(work_dir / f"rank{rank}"), str(work_dir / "dcp")
            )
        master_addr, master_port = ray.get(ranks[0].endpoint.remote())
        infos = ray.get([r.setup.remote(master_addr, master_port) for r in ranks.values()])
        num_params = infos[0]["num_params"]
        print(f"model: {num_params / 1e6:.1f}M parameters, AdamW, DDP x2 over gloo")

        measured: dict[str, dict[str, list[float]]] = {
            m: {"step_s": [], "blocking_s": []} for m in MODES
        }
        memory_parts: dict[str, list[float]] = {}

        def wait_for_commit(version: int) -> None:
            deadline = time.monotonic() + 600
            while True:
                statuses = ray.get([m.status.remote() for m in managers.values()])
                if all(status["committed"] == version for status in statuses):
                    return
                if time.monotonic() > deadline or any(status["events"] for status in statuses):
                    raise RuntimeError(f"version {version} was not committed: {statuses}")
                time.sleep(0.05)

        def run_plan(steps: list[tuple[str, int, bool]]) -> None:
            for mode, num_steps, timed in steps:
                blocks = ray.get(
                    [
                        r.run_block.remote(
                            mode, num_steps, managers.get(rank), agent_threads=args.agent_threads
                        )
                        for rank, r in ranks.items()
                    ]
                )
                if timed:
                    # A step is as slow as its slowest rank (they meet in the all-reduce).
                    for values in zip(*(b["step_s"] for b in blocks)):
                        measured[mode]["step_s"].append(max(values))
                    for values in zip(*(b["blocking_s"] for b in blocks)):
                        measured[mode]["blocking_s"].append(max(values))
                if mode == "memory" and timed:
                    for key in ("copy_s", "publish_s"):
                        memory_parts.setdefault(key, []).extend(
                            max(values) for values in zip(*(b[key] for b in blocks))
                        )
                if mode == "memory":
                    # The managers' parity and commit of the block's last version finish before
                    # the next block, which may be another mode's.
                    wait_for_commit(ray.get(ranks[0].step.remote()))
                # torch.save's files (2.3 GiB a step) reach the disk from the page cache in the
                # background: written back here, untimed, not during the next mode's block.
                os.sync()
                label = "timed" if timed else "warm-up"
                print(
                    f"  {mode:<10} {num_steps} step(s) {label}: step "
                    f"{summarize([max(v) for v in zip(*(b['step_s'] for b in blocks))]):.3f} s"
                )

        run_plan(plan)
        # Restore the newest committed version: from manager memory, then cold from disk.
        # Both restores run on a quiet machine: the managers' durable write of this version
        # (2 x 1.13 GiB to disk, in the background) is finished before either is timed.
        version = persist_version
        wait_for_commit(version)
        ray.get([r.close_agent.remote() for r in ranks.values()])
        ray.get(managers[0].flush_durable.remote())
        # Each restore is timed RESTORE_REPEATS times (both ranks at once, the slower counts;
        # the durable files evicted from the page cache before every read) and the median kept.
        # Each sample keeps the slower rank's total and that rank's parts.
        restore_samples: dict[str, list[dict[str, float]]] = {"memory": [], "durable": []}
        for _ in range(RESTORE_REPEATS):
            restore_samples["memory"].append(
                max(
                    ray.get(
                        [
                            r.restore.remote("memory", managers[rank], version)
                            for rank, r in ranks.items()
                        ]
                    ),
                    key=lambda sample: sample["total_s"],
                )
            )
        for _ in range(RESTORE_REPEATS):
            evicted = evict_from_page_cache(run_dir, version)
            restore_samples["durable"].append(
                max(
                    ray.get(
                        [
                            r.restore.remote("durable", version=version, run_dir=str(run_dir))
                            for r in ranks.values()
                        ]
                    ),
                    key=lambda sample: sample["total_s"],
                )
            )
        memory_restores = [sample["total_s"] for sample in restore_samples["memory"]]
        durable_restores = [sample["total_s"] for sample in restore_samples["durable"]]
        memory_restore_s = statistics.median(memory_restores)
        durable_restore_s = statistics.median(durable_restores)

        # Erasure code throughput on rank 0's snapshot bytes: the job's RS(k, n) and a wider one.
        region_name = ray.get(managers[0].slot_for.remote(0, version))[0]
        region = shm.attach_region(region_name)
        try:
            layout = ErasureLayout([0, 1], 2, 1)
            k_job = 2 - 1
            shard = region.array
            codes = {
                "job": measure_encode_throughput(
                    [shard], k_job, 1, num_threads=args.manager_threads
                ),
                "k4m2": measure_encode_throughput([shard], 4, 2, num_threads=args.manager_threads),
            }
            del shard
        finally:
            region.close()
        encode_s = ray.get(managers[0].status.remote())["encode_s"]
        snapshot_bytes = region.nbytes

        # The managers' work is measured: free their memory before DCP stages its copies.
        for manager in managers.values():
            ray.get(manager.shutdown.remote(), timeout=60)
            ray.kill(manager, no_restart=True)
        managers = {}
        run_plan(dcp_plan)
        step_s = {m: summarize(measured[m]["step_s"]) for m in MODES}
        blocking_s = {m: summarize(measured[m]["blocking_s"]) for m in MODES}

        result = {
            "num_params": num_params,
            "shm": shm_info,
            "snapshot_bytes_per_rank": snapshot_bytes,
            "num_cores": num_cores,
            "trainer_threads": args.trainer_threads,
            "agent_threads": args.agent_threads,
            "manager_threads": args.manager_threads,
            "num_timed_steps_per_mode": args.rounds * args.steps_per_block,
            "step_s": step_s,
            "blocking_s": blocking_s,
            # The memory mode's background work per snapshot (max over ranks, last snapshot of
            # each block): copy (with the checksums on CPU) and the publish call.
            "memory_parts_s": {key: summarize(values) for key, values in memory_parts.items()},
            "snapshot_overhead_ratio": step_s["memory"] / step_s["none"],
            "torch_save_overhead_ratio": step_s["torch_save"] / step_s["none"],
            "dcp_async_overhead_ratio": step_s["dcp_async"] / step_s["none"],
            "stall_ratio_vs_torch_save": blocking_s["torch_save"] / blocking_s["memory"],
            "stall_ratio_vs_dcp_async": blocking_s["dcp_async"] / blocking_s["memory"],
            "restore_memory_s": memory_restore_s,
            "restore_durable_s": durable_restore_s,
            "restore_memory_samples_s": memory_restores,
            "restore_durable_samples_s": durable_restores,
            "restore_parts_s": restore_samples,
            "durable_files_evicted": evicted,
            "restore_speedup_vs_durable": durable_restore_s / memory_restore_s,
            "manager_encode_s": encode_s,
            "ec_layout": {"group_size": 2, "parity": 1, "k": k_job, "protected": layout.protected},
            "ec_encode": codes,
            "ec_encode_fraction_of_zfec": codes["job"]["fraction_of_zfec"],
        }
    finally:
        for handle in ranks.values():
            try:
                ray.get(handle.shutdown.remote(), timeout=30)
            except Exception:
                pass
        for manager in managers.values():
            try:
                ray.get(manager.shutdown.remote(), timeout=30)
            except Exception:
                pass
        cluster.shutdown()
        shm.remove_regions(f"stalwart-{job_id}-")
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)

    print_table(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


def print_table(result: dict) -> None:
    step_s, blocking_s = result["step_s"], result["blocking_s"]
    print(
        f"\n{result['num_params'] / 1e6:.1f}M parameters, "
        f"{result['snapshot_bytes_per_rank'] / 2**30:.2f} GiB of state per rank, 2 ranks, "
        f"{result['num_timed_steps_per_mode']} timed steps per mode"
    )
    print(f"{'mode':<12}{'step s':>10}{'vs none':>10}{'blocking s':>12}{'memory/this':>13}")
    for mode in MODES:
        ratio = step_s[mode] / step_s["none"]
        stall = blocking_s[mode]
        versus = f"{stall / blocking_s['memory']:.1f}x" if mode not in ("none", "memory") else ""
        print(f"{mode:<12}{step_s[mode]:>10.3f}{ratio:>10.3f}{stall:>12.4f}{versus:>13}")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    overhead = result["snapshot_overhead_ratio"]
    print(
        f"\nin-memory snapshots every step: step time x{overhead:.3f} "
        f"(target <= {TARGET_OVERHEAD_RATIO}: {verdict(overhead <= TARGET_OVERHEAD_RATIO)})"
    )
    for key, target, name in (
        ("stall_ratio_vs_torch_save", TARGET_STALL_RATIO_TORCH_SAVE, "torch.save"),
        ("stall_ratio_vs_dcp_async", TARGET_STALL_RATIO_DCP, "DCP async_save"),
    ):
        print(
            f"blocking time {result[key]:.1f}x lower than {name} "
            f"(target >= {target:.0f}x: {verdict(result[key] >= target)})"
        )
    speedup = result["restore_speedup_vs_durable"]
    samples = {
        kind: ", ".join(f"{value:.3f}" for value in result[f"restore_{kind}_samples_s"])
        for kind in ("memory", "durable")
    }
    print(
        f"restore (median of {RESTORE_REPEATS}): memory {result['restore_memory_s']:.3f} s "
        f"({samples['memory']}), durable tier (cold, {result['durable_files_evicted']} files "
        f"evicted each time) {result['restore_durable_s']:.3f} s ({samples['durable']}): "
        f"{speedup:.1f}x (target >= {TARGET_RESTORE_SPEEDUP:.0f}x: "
        f"{verdict(speedup >= TARGET_RESTORE_SPEEDUP)})"
    )
    for kind, kind_samples in result["restore_parts_s"].items():
        print(
            f"  {kind} restore by part (slower rank of each sample): "
            + "; ".join(
                ", ".join(f"{key[:-2]} {value:.3f}" for key, value in sample.items())
                for sample in kind_samples
            )
        )
    for name, code in result["ec_encode"].items():
        print(
            f"EC encode ({name}: k={code['k']}, m={code['m']}, {code['num_bytes'] / 2**20:.0f} MiB, "
            f"{code['num_threads']} thread(s)): ours {code['ours_bytes_per_s'] / 1e9:.2f} GB/s vs "
            f"raw zfec {code['zfec_bytes_per_s'] / 1e9:.2f} GB/s = {code['fraction_of_zfec']:.2f} "
            f"(CPU time: {code['cpu_fraction_of_zfec']:.2f})"
        )
    print(f"manager encode + announce of the last version: {result['manager_encode_s']:.3f} s")
    parts = result["memory_parts_s"]
    print(
        "memory mode, in the background per snapshot: copy + checksums {copy_s:.3f} s, "
        "publish {publish_s:.3f} s".format(**parts)
    )


if __name__ == "__main__":
    main()

"""RL benchmark: synchronous on-policy vs PipelineRL-k on the same model and CPU budget.

Both runs use examples/rl_arithmetic.yaml (ScaleRL recipe, one learner actor and one rollout
actor with one torch thread each, the same deterministic supervised start, the learner
snapshotting into its SnapshotManager every step) and the same wall-clock budget of RL time.
Both use the same generation code, batch sizes (``--chunk-prompts`` prompts per generation
call, ``rl.prompts_per_step`` groups per learner step) and request queueing; only
rl.max_staleness differs: 0 (synchronous: nothing is generated while the learner steps, and the
learner waits for the whole batch) vs k (generation continues while the learner steps, at most
k versions stale). Reported per run: generated (sampled) tokens/s, learner steps/s, held-out
pass@1 of the last version, the ScaleRL sigmoid fit (A, B) of held-out pass@1 against RL
wall-clock seconds, and where the time went (generation, reward, weight loads, learner step,
snapshot blocking, learner starved for data, staleness gate closed). Ratios are async / sync
from this one run.

    python bench/rl.py --budget-s 45 --k 4 --json runs/bench/rl.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import ray

from stalwart.config import load_config
from stalwart.launch.rl_driver import run_pipeline
from stalwart.trainer.rl.analysis import fit_sigmoid, plot_sigmoid_fit

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "rl_arithmetic.yaml"


def run_one(
    config_path: Path, budget_s: float, staleness: int, eval_every: int, workers: int, chunk: int
) -> dict:
    config = load_config(
        config_path,
        [
            f"rl.max_staleness={staleness}",
            "trainer.max_steps=100000",
            f"rl.eval_every={eval_every}",
            f"rl.num_rollout_workers={workers}",
            f"rl.rollout_chunk_prompts={chunk}",
        ],
    )
    record = run_pipeline(config, time_budget_s=budget_s, log=lambda message: None)
    elapsed_by_version = {int(m["version"]): m["elapsed_s"] for m in record["steps"]}
    elapsed_by_version[0] = 0.0
    curve = [
        (elapsed_by_version[e["version"]], e["pass1"])
        for e in record["evals"]
        if e["version"] in elapsed_by_version
    ]
    fit = None
    try:
        x = np.array([c for c, _ in curve[1:]])
        y = np.array([p for _, p in curve[1:]])
        fit = fit_sigmoid(x, y, r0=curve[0][1], skip_compute=0.0)
    except ValueError as error:
        print(f"  sigmoid fit skipped (k={staleness}): {error}")
    return {"record": record, "curve": curve, "fit": fit}


def print_profile(runs: list[tuple[str, dict]]) -> None:
    """Seconds of the RL wall time each part took, per run (rollout parts summed over actors)."""
    parts = [
        ("RL wall time", "rl_wall_s"),
        ("rollout: generate", "rollout_generate_s"),
        ("rollout: reward", "rollout_reward_s"),
        ("rollout: load weights", "rollout_load_weights_s"),
        ("rollout: idle", "rollout_idle_s"),
        ("learner: step", "learner_step_s"),
        ("learner: snapshot wait", "learner_snapshot_blocking_s"),
        ("learner: pack weights", "learner_weights_pack_s"),
        ("learner: idle", "learner_idle_s"),
        ("driver: learner starved", "learner_starved_s"),
        ("driver: gate closed", "gate_closed_s"),
        ("driver: waiting", "driver_wait_s"),
    ]
    print(f"{'time (s)':<26}" + "".join(f"{name:>16}" for name, _ in runs))
    for label, key in parts:
        values = [
            record["rl_wall_s"] if key == "rl_wall_s" else record["profile"][key]
            for _, record in runs
        ]
        print(f"{label:<26}" + "".join(f"{value:>16.1f}" for value in values))
    calls = [record["profile"]["rollout_calls"] for _, record in runs]
    print(f"{'generation calls':<26}" + "".join(f"{value:>16}" for value in calls))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", default=str(EXAMPLE))
    parser.add_argument("--budget-s", type=float, default=45.0, help="RL wall-clock per run")
    parser.add_argument("--k", type=int, default=4, help="staleness bound of the async run")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--rollout-workers", type=int, default=1)
    parser.add_argument(
        "--chunk-prompts", type=int, default=16, help="prompts per generation call (both runs)"
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--png", default=None, help="default: next to --json")
    args = parser.parse_args()

    ray.init(
        address="local",
        num_cpus=args.num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
    )
    started = time.perf_counter()
    try:
        settings = (args.eval_every, args.rollout_workers, args.chunk_prompts)
        sync = run_one(Path(args.config), args.budget_s, 0, *settings)
        pipelined = run_one(Path(args.config), args.budget_s, args.k, *settings)
    finally:
        ray.shutdown()

    rows = []
    for name, result in (("sync on-policy (k=0)", sync), (f"PipelineRL-{args.k}", pipelined)):
        record, fit = result["record"], result["fit"]
        rows.append(
            {
                "name": name,
                "sampled_tokens_per_s": record["sampled_tokens_per_s"],
                "learner_steps_per_s": record["learner_steps_per_s"],
                "learner_steps": record["num_learner_steps"],
                "pass1_start": record["evals"][0]["pass1"],
                "pass1_end": record["evals"][-1]["pass1"],
                "max_staleness": record["max_staleness_seen"],
                "rollout_utilisation": record["rollout_utilisation"],
                "learner_utilisation": record["learner_utilisation"],
                "fit_a": fit.a if fit else None,
                "fit_b": fit.b if fit else None,
            }
        )
    header = (
        f"{'run':<22}{'tokens/s':>10}{'steps/s':>9}{'steps':>7}{'pass@1 start':>14}"
        f"{'pass@1 end':>12}{'max stale':>10}{'fit A':>8}{'fit B':>8}{'gen busy':>10}{'learn busy':>11}"
    )
    print(
        f"RL benchmark: {args.budget_s:g}s of RL per run, {args.num_cpus} CPUs, "
        f"{args.rollout_workers} rollout actor(s) x {args.chunk_prompts} prompts per call, "
        f"{args.config}"
    )
    print(header)
    for row in rows:
        fit_a = f"{row['fit_a']:.3f}" if row["fit_a"] is not None else "-"
        fit_b = f"{row['fit_b']:.2f}" if row["fit_b"] is not None else "-"
        print(
            f"{row['name']:<22}{row['sampled_tokens_per_s']:>10.0f}{row['learner_steps_per_s']:>9.2f}"
            f"{row['learner_steps']:>7}{row['pass1_start']:>14.3f}{row['pass1_end']:>12.3f}"
            f"{row['max_staleness']:>10}{fit_a:>8}{fit_b:>8}"
            f"{row['rollout_utilisation']:>10.0%}{row['learner_utilisation']:>11.0%}"
        )
    print_profile([("sync", sync["record"]), (f"PipelineRL-{args.k}", pipelined["record"])])
    sync_row, async_row = rows
    throughput_ratio = async_row["sampled_tokens_per_s"] / sync_row["sampled_tokens_per_s"]
    steps_ratio = async_row["learner_steps_per_s"] / sync_row["learner_steps_per_s"]
    print(
        f"async / sync: sampled tokens/s x{throughput_ratio:.2f}, learner steps/s x{steps_ratio:.2f}, "
        f"pass@1 {async_row['pass1_end']:.3f} vs {sync_row['pass1_end']:.3f} "
        f"(RL gain over the supervised start: {100 * (async_row['pass1_end'] - async_row['pass1_start']):+.1f} "
        f"points async, {100 * (sync_row['pass1_end'] - sync_row['pass1_start']):+.1f} sync); "
        f"total {time.perf_counter() - started:.0f}s"
    )
    summary = {
        "budget_s": args.budget_s,
        "k": args.k,
        "num_cpus": args.num_cpus,
        "rollout_workers": args.rollout_workers,
        "chunk_prompts": args.chunk_prompts,
        "async_sample_throughput_ratio": throughput_ratio,
        "async_learner_steps_ratio": steps_ratio,
        "sampled_tokens_per_s_sync": sync_row["sampled_tokens_per_s"],
        "sampled_tokens_per_s_async": async_row["sampled_tokens_per_s"],
        "learner_steps_per_s_sync": sync_row["learner_steps_per_s"],
        "learner_steps_per_s_async": async_row["learner_steps_per_s"],
        "rollout_utilisation_sync": sync_row["rollout_utilisation"],
        "rollout_utilisation_async": async_row["rollout_utilisation"],
        "learner_utilisation_sync": sync_row["learner_utilisation"],
        "learner_utilisation_async": async_row["learner_utilisation"],
        "pass1_start": async_row["pass1_start"],
        "pass1_sync": sync_row["pass1_end"],
        "pass1_async": async_row["pass1_end"],
        "pass1_gain_points": 100 * (async_row["pass1_end"] - async_row["pass1_start"]),
        "pass1_gain_points_sync": 100 * (sync_row["pass1_end"] - sync_row["pass1_start"]),
        "fit_sync": sync["fit"].to_dict() if sync["fit"] else None,
        "fit_async": pipelined["fit"].to_dict() if pipelined["fit"] else None,
        "profile_sync": sync["record"]["profile"] | {"rl_wall_s": sync["record"]["rl_wall_s"]},
        "profile_async": pipelined["record"]["profile"]
        | {"rl_wall_s": pipelined["record"]["rl_wall_s"]},
        "curve_sync": sync["curve"],
        "curve_async": pipelined["curve"],
    }
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
        print(f"wrote {path}")
    png = args.png or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if png and pipelined["fit"]:
        curve = pipelined["curve"][1:]
        plot_sigmoid_fit(
            [c for c, _ in curve],
            [p for _, p in curve],
            pipelined["fit"],
            png,
            extrapolate_to=4 * args.budget_s,
            xlabel="RL wall-clock seconds",
            title=f"PipelineRL-{args.k}: A={pipelined['fit'].a:.3f} B={pipelined['fit'].b:.2f}",
        )
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""NVMe offload benchmark: our engine vs DeepSpeed ZeRO-3 (offload_param + offload_optimizer on
NVMe), same model, data and batch, side by side in one run.

    .venv/bin/python bench/offload.py --json runs/bench/offload.json

Each system trains in its own fresh process (so peak RSS is its own). Per step we measure time,
tokens/s, bytes read/written at the block layer (/proc/self/io, which counts O_DIRECT I/O) and
the step's peak RSS. The lower bound is the largest of compute time (6 N T FLOPs at the measured
matmul rate, plus causal attention's 6 s w T FLOPs per layer at the measured attention rate), NVMe time (16 B/param read + 14 B/param written at the measured O_DIRECT
bandwidths) and host-memory time (30 B/param at the measured copy bandwidth).

DeepSpeed is configured as its docs recommend for NVMe offload and sized to this machine:
bf16 (its CPU accelerator needs it), DeepSpeedCPUAdam, libaio, sub_group_size and
stage3_max_live_parameters well below host memory, parameter swap buffers large enough for the
biggest tensor. Two of its performance options fail in DeepSpeed 0.19.8 here and are off: NVMe
parameter prefetch (stage3_prefetch_bucket_size > 0 asserts "param ... already assigned swap
buffer" on the second step) and the pipelined optimizer swapper (runs out of swap buffers once
the model has several sub-groups). Ours trains by default with the same mixed-precision scheme
(`--precision bf16`: bf16 working parameters, fp32 master + AdamW state on NVMe);
`--precision fp32` is bit-identical to in-memory AdamW. The compute term of the lower bound uses
the measured matmul rate of the precision ours runs in.
On a GPU the same script uses the device (device memory budget, pinned buffers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

GIB = 1 << 30
REPO = Path(__file__).resolve().parent.parent
# Where a step of ours goes: wall time of forward, backward, the end-of-backward drain of I/O and
# optimizer jobs; sweep_s: time waiting for the previous step's updates when it clipped or
# deferred (they run inside this step's forward, so this is part of forward_s); time blocked on
# reads; AdamW kernel time (on the optimizer thread, overlapped with forward or backward).
PROFILE_KEYS = ("forward_s", "backward_s", "drain_s", "sweep_s", "io_wait_s", "optimizer_s")


def llama_config(layers: int, hidden: int, vocab: int, seq: int):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=seq,
        use_cache=False,
    )


def io_bytes() -> tuple[int, int]:
    values = {}
    with open("/proc/self/io") as io:
        for line in io:
            key, _, value = line.partition(":")
            values[key] = int(value)
    return values["read_bytes"], values["write_bytes"]


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def step_peak() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def batches(args):
    import torch

    generator = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=generator)
        yield tokens[:, :-1], tokens[:, 1:]


def child_ours(args) -> dict:
    import transformers

    from stalwart.config import OffloadConfig, OptimConfig
    from stalwart.offload.engine import OffloadEngine, empty_parameters
    from stalwart.offload.loss import TokenCrossEntropy

    config = llama_config(args.layers, args.hidden, args.vocab, args.seq)
    with empty_parameters():
        model = transformers.LlamaForCausalLM(config)
    num_params = sum(p.numel() for p in model.parameters())
    engine = OffloadEngine(
        model,
        OffloadConfig(
            device="nvme",
            nvme_path=args.nvme_path,
            max_host_memory_gb=args.budget_gb,
            buffer_count=4,
        ),
        OptimConfig(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0),
        loss_fn=TokenCrossEntropy(),
        optimizer_kernel=os.environ.get("STALWART_BENCH_KERNEL", "auto"),
        precision=args.precision,
    )
    steps = []
    for inputs, targets in batches(args):
        reset_peak()
        read0, written0 = io_bytes()
        start = time.perf_counter()
        metrics = engine.train_step([(inputs, targets)], lr=1e-4)
        elapsed = time.perf_counter() - start
        read1, written1 = io_bytes()
        steps.append(
            {
                "step_s": elapsed,
                "loss": metrics["loss"],
                "clipped": metrics["clipped"],
                "read_bytes": read1 - read0,
                "written_bytes": written1 - written0,
                "peak_rss_bytes": step_peak(),
                "predicted_step_s": metrics.get("predicted_step_s"),
                "loss_chunk_tokens": metrics.get("loss_chunk_tokens"),
                "profile_s": {key: metrics[key] for key in PROFILE_KEYS},
            }
        )
        chunked = metrics.get("loss_chunk_tokens")
        print(
            f"ours step {len(steps)}: {elapsed:.2f} s loss {metrics['loss']:.4f}"
            + (f" (LM head and loss in chunks of {chunked} tokens)" if chunked else ""),
            file=sys.stderr,
            flush=True,
        )
    # A clipped step's update runs in the next step's forward: each measured step (after the
    # warm-up) carries exactly one update, the previous step's, as each DeepSpeed step carries
    # its own. The last one is applied here, untimed, before the engine closes.
    engine.settle()
    plan = engine.plan.describe() if engine.plan else ""
    engine.close()
    return {"num_params": num_params, "steps": steps, "plan": plan}


def deepspeed_config(args) -> dict:
    largest_param = max(
        args.hidden * (int(args.hidden * 8 / 3) // 64 * 64), args.hidden * args.vocab
    )
    return {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0},
        },
        "zero_optimization": {
            "stage": 3,
            "offload_param": {
                "device": "nvme",
                "nvme_path": args.nvme_path,
                "pin_memory": True,
                "buffer_count": 40,
                "buffer_size": int(largest_param * 1.1),
                "max_in_cpu": 0,
            },
            "offload_optimizer": {
                "device": "nvme",
                "nvme_path": args.nvme_path,
                "pin_memory": True,
                "buffer_count": 4,
                # The pipelined swapper (pipeline_read/write) runs out of swap buffers in 0.19.8
                # once the model has several sub-groups, even with 8 buffers; DeepSpeed's
                # default, non-pipelined swapper is used.
                "pipeline_read": False,
                "pipeline_write": False,
            },
            "sub_group_size": int(1e8),
            "stage3_max_live_parameters": int(2e7),
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0,
            "stage3_param_persistence_threshold": int(1e4),
        },
        "aio": {
            "block_size": 1 << 20,
            "queue_depth": 8,
            "intra_op_parallelism": 1,
            "single_submit": False,
            "overlap_events": True,
        },
    }


def child_deepspeed(args) -> dict:
    os.environ.update(
        DS_ACCELERATOR="cuda" if _has_cuda() else "cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(29500 + os.getpid() % 1000),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
    )
    import deepspeed
    import torch
    import torch._dynamo  # noqa: F401 - must be imported before zero.Init patches tensor constructors
    import transformers

    llama = transformers.LlamaForCausalLM  # resolve the lazy import outside zero.Init
    config = deepspeed_config(args)
    deepspeed.init_distributed(dist_backend="nccl" if _has_cuda() else "gloo")
    with deepspeed.zero.Init(
        config_dict_or_path=config, remote_device="nvme", pin_memory=True, dtype=torch.bfloat16
    ):
        model = llama(llama_config(args.layers, args.hidden, args.vocab, args.seq))
    num_params = sum(p.ds_numel for p in model.parameters())
    engine, *_ = deepspeed.initialize(
        model=model, config=config, model_parameters=model.parameters()
    )
    steps = []
    for inputs, targets in batches(args):
        reset_peak()
        read0, written0 = io_bytes()
        start = time.perf_counter()
        outputs = engine(input_ids=inputs.to(engine.device))
        logits = outputs.logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.to(engine.device).reshape(-1)
        )
        engine.backward(loss)
        engine.step()
        elapsed = time.perf_counter() - start
        read1, written1 = io_bytes()
        steps.append(
            {
                "step_s": elapsed,
                "loss": float(loss),
                "read_bytes": read1 - read0,
                "written_bytes": written1 - written0,
                "peak_rss_bytes": step_peak(),
            }
        )
        print(
            f"deepspeed step {len(steps)}: {elapsed:.2f} s loss {float(loss):.4f}",
            file=sys.stderr,
            flush=True,
        )
    return {"num_params": num_params, "steps": steps}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_child(kind: str, args, layers: int, steps: int) -> dict:
    nvme = Path(args.nvme_root) / f"{kind}-{layers}"
    shutil.rmtree(nvme, ignore_errors=True)
    nvme.mkdir(parents=True)
    command = [
        sys.executable, __file__, "--child", kind, "--layers", str(layers), "--hidden", str(args.hidden),
        "--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(steps),
        "--budget-gb", str(args.budget_gb), "--nvme-path", str(nvme), "--precision", args.precision,
    ]  # fmt: skip
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    completed = subprocess.run(
        command, capture_output=True, text=True, env=environment, timeout=args.timeout_s
    )
    shutil.rmtree(nvme, ignore_errors=True)
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.splitlines()[-15:])
        return {"error": f"exit {completed.returncode}: {tail}"}
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    report["process_peak_rss_bytes"] = report.pop("process_peak_rss_bytes", None)
    return report


def summarise(report: dict, args, warmup: int) -> dict:
    measured = report["steps"][warmup:] or report["steps"]
    step_s = sum(s["step_s"] for s in measured) / len(measured)
    return {
        "num_params": report["num_params"],
        "step_s": step_s,
        "tokens_per_s": args.batch * args.seq / step_s,
        "read_bytes_per_step": sum(s["read_bytes"] for s in measured) / len(measured),
        "written_bytes_per_step": sum(s["written_bytes"] for s in measured) / len(measured),
        "peak_rss_bytes": report["process_peak_rss_bytes"],
        "step_peak_rss_bytes": max(s["peak_rss_bytes"] for s in measured),
        "losses": [s["loss"] for s in report["steps"]],
        "clipped_steps": sum(bool(s.get("clipped")) for s in report["steps"]),
        "predicted_step_s": measured[-1].get("predicted_step_s"),
        "profile_s": {
            key: sum(s["profile_s"][key] for s in measured) / len(measured) for key in PROFILE_KEYS
        }
        if "profile_s" in measured[0]
        else None,
    }


def ours_largest_layer_params(budget_gb: float, hidden: int, precision: str) -> int:
    """Largest single layer our engine accepts under `budget_gb`: an untied embedding and LM head
    of `hidden` columns (the engine updates them in slices of `offload.sub_group_size`), found
    by bisection on the vocabulary of a one-block model built on the meta device. The engine's
    own refusal names the budget it needs, with this process's baseline RSS counted."""
    import transformers
    from offload_budget import smallest_budget_gb

    from stalwart.offload.engine import empty_parameters

    def fits(vocab: int) -> bool:
        with empty_parameters():
            model = transformers.LlamaForCausalLM(llama_config(1, hidden, vocab, 256))
        return smallest_budget_gb(model, precision, 1 << 23) <= budget_gb

    low, high = 0, 1 << 14
    while fits(high):
        low, high = high, 2 * high
    while high - low > max(low // 64, 64):
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low * hidden


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=87)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--steps", type=int, default=4, help="steps per system; the first is warm-up"
    )
    parser.add_argument("--budget-gb", type=float, default=1.0, help="our host memory budget")
    parser.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        default="bf16",
        help="ours: bf16 working parameters + fp32 master and AdamW state (DeepSpeed's scheme), "
        "or fp32 throughout",
    )
    parser.add_argument("--nvme-root", default=str(REPO / "runs" / "bench" / "offload-nvme"))
    parser.add_argument("--nvme-path", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["ours", "deepspeed"], help=argparse.SUPPRESS)
    parser.add_argument("--skip-deepspeed", action="store_true")
    parser.add_argument("--timeout-s", type=int, default=3600)
    parser.add_argument("--json", help="write the figures as one JSON object to this file")
    args = parser.parse_args()

    if args.child:
        report = child_ours(args) if args.child == "ours" else child_deepspeed(args)
        report["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(report))
        return

    import torch

    from stalwart.offload.aio import AioSettings, make_aio, measure_bandwidth
    from stalwart.offload.planner import measure_machine

    Path(args.nvme_root).mkdir(parents=True, exist_ok=True)
    aio = make_aio(AioSettings(), lockable_bytes=256 << 20)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    compute_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    machine = measure_machine(None, None, device, compute_dtype)
    bandwidth = measure_bandwidth(aio, args.nvme_root, num_bytes=1 << 30, chunk_bytes=64 << 20)
    aio.close()

    print(
        f"model: Llama, {args.layers} layers x {args.hidden} wide, batch {args.batch} x {args.seq} tokens",
        flush=True,
    )
    ours_raw = run_child("ours", args, args.layers, args.steps)
    if "error" in ours_raw:
        raise SystemExit(f"our engine failed: {ours_raw['error']}")
    ours = summarise(ours_raw, args, warmup=1)
    num_params = ours["num_params"]
    tokens = args.batch * args.seq
    # Dense layers at the matmul rate, plus causal attention (forward 2 s w FLOPs per token and
    # layer over half the keys, 3x with the backward) at the attention kernel's own rate: no
    # parameter count sees it, and at long sequences it is most of the compute.
    dense_s = 6 * num_params * tokens / machine.compute_flops_per_s
    attention_rate = machine.attention_flops_per_s or machine.compute_flops_per_s
    attention_s = 6 * args.seq * tokens * args.hidden * args.layers / attention_rate
    compute_s = dense_s + attention_s
    nvme_s = num_params * (16 / bandwidth.read_bytes_per_s + 14 / bandwidth.write_bytes_per_s)
    host_s = 30 * num_params / machine.host_copy_bytes_per_s
    lower_bound_s = max(compute_s, nvme_s, host_s)
    budget_bytes = int(args.budget_gb * GIB)

    deepspeed = deepspeed_half = None
    if not args.skip_deepspeed:
        raw = run_child("deepspeed", args, args.layers, args.steps)
        deepspeed = summarise(raw, args, warmup=1) if "error" not in raw else raw
        half_raw = run_child("deepspeed", args, max(args.layers // 2, 1), 2)
        deepspeed_half = (
            summarise(half_raw, args, warmup=1) if "error" not in half_raw else half_raw
        )

    rows = [(f"ours ({args.precision}, NVMe)", ours)]
    if deepspeed and "error" not in deepspeed:
        rows.append(("DeepSpeed ZeRO-3 (bf16, NVMe)", deepspeed))
    print()
    print(
        f"{'system':32} {'tokens/s':>9} {'step s':>8} {'read GB/step':>13} {'written GB/step':>16} {'peak RSS GiB':>13}"
    )
    for name, row in rows:
        print(
            f"{name:32} {row['tokens_per_s']:9.1f} {row['step_s']:8.2f} {row['read_bytes_per_step'] / 1e9:13.2f} "
            f"{row['written_bytes_per_step'] / 1e9:16.2f} {row['peak_rss_bytes'] / GIB:13.2f}"
        )
    if deepspeed and "error" in deepspeed:
        print(f"DeepSpeed failed: {deepspeed['error']}")
    state_bytes = 16 * num_params
    print(
        f"\nparameters {num_params / 1e6:.1f} M, training state {state_bytes / GIB:.2f} GiB "
        f"= {state_bytes / budget_bytes:.1f}x our host budget of {args.budget_gb:.2f} GiB"
    )
    print(
        f"machine: compute {machine.compute_flops_per_s / 1e9:.1f} GFLOP/s "
        f"({args.precision} matmuls, {machine.device_name}), host copy "
        f"{machine.host_copy_bytes_per_s / 1e9:.2f} GB/s; NVMe (O_DIRECT, 64 MiB requests) read "
        f"{bandwidth.read_bytes_per_s / 1e9:.2f} GB/s, write {bandwidth.write_bytes_per_s / 1e9:.2f} GB/s"
    )
    print(
        f"lower bound per step: {lower_bound_s:.2f} s = max(compute {compute_s:.2f} s "
        f"[dense {dense_s:.2f} + attention {attention_s:.2f} at {attention_rate / 1e9:.1f} GFLOP/s], "
        f"NVMe {nvme_s:.2f} s, "
        f"host memory {host_s:.2f} s); ours {ours['step_s']:.2f} s = {ours['step_s'] / lower_bound_s:.2f}x"
        + (
            f"; planner predicted {ours['predicted_step_s']:.2f} s"
            if ours["predicted_step_s"]
            else ""
        )
    )
    print(
        f"ours: {ours['clipped_steps']} of {args.steps} steps clipped (redone by the optimizer from stored gradients)"
    )
    if ours["profile_s"]:
        print(
            "ours, where a step goes (s): "
            + ", ".join(f"{key} {value:.2f}" for key, value in ours["profile_s"].items())
        )
    if ours_raw.get("plan"):
        print(ours_raw["plan"])

    speedup = None
    largest = {}
    free_bytes = shutil.disk_usage(args.nvme_root).free
    # Two versions of (working parameters + fp32 master, exp_avg, exp_avg_sq) and a 4 B gradient
    # span per parameter: 28 B in fp32 (the parameters are the masters), 32 B with bf16 copies.
    largest["ours_params_bounded_by_nvme"] = free_bytes // (32 if args.precision == "bf16" else 28)
    largest["ours_largest_layer_params"] = ours_largest_layer_params(
        4.0, args.hidden, args.precision
    )
    if deepspeed and "error" not in deepspeed:
        speedup = ours["tokens_per_s"] / deepspeed["tokens_per_s"]
        print(f"\nspeedup vs DeepSpeed: {speedup:.2f}x tokens/s")
        if deepspeed_half and "error" not in deepspeed_half:
            # DeepSpeed's host memory grows with the model (fp32 gradient partitions stay in host
            # memory); a line through two measured sizes gives the largest model under 4 GiB.
            n1, r1 = deepspeed_half["num_params"], deepspeed_half["peak_rss_bytes"]
            n2, r2 = deepspeed["num_params"], deepspeed["peak_rss_bytes"]
            slope = (r2 - r1) / (n2 - n1) if n2 != n1 else 0.0
            largest["deepspeed_params_at_4gib"] = (
                int(n2 + (4 * GIB - r2) / slope) if slope > 0 else None
            )
            largest["deepspeed_rss_bytes_per_param"] = slope
    print(
        f"largest model under a 4 GiB host budget: ours - any depth, bounded by NVMe space "
        f"({largest['ours_params_bounded_by_nvme'] / 1e9:.1f} B params on this disk) with layers up to "
        f"{largest['ours_largest_layer_params'] / 1e6:.0f} M params"
        + (
            f"; DeepSpeed - about {largest['deepspeed_params_at_4gib'] / 1e6:.0f} M params "
            f"(peak RSS grows {largest['deepspeed_rss_bytes_per_param']:.1f} B/param, extrapolated from two sizes)"
            if largest.get("deepspeed_params_at_4gib")
            else ""
        )
    )

    result = {
        "model": {
            "layers": args.layers,
            "hidden": args.hidden,
            "vocab": args.vocab,
            "num_params": num_params,
        },
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "precision": args.precision,
        "host_budget_gb": args.budget_gb,
        "state_to_budget_ratio": state_bytes / budget_bytes,
        "peak_rss_gb": ours["peak_rss_bytes"] / GIB,
        "speedup_vs_deepspeed": speedup,
        "step_vs_lower_bound": ours["step_s"] / lower_bound_s,
        "lower_bound_s": lower_bound_s,
        "lower_bound_terms_s": {
            "compute": compute_s,
            "compute_dense": dense_s,
            "compute_attention": attention_s,
            "nvme": nvme_s,
            "host_memory": host_s,
        },
        "ours": ours,
        "deepspeed": deepspeed,
        "deepspeed_half_depth": deepspeed_half,
        "machine": {
            "compute_flops_per_s": machine.compute_flops_per_s,
            "attention_flops_per_s": machine.attention_flops_per_s,
            "host_copy_bytes_per_s": machine.host_copy_bytes_per_s,
            "nvme_read_bytes_per_s": bandwidth.read_bytes_per_s,
            "nvme_write_bytes_per_s": bandwidth.write_bytes_per_s,
            "device": machine.device_name,
        },
        "largest_model_4gib": largest,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

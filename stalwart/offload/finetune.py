"""`stalwart finetune`: the workstation job, an HF model fine-tuned with NVMe offload.

    stalwart finetune ./Llama-3.2-1B data/train.parquet --nvme-path /mnt/nvme/offload \
        --max-host-memory-gb 8 --steps 200 --batch-size 4 --context-length 1024

The model is built with empty parameters and its weights are streamed, one tensor at a time,
from the directory's `*.safetensors` files into the NVMe store, so a model larger than host
memory can be fine-tuned. Data: a token Parquet dataset (`stalwart.data.dataset`). Every
`--checkpoint-every` steps a durable checkpoint is streamed from the store to
`<run-dir>/checkpoints` (`--resume` continues from the newest); at the end the weights are
written to `<run-dir>/model` as a Hugging Face directory (config + model.safetensors).

This function is a command body (what `launch/cli.py` runs), so it wires the durable tier in
at call time; the engine itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from stalwart.config import OffloadConfig, OptimConfig
from stalwart.offload.engine import GIB, OffloadEngine, empty_parameters
from stalwart.offload.loss import TokenCrossEntropy

logger = logging.getLogger(__name__)


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="local Hugging Face model directory (config.json + *.safetensors)"
    )
    parser.add_argument("data", help="token Parquet file, directory or glob (column 'tokens')")
    parser.add_argument(
        "--nvme-path", help="existing directory on a fast SSD for the offloaded state"
    )
    parser.add_argument("--offload-device", choices=["nvme", "cpu"], default="nvme")
    parser.add_argument("--max-host-memory-gb", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches per optimizer step"
    )
    parser.add_argument("--context-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument(
        "--eos-id", type=int, default=None, help="EOS id for Parquet files not written by stalwart"
    )
    parser.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        default="bf16",
        help="bf16: bf16 working parameters with fp32 master weights and AdamW state (DeepSpeed's "
        "bf16 mode); fp32: everything in float32, bit-identical to in-memory AdamW",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", default="runs/finetune")
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, help="steps between durable checkpoints; 0 = off"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --run-dir"
    )


def _check_arguments(args) -> None:
    for name in ("steps", "batch_size", "grad_accum", "context_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.offload_device == "nvme" and not args.nvme_path:
        raise ValueError(
            "--nvme-path is required with --offload-device nvme (an existing directory on an SSD)"
        )
    if not (Path(args.model) / "config.json").is_file():
        raise ValueError(
            f"model {args.model!r} is not a local Hugging Face model directory (no config.json)"
        )


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it; pickled weights are refused."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = (
            f" (found {pickled}: convert them to safetensors; pickled weights are not loaded)"
            if pickled
            else ""
        )
        raise ValueError(f"{model_dir} has no *.safetensors weights{hint}")
    from safetensors import safe_open

    where = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                where[name] = path
    return where


def streaming_initializer(model_dir: Path):
    """An `init_fn` for the engine that copies each parameter from the model's files."""
    from safetensors import safe_open

    where = weight_files(model_dir)

    def init_fn(name: str, target: torch.Tensor) -> None:
        path = where.get(name)
        if path is None:
            raise ValueError(f"{model_dir}: no tensor named {name!r} in the safetensors files")
        with safe_open(path, framework="pt") as handle:
            tensor = handle.get_tensor(name)
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"{name}: file has shape {tuple(tensor.shape)}, the model {tuple(target.shape)}"
            )
        target.copy_(tensor.to(target.dtype))
        del tensor

    return init_fn


def learning_rate(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to `peak`, cosine decay to 10% of it."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def run_finetune(args) -> dict:
    """Run the job; returns the last step's metrics (also printed, and logged to metrics.jsonl)."""
    import transformers

    from stalwart.data.dataset import TokenDataset
    from stalwart.snapshot.persist import latest_step, open_checkpoint_streaming, write_checkpoint

    _check_arguments(args)
    model_dir = Path(args.model)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    hf_config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    hf_config.use_cache = False  # no KV cache in training
    dataset = TokenDataset(
        args.data, args.context_length, eos_id=args.eos_id, vocab_size=hf_config.vocab_size
    )
    with empty_parameters():
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    offload = OffloadConfig(
        device=args.offload_device,
        nvme_path=args.nvme_path,
        max_host_memory_gb=args.max_host_memory_gb,
    )
    optim = OptimConfig(lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip)
    engine = OffloadEngine(
        model,
        offload,
        optim,
        # Next-token cross-entropy; with a large vocabulary the engine runs the LM head and the
        # loss in chunks of tokens, so the logits never take the host-memory budget whole.
        loss_fn=TokenCrossEntropy(),
        run_dir=run_dir,
        init_fn=streaming_initializer(model_dir),
        precision=args.precision,
    )
    try:  # a micro-batch too long for the host budget fails here, before any step
        engine.check_activation_room(args.batch_size * args.context_length, args.context_length)
    except ValueError:
        engine.close()
        raise
    start = 0
    if args.resume:
        if latest_step(run_dir) is None:
            raise ValueError(f"--resume: no checkpoint under {run_dir}/checkpoints")
        step = latest_step(run_dir)
        # Streamed from the file into the store: the state never has to fit in memory.
        engine.load_checkpoint_shards(open_checkpoint_streaming(run_dir, step, names=["offload"]))
        start = step  # checkpoints are written under the number of steps done
        logger.info("resumed from step %d", start)

    order = np.random.default_rng(args.seed).permutation(len(dataset))
    per_step = args.batch_size * args.grad_accum
    metrics: dict = {}
    with open(run_dir / "metrics.jsonl", "a") as log:
        for step in range(start, args.steps):
            micro_batches = []
            for micro in range(args.grad_accum):
                first = (step * per_step + micro * args.batch_size) % len(dataset)
                indices = [int(order[(first + i) % len(dataset)]) for i in range(args.batch_size)]
                windows = dataset.get_batch(indices)
                micro_batches.append((windows[:, :-1], windows[:, 1:]))
            lr = learning_rate(step, args.lr, args.warmup_steps, args.steps)
            start_s = time.perf_counter()
            metrics = engine.train_step(micro_batches, lr)
            tokens = per_step * args.context_length
            metrics.update(
                step=step + 1, lr=lr, tokens_per_s=tokens / (time.perf_counter() - start_s)
            )
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            peak = metrics.get("peak_rss_bytes") or 0
            print(
                f"step {step + 1}/{args.steps} loss {metrics['loss']:.4f} grad_norm {metrics['grad_norm']:.3f} "
                f"lr {lr:.2e} {metrics['tokens_per_s']:.0f} tok/s peak RSS {peak / GIB:.2f} GiB"
                + (" (skipped: non-finite gradients)" if metrics["skipped"] else ""),
                flush=True,
            )
            if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
                write_checkpoint(
                    run_dir, step + 1, engine.checkpoint_shards(), {"step": step + 1}, keep=2
                )

    output = run_dir / "model"
    output.mkdir(exist_ok=True)
    hf_config.save_pretrained(output)
    for extra in model_dir.iterdir():  # tokenizer files travel with the model
        if extra.is_file() and (
            extra.name.startswith("tokenizer") or extra.name.endswith(("vocab.json", "merges.txt"))
        ):
            shutil.copy2(extra, output / extra.name)
    engine.export_safetensors(output / "model.safetensors", metadata={"format": "pt"})
    print(f"fine-tuned weights: {output}")
    engine.close()
    return metrics

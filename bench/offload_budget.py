"""The smallest host budget the offload engine accepts for a Llama-shaped model, with each layer's
optimizer update whole and in slices (`offload.sub_group_size`).

    .venv/bin/python bench/offload_budget.py --hidden 4096 --intermediate 14336 --layers 32 \\
        --vocab 128256 --heads 32 --kv-heads 8

The model is built on the meta device and nothing is trained or written: the engine refuses a
tiny budget before it creates its store, and its message names the smallest budget that works
for this process (whose baseline RSS, the imports, counts in the budget).

With `--train-steps N --nvme-path DIR` it then trains N steps (random tokens, `--seq` long) at
the smallest sliced budget and prints each step's time and peak RSS against the budget. The
store takes about 32 B per parameter on DIR; `--layers 1` keeps the largest layers (embedding,
LM head) and one block, which is what sets the budget.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile

import transformers

from stalwart.config import OffloadConfig, OptimConfig
from stalwart.offload.engine import OffloadEngine, empty_parameters


def smallest_budget_gb(model, precision: str, sub_group_size: int) -> float:
    with tempfile.TemporaryDirectory() as directory:
        config = OffloadConfig(
            device="nvme",
            nvme_path=directory,
            max_host_memory_gb=0.01,
            sub_group_size=sub_group_size,
        )
        try:
            OffloadEngine(model, config, OptimConfig(), loss_fn=None, precision=precision)
        except ValueError as refused:
            found = re.search(r"at least (\d+\.\d+)", str(refused))
            if found is None:
                raise
            return float(found.group(1))
    raise AssertionError("a 0.01 GiB budget was accepted")


def train_at_budget(model, args, budget_gb: float) -> list[dict]:
    import torch

    from stalwart.offload.engine import GIB
    from stalwart.offload.loss import TokenCrossEntropy

    if not args.nvme_path:
        raise SystemExit("--train-steps needs --nvme-path (an existing directory)")
    config = OffloadConfig(
        device="nvme",
        nvme_path=args.nvme_path,
        max_host_memory_gb=budget_gb,
        sub_group_size=args.sub_group_size,
    )
    engine = OffloadEngine(
        model,
        config,
        OptimConfig(lr=1e-4, grad_clip=1.0),
        loss_fn=TokenCrossEntropy(),
        precision=args.precision,
    )
    sliced = [unit.name for unit in engine.units if unit.slice_bytes]
    print(f"training at {budget_gb:.2f} GiB; layers updated in slices: {', '.join(sliced)}")
    generator = torch.Generator().manual_seed(0)
    steps = []
    try:
        for step in range(args.train_steps):
            tokens = torch.randint(0, args.vocab, (1, args.seq + 1), generator=generator)
            metrics = engine.train_step([(tokens[:, :-1], tokens[:, 1:])], lr=1e-4)
            peak = metrics["peak_rss_bytes"]
            steps.append(
                {
                    "step_s": metrics["step_time_s"],
                    "loss": metrics["loss"],
                    "peak_rss_gb": None if peak is None else peak / GIB,
                    "budget_gb": budget_gb,
                    "gb_read": metrics["bytes_read"] / 1e9,
                    "gb_written": metrics["bytes_written"] / 1e9,
                }
            )
            print(f"step {step + 1}: {json.dumps(steps[-1])}", flush=True)
    finally:
        engine.close()
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--tie", action="store_true", help="tie the embedding and the LM head")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--sub-group-size", type=int, default=1 << 23)
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--nvme-path", help="an existing directory for the store (--train-steps)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=args.tie,
    )
    with empty_parameters():
        model = transformers.LlamaForCausalLM(config)
    num_params = sum(p.numel() for p in model.parameters())
    result = {
        "num_params": num_params,
        "precision": args.precision,
        "whole_gb": smallest_budget_gb(model, args.precision, 1 << 40),
        "sliced_gb": smallest_budget_gb(model, args.precision, args.sub_group_size),
        "sub_group_size": args.sub_group_size,
    }
    print(
        f"{num_params / 1e9:.2f} B parameters, {args.precision}: smallest host budget "
        f"{result['whole_gb']:.2f} GiB with whole updates, {result['sliced_gb']:.2f} GiB with "
        f"updates in slices of {args.sub_group_size} elements"
    )
    if args.train_steps:
        result["training"] = train_at_budget(model, args, result["sliced_gb"] + 0.02)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()

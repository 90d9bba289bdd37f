"""Child process of test_memory_budget: trains a model ~4x bigger than its host budget.

Prints one JSON line with the process's peak RSS (ru_maxrss covers the whole life of the
process, imports included) and the sizes involved.
"""

import json
import resource
import sys

import torch
import transformers
from offload_helpers import lm_loss

from stalwart.config import OffloadConfig, OptimConfig
from stalwart.offload.engine import OffloadEngine, empty_parameters
from stalwart.offload.loss import TokenCrossEntropy


def main(
    nvme_path: str,
    budget_gb: float,
    num_layers: int,
    hidden: int,
    steps: int,
    vocab: int = 512,
    length: int = 32,
    loss: str = "plain",
    sub_group_size: int = 1 << 23,
) -> None:
    """`loss`: "plain" (whole logits), "chunked" (TokenCrossEntropy, the engine chooses the
    chunks), "unchunked" (TokenCrossEntropy with chunking off)."""
    loss_fn = {
        "plain": lm_loss,
        "chunked": TokenCrossEntropy(),
        "unchunked": TokenCrossEntropy(chunk_tokens=0),
    }[loss]
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=max(64, length),
    )
    with empty_parameters():
        model = transformers.LlamaForCausalLM(config)
    num_params = sum(p.numel() for p in model.parameters())
    engine = OffloadEngine(
        model,
        OffloadConfig(
            device="nvme",
            nvme_path=nvme_path,
            max_host_memory_gb=budget_gb,
            buffer_count=2,
            sub_group_size=sub_group_size,
        ),
        OptimConfig(lr=1e-3, grad_clip=1.0),
        loss_fn=loss_fn,
    )
    generator = torch.Generator().manual_seed(0)
    losses, step_peaks, chunks, trims = [], [], [], []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (1, length + 1), generator=generator)
        metrics = engine.train_step([(tokens[:, :-1], tokens[:, 1:])], lr=1e-3)
        losses.append(metrics["loss"])
        step_peaks.append(metrics["peak_rss_bytes"])
        chunks.append(metrics["loss_chunk_tokens"])
        trims.append(metrics["heap_trims"])
    describe = engine.describe()
    engine.close()
    peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "peak_rss_bytes": peak_rss_bytes,
                "budget_bytes": int(budget_gb * (1 << 30)),
                "num_params": num_params,
                "training_state_bytes": 16
                * num_params,  # fp32 parameters, gradients, exp_avg, exp_avg_sq
                "losses": losses,
                "step_peaks": step_peaks,
                "loss_chunk_tokens": chunks,
                "heap_trims": trims,
                "bytes_written_last_step": metrics["bytes_written"],
                "describe": describe,
                "sliced_units": sum(1 for unit in engine.units if unit.slice_bytes),
            }
        )
    )


if __name__ == "__main__":
    extra = sys.argv[6:]
    main(
        sys.argv[1],
        float(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        int(sys.argv[5]),
        *([int(extra[0]), int(extra[1]), extra[2]] if extra else []),
        *([int(extra[3])] if len(extra) > 3 else []),
    )

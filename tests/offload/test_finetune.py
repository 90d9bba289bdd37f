"""`stalwart finetune`: HF directory + token Parquet + NVMe offload, one command; resumable."""

import argparse
import json

import numpy as np
import pytest
import torch
import transformers

from stalwart.data.dataset import write_token_parquet
from stalwart.offload.finetune import add_finetune_arguments, run_finetune


@pytest.fixture
def model_and_data(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "model")  # safetensors
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 95, rng.integers(20, 60)) for _ in range(64)]
    write_token_parquet(tmp_path / "train.parquet", documents, eos_id=95, vocab_size=96)
    (tmp_path / "nvme").mkdir()
    return tmp_path, model


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    add_finetune_arguments(parser)
    return parser.parse_args(
        [str(tmp_path / "model"), str(tmp_path / "train.parquet"), "--nvme-path", str(tmp_path / "nvme"),
         "--max-host-memory-gb", "4", "--batch-size", "2", "--context-length", "16", "--lr", "1e-3",
         "--warmup-steps", "1", "--run-dir", str(tmp_path / "run"), *extra]
    )  # fmt: skip


def test_finetune_trains_and_exports_a_loadable_model(model_and_data):
    tmp_path, original = model_and_data
    metrics = run_finetune(_args(tmp_path, "--steps", "3", "--grad-accum", "2"))
    assert metrics["step"] == 3 and np.isfinite(metrics["loss"])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    tuned = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "run" / "model", local_files_only=True
    )
    before, after = dict(original.named_parameters()), dict(tuned.named_parameters())
    assert before.keys() == after.keys()
    # Weights were streamed in from the files and trained: close to, but not equal to, the start.
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(before[name], after[name])
    assert (before[name] - after[name]).abs().max() < 0.05


def test_finetune_resumes_from_its_checkpoint(model_and_data):
    tmp_path, _ = model_and_data
    straight = run_finetune(
        _args(tmp_path, "--steps", "3", "--run-dir", str(tmp_path / "straight"))
    )
    run_finetune(_args(tmp_path, "--steps", "2", "--checkpoint-every", "1"))
    resumed = run_finetune(_args(tmp_path, "--steps", "3", "--resume"))
    assert resumed["step"] == 3
    assert resumed["loss"] == straight["loss"]
    a = (tmp_path / "straight" / "model" / "model.safetensors").read_bytes()
    b = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    assert a == b


def test_finetune_errors_are_clear(model_and_data, tmp_path):
    tmp, _ = model_and_data
    args = _args(tmp, "--steps", "1")
    args.nvme_path = None
    with pytest.raises(ValueError, match="--nvme-path is required"):
        run_finetune(args)
    args = _args(tmp, "--steps", "1")
    args.model = str(tmp / "nowhere")
    with pytest.raises(ValueError, match="no config.json"):
        run_finetune(args)


def test_finetune_refuses_a_micro_batch_too_long_for_the_budget_before_training(model_and_data):
    tmp, _ = model_and_data
    args = _args(tmp, "--steps", "1", "--batch-size", "2000000")
    with pytest.raises(ValueError, match="a micro-batch of 32000000 tokens needs about"):
        run_finetune(args)
    metrics = tmp / "run" / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""
    assert list((tmp / "nvme").iterdir()) == []  # the engine's files went with it

"""Child process of test_resume: trains the GPT through the offload engine with a durable
checkpoint after every step; can kill itself in the middle of a step, or resume."""

import json
import os
import signal
import sys

from offload_helpers import batches, lm_loss, offload_config, optim_config, tiny_gpt
from safetensors.torch import save_file

from stalwart.offload.engine import OffloadEngine
from stalwart.snapshot.persist import load_checkpoint, write_checkpoint


def main(
    nvme_path: str,
    checkpoint_root: str,
    total_steps: int,
    kill_in_step: int,
    resume: bool,
    out: str,
):
    steps = batches(total_steps, num_micro=2, vocab=259, seed=3)
    current = {"step": 0}

    def loss_fn(outputs, targets):
        if current["step"] + 1 == kill_in_step:
            os.kill(os.getpid(), signal.SIGKILL)  # dies mid-step, speculative writes in flight
        return lm_loss(outputs, targets)

    engine = OffloadEngine(
        tiny_gpt(),
        offload_config(nvme_path),
        optim_config(grad_clip=0.5),
        loss_fn=loss_fn,
        optimizer_kernel="auto",
    )
    start = 0
    if resume:
        checkpoint = load_checkpoint(checkpoint_root)
        engine.load_checkpoint_shards(checkpoint.shards)
        start = checkpoint.run_meta["step"]
        assert engine.step_count == start
    for step in range(start, total_steps):
        current["step"] = step
        engine.train_step(steps[step], lr=1e-2)
        write_checkpoint(
            checkpoint_root, step + 1, engine.checkpoint_shards(), {"step": step + 1}, keep=2
        )
    save_file({name: t.contiguous() for name, t in engine.gather_parameters().items()}, out)
    print(json.dumps({"started_at": start, "step_count": engine.step_count}))
    engine.close()


if __name__ == "__main__":
    main(
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        sys.argv[5] == "resume",
        sys.argv[6],
    )

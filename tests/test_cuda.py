"""The GPU path of run.py, which the CPU tests cannot reach: skipped (with
the reason) where torch sees no CUDA device.

python -m pytest -q -m cuda tests
"""

import os
import subprocess

import pytest
import torch
from helpers import REPO, cli_env, launcher, write_config

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


def test_torchrun_on_every_gpu_with_mixed_precision(workspace, tmp_path):
    """`torchrun --standalone --nproc_per_node N run.py CONFIG` with N the
    number of visible GPUs: the tiny GPT-2 of the `workspace` fixture, two
    epochs (stage 0, then one continuous thought), `mixed_precision: True`
    (bf16 autocast, float32 weights), fast_path `auto` (compiled decoding on
    a GPU). It must exit 0 and print an accuracy line.

    With N >= 2 this covers the NCCL process group, FSDP sharding of the
    decoder blocks, sharded evaluation and checkpoints gathered from shards.
    With one GPU, run.py runs one NCCL process and does not wrap the model
    (FSDP is for several processes): the test then covers the NCCL group,
    CUDA placement, bf16 autocast, the compiled fast path (training passes
    and decoding) and checkpoint saving, but not FSDP."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: torch.cuda.is_available() is False")
    n = max(1, torch.cuda.device_count())
    root, model_dir = workspace
    config = write_config(tmp_path, model_dir, "cuda", save_path=str(tmp_path / "runs"), train_path=str(root / "train.json"),
                          val_path=str(root / "valid.json"), num_epochs=2, max_latent_stage=1, batch_size_training=4,
                          batch_size_eval=5, mixed_precision=True)
    done = subprocess.run(launcher(n) + [os.path.join(REPO, "run.py"), config], capture_output=True, text=True, cwd=tmp_path,
                          env=cli_env(tmp_path, WANDB_MODE="disabled"), timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    assert "Accuracy on validation set: " in done.stdout and "/ 5 = " in done.stdout, done.stdout[-2000:]
    if n > 1:
        assert "FSDP: " in done.stdout, done.stdout[-2000:]

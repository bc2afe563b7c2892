"""Safe to interrupt: a run killed with SIGKILL mid-epoch and restarted with
the same command ends with the weights of an uninterrupted run (one and two
processes); reference weights-only checkpoints still resume; retention; the
non-finite-loss guard; bf16 autocast with float32 master weights.

python -m pytest -q tests/test_resume.py
"""

import os
import signal
import subprocess
import time

import pytest
import torch
from helpers import checkpoints, cli_env, config_for, launcher, run_cli, write_config

import build
import evaluation
import run as cli
from checkpoints import read_state
from coconut import Coconut


def launch(args, tmp_path, torchrun):
    return subprocess.Popen(launcher(2 if torchrun else 1) + [os.path.join(os.path.dirname(cli.__file__), "run.py")] + args, cwd=tmp_path,
                            env=cli_env(tmp_path, WANDB_MODE="disabled"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def kill_when(folder, name, process, timeout=300):
    """SIGKILL the whole launch as soon as checkpoint `name` is complete."""
    deadline = time.time() + timeout
    while not os.path.exists(os.path.join(folder, name)):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    for pid in [process.pid] + descendants(process.pid):  # torchrun's workers too, wherever they are grouped
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def descendants(pid):
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(c) for c in children] + [d for c in children for d in descendants(int(c))]


@pytest.mark.slow
@pytest.mark.parametrize("torchrun", [False, True], ids=["1-process", "2-processes"])
def test_killed_mid_epoch_and_restarted_equals_uninterrupted(torchrun, workspace, tmp_path):
    root, model_dir = workspace
    common = dict(save_path=str(tmp_path / "runs"), train_path=str(root / "train.json"), val_path=str(root / "valid.json"), num_epochs=2,
                  batch_size_training=2 if torchrun else 4,
                  save_every_steps=1, reset_optimizer=False)  # AdamW state carries over the restart; dropout is on
    whole = write_config(tmp_path, model_dir, "whole", **common)
    done = run_cli([whole], tmp_path, torchrun=torchrun, WANDB_MODE="disabled")
    assert done.returncode == 0, done.stderr[-3000:]

    killed = write_config(tmp_path, model_dir, "killed", **common)
    folder = str(tmp_path / "runs" / "killed")
    kill_when(folder, "partial_2_2", launch([killed], tmp_path, torchrun))
    names = checkpoints(tmp_path, "killed")
    assert "checkpoint_2" not in names and any(n.startswith("partial_2_") for n in names)

    restarted = run_cli([killed], tmp_path, torchrun=torchrun, WANDB_MODE="disabled")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"resuming from {names[-1]}" in restarted.stdout
    final = torch.load(os.path.join(folder, "checkpoint_2"), weights_only=True)
    reference = torch.load(tmp_path / "runs" / "whole" / "checkpoint_2", weights_only=True)
    assert final.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)


def test_state_beside_weights_and_reference_checkpoints(workspace, tmp_path):
    root, model_dir = workspace
    configs = config_for(workspace, tmp_path, "state", num_epochs=1, reset_optimizer=False, keep_last=0)
    cli.run(configs, 0, 1, torch.device("cpu"))
    folder = tmp_path / "runs" / "state"
    state = read_state(str(folder / "checkpoint_1"))
    assert (state["epoch"], state["batches_done"]) == (1, 0)
    assert state["optimizer"]["state"] and state["config"]["name"] == "state" and len(state["rng"]) == 1
    assert (folder / "config.yaml").exists()

    # a reference checkpoint is weights only: a new run folder holding just that resumes from it
    plain = tmp_path / "runs" / "reference"
    plain.mkdir()
    (plain / "checkpoint_1").write_bytes((folder / "checkpoint_1").read_bytes())
    configs = config_for(workspace, tmp_path, "reference", num_epochs=2)
    cli.run(configs, 0, 1, torch.device("cpu"))
    assert configs.resume == 1 and checkpoints(tmp_path, "reference") == ["checkpoint_1", "checkpoint_2"]


def test_keep_last_keeps_the_best(workspace, tmp_path, monkeypatch):
    accuracies = iter([0.5, 0.1, 0.2, 0.3])
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: (next(accuracies), 0.0))
    configs = config_for(workspace, tmp_path, "keep", num_epochs=4, keep_last=2, batch_size_training=8, save_every_steps=1)
    cli.run(configs, 0, 1, torch.device("cpu"))
    folder = tmp_path / "runs" / "keep"
    # the two newest, and checkpoint_1 (best accuracy); mid-epoch ones pruned as they aged
    assert checkpoints(tmp_path, "keep") == ["checkpoint_1", "checkpoint_3", "checkpoint_4"]
    assert sorted(f for f in os.listdir(folder) if f.endswith(".state")) == [f"checkpoint_{i}.state" for i in (1, 3, 4)]
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_non_finite_loss_stops_without_saving(workspace, tmp_path, monkeypatch, capsys):
    real_forward = Coconut.forward
    calls = []

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls.append(1)
        return out._replace(loss=out.loss * float("nan")) if len(calls) == 5 else out

    monkeypatch.setattr(Coconut, "forward", forward)
    config = write_config(tmp_path, workspace[1], "nan", save_path=str(tmp_path / "runs"), train_path=str(workspace[0] / "train.json"),
                          val_path=str(workspace[0] / "valid.json"), batch_size_training=4, num_epochs=2, save_every_steps=1)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert cli.main([config]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: non-finite training loss at epoch 1, batch 4: stopping without saving"
    assert checkpoints(tmp_path, "nan") == ["partial_1_1", "partial_1_2", "partial_1_3", "partial_1_4"]


def test_mixed_precision_keeps_float32_master_weights(workspace, tmp_path):
    configs = config_for(workspace, tmp_path, "amp", num_epochs=1, mixed_precision=True, reset_optimizer=False)
    model, _, _ = build.build_model(configs)
    with build.precision(configs, torch.device("cpu")):
        ids = torch.tensor([[5, 6, 7]])
        assert model(ids, torch.ones_like(ids), ids).logits.dtype == torch.bfloat16
    cli.run(configs, 0, 1, torch.device("cpu"))
    state = read_state(str(tmp_path / "runs" / "amp" / "checkpoint_1"))
    weights = torch.load(tmp_path / "runs" / "amp" / "checkpoint_1", weights_only=True)
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert moments and {m.dtype for m in moments} == {torch.float32}

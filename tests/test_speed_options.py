"""run.py's speed options: `sync_every` (losses read in groups: the same
metrics, checkpoints and non-finite stop as reading every batch, on one and
two processes), `fast_path` (chosen per device; the static path trains and
evaluates as the eager one) and `tf32` (only when asked for).

python -m pytest -q tests/test_speed_options.py
"""

import importlib.util
import json
import os
import re

import pytest
import torch
from helpers import REPO, checkpoints, cli_env, config_for, launcher, write_config

import build
import run as cli
from utils import Config, load_config


def metrics_rows(tmp_path, name):
    with open(tmp_path / "runs" / name / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k != "wall_time"} for line in f]


def weights(tmp_path, name, checkpoint):
    return torch.load(tmp_path / "runs" / name / checkpoint, weights_only=True)


@pytest.mark.slow
def test_sync_every_logs_and_saves_what_every_batch_would(workspace, tmp_path, capsys):
    runs = {}
    for sync_every in (1, 4):
        name = f"sync{sync_every}"
        # 24 samples in batches of 4: six batches an epoch, a save after every second one
        configs = config_for(workspace, tmp_path, name, num_epochs=2, batch_size_training=4, save_every_steps=2,
                             reset_optimizer=False, sync_every=sync_every)
        cli.run(configs, 0, 1, torch.device("cpu"))
        runs[sync_every] = metrics_rows(tmp_path, name)
        assert re.search(r"^Epoch 2: 6 optimizer steps in [\d.]+ s \([\d.]+ steps/s\)$", capsys.readouterr().out, re.M)
    assert runs[1] == runs[4]
    assert sum("train/loss" in row for row in runs[4]) == 12  # every batch, under its own step
    assert checkpoints(tmp_path, "sync1") == checkpoints(tmp_path, "sync4")
    for name in checkpoints(tmp_path, "sync1"):
        a, b = weights(tmp_path, "sync1", name), weights(tmp_path, "sync4", name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


NAN_ON_RANK_1 = """
import os, sys
sys.path.insert(0, {repo!r})
import run
from coconut import Coconut

real_forward = Coconut.forward
calls = []


def forward(self, *args, **kwargs):
    out = real_forward(self, *args, **kwargs)
    if self.training:
        calls.append(1)
    if os.environ.get("RANK") == "1" and self.training and len(calls) == 3:
        return out._replace(loss=out.loss * float("nan"))
    return out


Coconut.forward = forward
sys.exit(run.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_non_finite_loss_on_one_rank_stops_both_at_the_next_sync(workspace, tmp_path):
    """Rank 1 alone diverges at its third batch; neither rank checks until
    the end of the epoch, where both stop with the same message and nothing
    is saved."""
    import subprocess

    script = tmp_path / "nan_run.py"
    script.write_text(NAN_ON_RANK_1.format(repo=REPO))
    root, model_dir = workspace
    config = write_config(tmp_path, model_dir, "nan2", train_path=str(root / "train.json"), val_path=str(root / "valid.json"),
                          batch_size_training=2, num_epochs=2, sync_every=50)
    done = subprocess.run(launcher(2) + [str(script), config], capture_output=True, text=True, cwd=tmp_path,
                          env=cli_env(tmp_path, WANDB_MODE="disabled"), timeout=600)
    assert done.returncode != 0
    assert "error: non-finite training loss at epoch 1, batch 2: stopping without saving" in done.stderr
    assert "Accuracy on validation set" not in done.stdout  # neither rank went on to evaluate
    assert checkpoints(tmp_path, "nan2") == []


def test_static_fast_path_trains_and_evaluates_as_the_eager_path(workspace, tmp_path, capsys):
    rows = {}
    for mode in ("eager", "static"):
        configs = config_for(workspace, tmp_path, mode, num_epochs=2, batch_size_training=4, batch_size_eval=3, fast_path=mode)
        cli.run(configs, 0, 1, torch.device("cpu"))
        out = capsys.readouterr().out
        assert ("fast path: static" in out) == (mode == "static")
        rows[mode] = metrics_rows(tmp_path, mode)
    assert [r.get("eval/acc") for r in rows["eager"]] == [r.get("eval/acc") for r in rows["static"]]
    for eager, fast in zip(rows["eager"], rows["static"]):  # dropout draws the same masks: losses agree to rounding
        for key in ("train/loss", "eval/loss"):
            if key in eager:
                assert abs(eager[key] - fast[key]) < 1e-4, (key, eager, fast)
    a, b = weights(tmp_path, "eager", "checkpoint_2"), weights(tmp_path, "static", "checkpoint_2")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_fast_path_values_read_as_written(workspace, tmp_path):
    config_for(workspace, tmp_path, "modes")  # writes modes.yaml
    path = tmp_path / "modes.yaml"
    text = path.read_text()
    for mode in ("auto", "compiled", "static", "eager"):  # unquoted, in the file and on the command line
        path.write_text(text + f"fast_path: {mode}\n")
        assert load_config(str(path)).fast_path == mode
        assert load_config(str(path), [f"fast_path={mode}"]).fast_path == mode


def test_fast_path_mode_per_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert build.fast_path_mode(Config(fast_path="auto"), cpu) == "eager"  # the reference path on a CPU
    assert build.fast_path_mode(Config(fast_path="auto"), gpu) == "compiled"
    for mode in ("compiled", "static", "eager"):
        assert build.fast_path_mode(Config(fast_path=mode), cpu) == mode == build.fast_path_mode(Config(fast_path=mode), gpu)


def test_tf32_only_when_asked_for():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        build.set_tf32(Config(tf32=False), torch.device("cuda", 0))
        assert matmul.fp32_precision == before != "tf32"
        build.set_tf32(Config(tf32=True), torch.device("cpu"))  # a GPU setting: a CPU run is left alone
        assert matmul.fp32_precision == before
        build.set_tf32(Config(tf32=True), torch.device("cuda", 0))
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


@pytest.mark.slow
def test_run_benchmark_reads_the_steps_per_second_run_py_prints(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(REPO, "benchmarks", "bench_run.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--models", "quickstart", "--stages", "final", "--fast-paths", "eager,static", "--precisions", "fp32",
                "--samples", "96", "--out", str(tmp_path)])
    rows = re.findall(r"^\| quickstart \| final \| (\w+) \| fp32 \| ([\d.]+) \|$", capsys.readouterr().out, re.M)
    assert [mode for mode, _ in rows] == ["eager", "static"] and all(float(rate) > 0 for _, rate in rows)

"""The run's local metrics file and the plot command, on a real run: the
built-in graph task, the offline tiny-model builder, run.py over a CoT stage
and two latent stages, then metrics.py renders the PNGs. Also: a restarted
run keeps one history, torn lines are skipped, progress bars are drawn by the
main process only.

python -m pytest -q tests/test_metrics.py
"""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, cli_env, write_config

import metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(*args, cwd=REPO, env=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory):
    """A finished Coconut run on generated graph data with a built tiny model:
    (run folder, run.py's result)."""
    root = tmp_path_factory.mktemp("graph-run")
    made = cli("preprocessing/tasks.py", "graph", "--train", 48, "--valid", 6, "--test", 0, "--out-dir", root, "--max-hops", 3)
    assert made.returncode == 0, made.stderr
    built = cli("preprocessing/tiny_model.py", root / "graph_train.json", "--out", root / "model", "--n-layer", 2, "--n-embd", 32, "--n-head", 2)
    assert built.returncode == 0, built.stderr
    config = write_config(
        root, str(root / "model"), "graph", train_path=str(root / "graph_train.json"), val_path=str(root / "graph_valid.json"),
        max_latent_stage=2, num_epochs=3, batch_size_training=16,
    )
    done = cli(os.path.join(REPO, "run.py"), config, cwd=root, env=cli_env(root, WANDB_MODE="disabled"))
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "runs" / "graph", done


@pytest.mark.slow
def test_metrics_file_of_a_real_run(graph_run):
    folder, done = graph_run
    records = metrics.read(folder / metrics.TRAIN_FILE)
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/acc" in r]
    losses = [r for r in records if "eval/loss" in r]
    # 48 samples at batch 16: 3 batches an epoch, 3 epochs, one stage each
    assert [(r["epoch"], r["stage"], r["batch"], r["step"]) for r in train] == [
        (e, e - 1, b, (e - 1) * 3 + b) for e in (1, 2, 3) for b in range(3)
    ]
    assert all(r["train/step"] == r["step"] and r["train/epoch"] == r["epoch"] for r in train)
    assert [(r["epoch"], r["stage"], r["step"]) for r in evals] == [(1, 0, 3), (2, 1, 6), (3, 2, 9)]
    assert [r["epoch"] for r in losses] == [1, 2, 3]
    assert all(0 <= r["eval/acc"] <= 1 and 0 <= r["eval/cot_em"] <= 1 for r in evals)
    times = [r["wall_time"] for r in records]
    assert times == sorted(times) and times[0] >= 0
    # run.py ends with the per-stage summary read from the same file
    assert "Accuracy by stage" in done.stdout
    for stage, epoch, acc in metrics.accuracy_by_stage(records):
        assert f"stage {stage} (epoch {epoch}): {acc:.4f}" in done.stdout


@pytest.mark.slow
def test_plot_command_writes_pngs(graph_run, tmp_path):
    folder, _ = graph_run
    result = cli("metrics.py", folder, "--out", tmp_path / "plots")
    assert result.returncode == 0, result.stderr
    written = result.stdout.split()
    assert [os.path.basename(p) for p in written] == ["curves.png", "stage_accuracy.png"]
    for path in written:
        data = open(path, "rb").read()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


@pytest.mark.slow
def test_plot_inputs(graph_run):
    folder, _ = graph_run
    epochs = metrics.per_epoch(metrics.read(folder / metrics.TRAIN_FILE))
    assert list(epochs) == [1, 2, 3]
    assert metrics.stage_starts(epochs) == [(1, 0), (2, 1), (3, 2)]
    assert all({"train/loss", "eval/loss", "eval/acc", "eval/cot_em"} <= set(row) for row in epochs.values())


@pytest.mark.parametrize("content, needle", [(None, "no metrics file"), ("", "holds no metrics"), ('{"x": 1}\n', "holds no metrics")])
def test_plot_command_bad_folder(tmp_path, content, needle):
    if content is not None:
        (tmp_path / metrics.TRAIN_FILE).write_text(content)
    result = cli("metrics.py", tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error: ")
    assert not list(tmp_path.glob("*.png"))


def test_restart_keeps_one_history(tmp_path):
    log = metrics.MetricsLog(tmp_path)
    for epoch in (1, 2):
        for batch in range(3):
            log.log({"train/loss": 1.0}, 0, epoch, (epoch - 1) * 3 + batch, batch=batch)
        log.log({"eval/acc": 0.5}, 0, epoch, epoch * 3)
    log.close()
    with open(tmp_path / metrics.TRAIN_FILE, "a") as f:
        f.write('{"train/loss": 1.0, "sta')  # killed mid-write
    # a restart from epoch 2 (0-based 1), batch 1: epoch 1 and batch 0 stay
    restarted = metrics.MetricsLog(tmp_path, start=(1, 1))
    restarted.log({"train/loss": 2.0}, 0, 2, 4, batch=1)
    restarted.close()
    records = metrics.read(tmp_path / metrics.TRAIN_FILE)
    assert [(r["epoch"], r.get("batch"), r.get("train/loss", r.get("eval/acc"))) for r in records] == [
        (1, 0, 1.0), (1, 1, 1.0), (1, 2, 1.0), (1, None, 0.5), (2, 0, 1.0), (2, 1, 2.0),
    ]
    assert records[-1]["wall_time"] >= records[-2]["wall_time"]


def test_evaluation_only_runs_keep_the_training_history(tmp_path):
    (tmp_path / metrics.TRAIN_FILE).write_text(json.dumps({"train/loss": 1.0, "stage": 0, "epoch": 1, "step": 0, "batch": 0, "wall_time": 1}) + "\n")
    log = metrics.MetricsLog(tmp_path, only_eval=True)
    log.log({"eval/acc": 0.5}, 3, 1, 0)
    log.close()
    assert len(metrics.read(tmp_path / metrics.TRAIN_FILE)) == 1
    assert metrics.read(tmp_path / metrics.EVAL_ONLY_FILE)[0]["eval/acc"] == 0.5


@pytest.mark.parametrize("main", [True, False])
def test_progress_bars_on_the_main_process_only(main, workspace, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    import dataset

    root, model_dir = workspace
    monkeypatch.setattr(dataset, "is_main_process", lambda: main)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens([f"<|fresh-{main}|>"])  # a tokenizer of its own: nothing to read from the cache
    dataset.get_dataset(str(root / "train.json"), tokenizer)
    assert ("Tokenizing train.json" in capsys.readouterr().err) == main

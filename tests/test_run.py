"""run.py end to end on a tiny GPT-2: a Coconut run over several stages (one
process and two under torchrun with gloo), resume from the newest checkpoint,
evaluation-only runs, the checkpoint-loading cases, and bad input on the
command line.

python -m pytest -q tests/test_run.py
"""

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import checkpoints, config_for, run_cli, write_config

import build
import evaluation
import metrics
import run as cli
import train
from coconut import Coconut
from distributed import Process
from utils import UserError, load_config


@pytest.mark.slow
def test_coconut_run_resume_and_eval(workspace, tmp_path):
    root, model_dir = workspace
    config = write_config(root, model_dir, "single")
    done = run_cli([config], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoints(root, "single") == ["checkpoint_1", "checkpoint_2", "checkpoint_3"]
    assert "wandb: no login found, logging offline" in done.stdout
    assert done.stdout.count("Accuracy on validation set: ") == 3 and "/ 5 = " in done.stdout
    state = torch.load(root / "runs" / "single" / "checkpoint_3", weights_only=True)
    assert all(k.startswith(("base_causallm.", "embedding.")) for k in state)

    # a restart with the same folder picks up the newest checkpoint
    resumed = run_cli([config, "num_epochs=4"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint_3 (epoch 3;" in resumed.stdout
    assert "Training Epoch: 4" in resumed.stderr and "Training Epoch: 3" not in resumed.stderr
    assert checkpoints(root, "single")[-1] == "checkpoint_4"

    evaluated = run_cli(
        [config, "only_eval=true", "name=single-eval", f"load_model_path={root / 'runs' / 'single' / 'checkpoint_4'}", "resume=3", "num_epochs=4"],
        tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert evaluated.stdout.count("Accuracy on validation set: ") == 1
    assert "Training Epoch" not in evaluated.stderr and checkpoints(root, "single-eval") == []


@pytest.mark.slow
def test_warm_start_from_another_run_takes_its_weights_only(workspace, tmp_path):
    """A CoT checkpoint starting a Coconut run in another folder (the
    quickstart's chain): the weights load, the `.state` beside them (best
    accuracy, wandb run, RNG) stays with the run that wrote it."""
    root, model_dir = workspace
    done = run_cli([write_config(root, model_dir, "warm-cot", coconut=False, cot=True, num_epochs=1)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    source = root / "runs" / "warm-cot" / "checkpoint_1"
    state = torch.load(f"{source}.state", weights_only=False)
    state["best_acc"] = 2.0  # above any accuracy, so a carried-over value shows
    torch.save(state, f"{source}.state")

    config = write_config(root, model_dir, "warm-coconut", load_model_path=str(source), resume=1, num_epochs=2)
    done = run_cli([config], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Training Epoch: 2" in done.stderr and "resuming" not in done.stdout
    assert checkpoints(root, "warm-coconut") == ["checkpoint_2"]
    started = torch.load(root / "runs" / "warm-coconut" / "checkpoint_2.state", weights_only=False)
    assert started["best_acc"] <= 1.0
    assert started["wandb_id"] and started["wandb_id"] != state["wandb_id"]


@pytest.mark.slow
def test_train_samples_trains_on_the_start_of_the_file(workspace, tmp_path):
    root, model_dir = workspace
    config = write_config(root, model_dir, "subset", coconut=False, cot=True, num_epochs=1, batch_size_training=1, train_samples=2)
    done = run_cli([config], tmp_path, WANDB_MODE="disabled")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch 1/2 " in done.stderr and "/3 " not in done.stderr
    assert len(json.loads((root / "train.json").read_text())) > 2


@pytest.mark.slow
def test_two_processes_with_torchrun(workspace, tmp_path):
    root, model_dir = workspace
    config = write_config(root, model_dir, "pair", num_epochs=2, batch_size_eval=2)
    done = run_cli([config], tmp_path, torchrun=True, WANDB_MODE="disabled")
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    assert checkpoints(root, "pair") == ["checkpoint_1", "checkpoint_2"]
    # 5 validation samples over 2 ranks: 3 + 2, every sample counted once
    assert "Device 0: Cor=0, CoT=0, Total=3" in done.stdout.replace("Cor=1", "Cor=0")
    assert "Total=2" in done.stdout and "Accuracy on validation set: " in done.stdout and " / 5 = " in done.stdout
    # the sharded run saves whole tensors in the reference key format
    state = torch.load(root / "runs" / "pair" / "checkpoint_2", weights_only=True)
    expected, _, _ = build.build_model(load_config(config))
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected.state_dict().items()}

    evaluated = run_cli([config, "only_eval=true", "name=pair-eval", f"load_model_path={root / 'runs' / 'pair' / 'checkpoint_2'}"],
                        tmp_path, torchrun=True, WANDB_MODE="disabled")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "/ 5 = " in evaluated.stdout


@pytest.mark.slow
def test_two_processes_plain_cot_model(workspace, tmp_path):
    """A sharded plain LM (the root shard unit is the HF model itself) trains
    and generates in batches on two ranks."""
    root, model_dir = workspace
    config = write_config(root, model_dir, "pair-cot", coconut=False, cot=True, num_epochs=1, batch_size_eval=3)
    done = run_cli([config], tmp_path, torchrun=True, WANDB_MODE="disabled")
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    assert checkpoints(root, "pair-cot") == ["checkpoint_1"]
    assert "Total=3" in done.stdout and "Total=2" in done.stdout and " / 5 = " in done.stdout
    state = torch.load(root / "runs" / "pair-cot" / "checkpoint_1", weights_only=True)
    assert not any(k.startswith("base_causallm.") for k in state)


# ------------------------------------------------------------ bad input, CLI
BAD_INPUTS = [
    ({"num_epoch": 2}, "unknown key 'num_epoch' (did you mean 'num_epochs'?)"),
    ({"num_epochs": "two"}, "key 'num_epochs' must be int"),
    ({"model_id": "/nonexistent/model"}, "model_id '/nonexistent/model': cannot load"),
    ({"load_model_path": "/nonexistent/ckpt"}, "load_model_path '/nonexistent/ckpt': no such checkpoint file"),
    ({"train_path": "/nonexistent/train.json"}, "/nonexistent/train.json: data file not found"),
    ({"val_path": "BAD_SAMPLE"}, "sample 1: missing key 'steps'"),
    ({"val_path": "EMPTY"}, "holds no samples"),
    ({"cot": True}, "keys coconut and cot are both set"),
    ({"resume": 3}, "key 'resume' (3) must be below num_epochs (3)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("change, message", BAD_INPUTS)
def test_bad_input_one_line_no_traceback_nothing_written(change, message, workspace, tmp_path):
    root, model_dir = workspace
    change = dict(change)
    if change.get("val_path") == "BAD_SAMPLE":
        (tmp_path / "bad.json").write_text(json.dumps([{"question": "q", "answer": "a", "steps": []}, {"question": "q", "answer": "a"}]))
        change["val_path"] = str(tmp_path / "bad.json")
    if change.get("val_path") == "EMPTY":
        (tmp_path / "empty.json").write_text("[]")
        change["val_path"] = str(tmp_path / "empty.json")
    paths = dict(train_path=str(root / "train.json"), val_path=str(root / "valid.json"))
    config = write_config(tmp_path, model_dir, "bad", **{**paths, **change})
    done = run_cli([config], tmp_path, WANDB_MODE="disabled")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "wandb").exists()


def test_missing_config_file(tmp_path):
    done = run_cli([str(tmp_path / "none.yaml")], tmp_path)
    assert done.returncode == 2 and "config file not found" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------ in-process runs
def test_checkpoint_loading_cases(workspace, tmp_path):
    root, model_dir = workspace
    # a CoT-style (plain) checkpoint: keys without base_causallm.
    plain_config = config_for(workspace, tmp_path, "plain", coconut=False, cot=True)
    plain, _, _ = build.build_model(plain_config)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.5)
    plain_path = tmp_path / "plain.pt"
    torch.save(plain.state_dict(), plain_path)

    # 1. Coconut run from a plain checkpoint: loaded into the plain model, before the resize
    coconut, tokenizer, ids = build.build_model(config_for(workspace, tmp_path, "c1", load_model_path=str(plain_path)))
    wte = coconut.base_causallm.get_input_embeddings().weight
    n_old = plain.get_input_embeddings().weight.shape[0]
    torch.testing.assert_close(wte[:n_old], plain.get_input_embeddings().weight)
    lt = tokenizer.convert_tokens_to_ids("<<")
    for token_id in ids.values():  # new rows copied from `<<`, in the input and output tables
        torch.testing.assert_close(wte[token_id], wte[lt])
        torch.testing.assert_close(coconut.base_causallm.get_output_embeddings().weight[token_id], wte[lt])

    # 3. Coconut run from a Coconut checkpoint: loaded into the wrapper
    coconut_path = tmp_path / "coconut.pt"
    torch.save(coconut.state_dict(), coconut_path)
    again, _, _ = build.build_model(config_for(workspace, tmp_path, "c3", load_model_path=str(coconut_path)))
    for (name, a), b in zip(again.state_dict().items(), coconut.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)

    # 2. non-Coconut run from a Coconut checkpoint: refused
    with pytest.raises(UserError, match="holds Coconut weights"):
        build.build_model(config_for(workspace, tmp_path, "c2", coconut=False, cot=True, load_model_path=str(coconut_path)))

    # 4. non-Coconut run from a plain checkpoint, and no_thoughts turning Coconut off
    loaded, tok4, _ = build.build_model(config_for(workspace, tmp_path, "c4", coconut=False, cot=True, load_model_path=str(plain_path)))
    torch.testing.assert_close(loaded.get_input_embeddings().weight, plain.get_input_embeddings().weight)
    nt_config = config_for(workspace, tmp_path, "nt", coconut=False, no_thoughts=True, c_thought=2)
    model, _, _ = build.build_model(nt_config)
    assert nt_config.c_thought == 0 and not nt_config.coconut and not isinstance(model, Coconut)


class Recorder:
    id = "recorded-run"

    def __init__(self):
        self.logged = []

    def log(self, values):
        self.logged.append(values)

    def finish(self):
        pass


def test_logging_save_only_improve_and_optimizer_resets(workspace, tmp_path, monkeypatch):
    root, model_dir = workspace
    recorder = Recorder()
    monkeypatch.setattr(metrics, "init_wandb", lambda configs, run_id=None: recorder)
    accuracies = iter([0.2, 0.1, 0.4])
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: (next(accuracies), 0.0))
    built = []
    real_build = build.build_optimizer
    monkeypatch.setattr(build, "build_optimizer", lambda *a: built.append(1) or real_build(*a))

    configs = config_for(workspace, tmp_path, "improve", save_only_improve=True)
    cli.run(configs, 0, 1, torch.device("cpu"))
    assert checkpoints(tmp_path, "improve") == ["checkpoint_1", "checkpoint_3"]
    assert len(built) == 3  # reset_optimizer: a fresh AdamW every epoch
    keys = set().union(*recorder.logged)
    assert {"train/epoch", "train/step", "train/loss", "eval/loss", "eval/acc", "eval/cot_em", "data_table"} <= keys
    steps = [d["train/step"] for d in recorder.logged if "train/step" in d]
    assert steps == list(range(len(steps)))

    # a restart continues the same wandb run
    asked = []
    monkeypatch.setattr(metrics, "init_wandb", lambda configs, run_id=None: asked.append(run_id) or recorder)
    accuracies = iter([0.5])
    cli.run(config_for(workspace, tmp_path, "improve", save_only_improve=True, num_epochs=4), 0, 1, torch.device("cpu"))
    assert asked == ["recorded-run"] and checkpoints(tmp_path, "improve")[-1] == "checkpoint_4"

    built.clear()
    accuracies = iter([0.0, 0.0])
    configs = config_for(workspace, tmp_path, "keep", reset_optimizer=False, debug=True, num_epochs=2)
    cli.run(configs, 0, 1, torch.device("cpu"))
    assert len(built) == 1 and checkpoints(tmp_path, "keep") == []  # debug: no checkpoints (the metrics file is kept)


@pytest.mark.parametrize("sync_every", [1, 3])
def test_gradient_accumulation_steps_and_scaling(sync_every):
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, **_):
            return SimpleNamespace(loss=(self.w * input_ids.float()).sum())

    class CountingOptimizer:
        def __init__(self, param):
            self.param, self.grads = param, []

        def step(self):
            self.grads.append(self.param.grad.clone())

        def zero_grad(self):
            self.param.grad = None

    toy = Toy()
    optimizer = CountingOptimizer(toy.w)
    batches = [{"input_ids": torch.tensor([[float(i)]]), "labels": torch.tensor([[0]]), "idx": torch.tensor([i])} for i in range(1, 6)]
    configs = SimpleNamespace(gradient_accumulation_steps=2, num_epochs=1, save_every_steps=0, mixed_precision=False, sync_every=sync_every)
    train.train_epoch(toy, optimizer, batches, configs, stage=0, device=torch.device("cpu"), logger=metrics.Logger())
    # steps after batches 2, 4 and the last (5); each gradient is the sum over its batches / 2
    assert [float(g) for g in optimizer.grads] == [1.5, 3.5, 2.5]


def test_bf16_casts_the_model(workspace, tmp_path):
    root, model_dir = workspace
    model, _, _ = build.build_model(config_for(workspace, tmp_path, "bf", bf16=True))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("method", [dict(pad_latent_to_max=False), dict(coconut=False, cot=True)])
def test_batched_evaluation_equals_batch_size_one(method, workspace, tmp_path):
    """Same decoded output for every sample, hence the same accuracy and CoT
    match, at batch size 1 and 4 (rows of different lengths and latent counts)."""
    from dataset import MyCollator, get_dataset, get_question_latent_dataset, load_samples

    configs = config_for(workspace, tmp_path, "batched", max_latent_stage=3, **method)
    model, tokenizer, ids = build.build_model(configs)
    with torch.no_grad():  # untrained, the three new rows tie exactly with `<<`; break the ties
        torch.manual_seed(0)
        plain = build.plain_model(model)
        for table in {plain.get_output_embeddings().weight, plain.get_input_embeddings().weight} if not configs.cot else ():
            table[list(ids.values())] += 0.05 * torch.randn(3, table.shape[1])
    raw = load_samples(configs.val_path)
    base = get_dataset(configs.val_path, tokenizer)
    stage = 0 if configs.cot else 2
    prompts = get_question_latent_dataset(stage, base, configs, ids["<|start-latent|>"], ids["<|latent|>"], ids["<|end-latent|>"],
                                          no_special_marker=bool(configs.cot))
    collator = MyCollator(tokenizer, latent_id=ids["<|latent|>"])
    results = {}
    for batch_size in (1, 4):
        configs.batch_size_eval = batch_size
        records = []
        scores = evaluation.evaluate(model, prompts, raw, configs, tokenizer=tokenizer, collator=collator, process=Process(0, 1, torch.device("cpu")),
                                     max_new_tokens=24, records=records)
        results[batch_size] = (scores, records)
    assert results[1] == results[4]
    assert [i for i, _, _ in results[1][1]] == list(range(len(raw)))
    if not configs.cot:
        assert len({p["input_ids"].count(ids["<|latent|>"]) for p in prompts}) > 1

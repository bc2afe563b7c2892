"""The ablations of docs/behaviour.md section 9: `pause_as_thought` (latent positions
keep their own embedding, one plain pass), `no_curriculum` (the final stage
from the first epoch, in training and evaluation), their combination (the
pause-token baseline), the contradictions check_config refuses, and the
args/ files of every method row and dataset.

python -m pytest -q tests/test_ablations.py
"""

import json
import os

import pytest
import torch
import yaml
from helpers import checkpoints, config_for, mixed_batch, run_cli, setup_model, stage_config, write_config

import build
import evaluation
import run as cli
from coconut import Coconut
from dataset import stage_for_epoch
from utils import Config, UserError, load_config

ARGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "args")


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------ pause as thought
def test_pause_as_thought_is_one_plain_pass(model_dirs, tmp_path):
    tokenizer, model, ids = setup_model(model_dirs["gpt2"])
    start, latent, end = ids
    batch = mixed_batch(tokenizer, ids, tmp_path)
    feed = {k: v for k, v in batch.items() if k != "idx"}
    coconut = Coconut(model, latent, start, end, tokenizer.eos_token_id, pause_as_thought=True)
    out = coconut(**feed)
    assert coconut.gen_forward_cnt == 1  # 12 latents in the batch, still one pass
    is_latent = batch["input_ids"] == latent
    assert int(is_latent.sum()) == 12
    latent_embedding = model.get_input_embeddings().weight[latent]
    assert torch.equal(out.inputs_embeds[is_latent], latent_embedding.expand(12, -1))
    plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                  labels=None)
    torch.testing.assert_close(out.logits, plain.logits)
    out.loss.backward()
    assert model.get_input_embeddings().weight.grad[latent].abs().sum() > 0  # the pause embedding itself learns


def test_pause_as_thought_generation_is_plain_greedy(model_dirs, data_dir):
    from dataset import MyCollator, get_dataset, get_question_latent_dataset

    tokenizer, model, ids = setup_model(model_dirs["gpt2"])
    start, latent, end = ids
    base = get_dataset(str(data_dir / "toy_valid.json"), tokenizer)
    prompt = next(p for p in get_question_latent_dataset(3, base, stage_config(c_thought=1), start, latent, end)
                  if p["input_ids"].count(latent) == 3)
    batch = MyCollator(tokenizer, latent_id=latent)([prompt])
    coconut = Coconut(model, latent, start, end, eos_token_id=-1, pause_as_thought=True)  # no eos: all 5 tokens
    out = coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=5)
    assert coconut.gen_forward_cnt == 1 + 4  # the prompt in one pass, then one call per further token
    tokens = batch["input_ids"]
    with torch.no_grad():
        for _ in range(5):  # no cache, no latent filling: the plain model on the ids
            tokens = torch.cat([tokens, model(input_ids=tokens).logits[:, -1:].argmax(-1)], dim=1)
    assert out.tolist() == tokens.tolist()


# --------------------------------------------------------------- no curriculum
def test_stage_for_epoch():
    base = Config(cot=False, no_cot=False, no_curriculum=False, max_latent_stage=3, epochs_per_stage=2)
    assert [stage_for_epoch(base, e) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [stage_for_epoch(Config(base, no_curriculum=True), e) for e in range(8)] == [4] * 8
    assert [stage_for_epoch(Config(base, cot=True), e) for e in range(3)] == [0] * 3


class StageSpy:
    """Records the stage and the datasets the run builds, and skips the
    generation (only the prompts it would get are kept)."""

    def __init__(self, monkeypatch):
        self.train, self.prompts = [], []
        real = cli.get_cot_latent_dataset

        def cot_latent(stage, *args, **kwargs):
            dataset = real(stage, *args, **kwargs)
            if kwargs.get("shuffle"):
                self.train.append((stage, dataset))
            return dataset

        monkeypatch.setattr(cli, "get_cot_latent_dataset", cot_latent)
        monkeypatch.setattr(evaluation, "evaluate", lambda model, gen_set, *a, **k: self.prompts.append(gen_set) or (0.0, 0.0))


@pytest.mark.parametrize("no_curriculum", [False, True])
def test_no_curriculum_trains_and_evaluates_the_final_stage(no_curriculum, workspace, tmp_path, monkeypatch):
    spy = StageSpy(monkeypatch)
    configs = config_for(workspace, tmp_path, "nocur", debug=True, num_epochs=3, max_latent_stage=2, c_thought=2,
                         no_curriculum=no_curriculum)
    cli.run(configs, 0, 1, torch.device("cpu"))
    _, tokenizer, ids = build.build_model(configs)
    latent = ids["<|latent|>"]
    stages = [stage for stage, _ in spy.train]
    assert stages == ([3, 3, 3] if no_curriculum else [0, 1, 2])
    if not no_curriculum:
        return
    for _, dataset in spy.train:  # every epoch: all steps removed, max_latent_stage * c_thought latents
        for position, n_skip, n_latent in dataset.plans:
            assert n_skip == len(dataset.base[position]["steps_tokenized"]) and n_latent == 4
        sample = dataset.base[dataset.plans[0][0]]
        expected = (sample["question_tokenized"] + [ids["<|start-latent|>"]] + [latent] * 4 + [ids["<|end-latent|>"]]
                    + sample["answer_tokenized"])
        assert dataset[0]["input_ids"] == expected
    assert len(spy.prompts) == 3
    for prompts in spy.prompts:  # evaluated at the same stage: 2 slots of 2 thoughts each
        assert {p["input_ids"].count(latent) for p in prompts} == {4}


# ------------------------------------------------------------ config checks
CONTRADICTIONS = [
    (dict(coconut=False, cot=True, pause_as_thought=True), "key 'pause_as_thought' needs coconut: True"),
    (dict(coconut=False, no_cot=True, no_curriculum=True), "key 'no_curriculum' needs coconut: True"),
    (dict(coconut=False, no_thoughts=True, no_curriculum=True), "key 'no_curriculum' needs coconut: True"),
    (dict(coconut=False, cot=True, latent_layer=2), "key 'latent_layer' needs coconut: True"),
    (dict(coconut=False, latent_projection=True), "key 'latent_projection' needs coconut: True"),
    (dict(pause_as_thought=True, latent_norm="rms"), "keys pause_as_thought and latent_norm are both set"),
    (dict(pause_as_thought=True, latent_projection=True), "keys pause_as_thought and latent_projection are both set"),
    (dict(no_curriculum=True, uniform_prob=0.5), "keys no_curriculum and uniform_prob are both set"),
    (dict(no_curriculum=True, max_latent_stage=0), "key 'max_latent_stage' is 0 with no_curriculum set"),
    (dict(latent_norm="batchnorm"), "key 'latent_norm' must be one of none, rms, layernorm, got 'batchnorm'"),
    (dict(latent_layer="last"), "key 'latent_layer' must be int"),
]


@pytest.mark.parametrize("change, message", CONTRADICTIONS)
def test_contradictions_are_refused(change, message, workspace, tmp_path):
    with pytest.raises(UserError) as err:
        config_for(workspace, tmp_path, "bad", **change)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_refusal_on_the_command_line(workspace, tmp_path, monkeypatch, capsys):
    root, model_dir = workspace
    config = write_config(tmp_path, model_dir, "bad", save_path=str(tmp_path / "runs"), train_path=str(root / "train.json"),
                          val_path=str(root / "valid.json"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert cli.main([config, "coconut=false", "cot=true", "no_curriculum=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    assert err[-1].endswith("key 'no_curriculum' needs coconut: True (it changes how continuous thoughts are trained)")
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------- args/
ROWS = {  # method row of docs/behaviour.md section 9 -> the keys its file sets, besides the copied values
    "nocot": dict(no_cot=True),
    "cot": dict(cot=True),
    "pause_token": dict(coconut=True, pause_as_thought=True, no_curriculum=True),
    "coconut": dict(coconut=True),
    "no_curriculum": dict(coconut=True, no_curriculum=True),
    "no_thoughts": dict(no_thoughts=True),
    "pause_as_thought": dict(coconut=True, pause_as_thought=True),
}
FLAGS = ("coconut", "cot", "no_cot", "no_thoughts", "pause_as_thought", "no_curriculum")


def raw_config(name):
    with open(os.path.join(ARGS, name)) as f:
        return f.readline(), yaml.safe_load(f)


@pytest.mark.parametrize("name", sorted(os.listdir(ARGS)))
def test_every_args_file_loads(name):
    first_line, _ = raw_config(name)
    assert first_line.startswith("# ") and len(first_line) > 20, name  # says what it is
    load_config(os.path.join(ARGS, name))  # every key known and well typed, no contradiction


@pytest.mark.parametrize("dataset", ["gsm", "prontoqa", "prosqa"])
def test_every_method_row_has_a_config(dataset):
    coconut = load_config(os.path.join(ARGS, f"{dataset}_coconut.yaml"))
    for row, flags in ROWS.items():
        configs = load_config(os.path.join(ARGS, f"{dataset}_{row}.yaml"))
        assert {k: configs[k] for k in FLAGS} == {k: flags.get(k, False) for k in FLAGS}, row
        if row in ("no_curriculum", "no_thoughts", "pause_as_thought"):
            # a Coconut ablation: the Coconut file's values, one switch changed (on GSM8K, from the CoT checkpoint)
            same = {k: v for k, v in configs.items() if k not in FLAGS + ("name",)}
            assert same == {k: v for k, v in coconut.items() if k not in FLAGS + ("name",)}, row
        if row in ("nocot", "pause_token"):  # baselines from the pretrained model, with the CoT run's schedule
            cot = load_config(os.path.join(ARGS, f"{dataset}_cot.yaml"))
            assert configs.load_model_path == "None" and configs.num_epochs == cot.num_epochs and configs.lr == cot.lr
    pause = load_config(os.path.join(ARGS, f"{dataset}_pause_token.yaml"))
    assert pause.max_latent_stage * pause.c_thought == coconut.max_latent_stage * coconut.c_thought  # as many pauses as thoughts
    assert pause.pad_latent_to_max


# ------------------------------------------------------------- end to end
@pytest.mark.slow
def test_pause_token_run_saves_and_resumes(workspace, tmp_path, monkeypatch, capsys):
    """The pause-token baseline through run.py: every epoch at the final stage,
    checkpoints in the reference key format, and a resume."""
    root, model_dir = workspace
    config = write_config(tmp_path, model_dir, "pause", save_path=str(tmp_path / "runs"), train_path=str(root / "train.json"),
                          val_path=str(root / "valid.json"), num_epochs=1, max_latent_stage=2, batch_size_eval=5,
                          pause_as_thought=True, no_curriculum=True)
    done = run_cli([config], tmp_path, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Accuracy on validation set: " in done.stdout and "/ 5 = " in done.stdout
    assert checkpoints(tmp_path, "pause") == ["checkpoint_1"]
    state = torch.load(tmp_path / "runs" / "pause" / "checkpoint_1", weights_only=True)
    assert all(k.startswith(("base_causallm.", "embedding.")) for k in state)

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert cli.main([config, "num_epochs=2"]) == 0
    assert "resuming from checkpoint_1" in capsys.readouterr().out
    assert checkpoints(tmp_path, "pause") == ["checkpoint_1", "checkpoint_2"]
    with open(tmp_path / "runs" / "pause" / "metrics.jsonl") as f:
        stages = {json.loads(line)["stage"] for line in f}
    assert stages == {3}  # max_latent_stage + 1 in both epochs

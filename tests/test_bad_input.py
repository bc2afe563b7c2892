"""Bad input, as a table: each malformed config, command line, data file,
model path or checkpoint gives one line `error: ...` naming the culprit,
exit status 2, no traceback, and leaves the run folder as it was (absent,
or with its files untouched).

python -m pytest -q tests/test_bad_input.py
"""

import json

import pytest
import torch
import yaml

import run as cli

GOOD = [{"question": "Tom has 3 apples?", "answer": "7", "steps": ["<<3+4=7>>"]}]


def snapshot(folder):
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def data_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def coconut_checkpoint():
    """A state dict with wrapper keys, as a Coconut run saves it."""
    return {"base_causallm.transformer.wte.weight": torch.zeros(4, 4)}


def eager_attention_copy(tmp_path, model_dir):
    """The test model, configured for eager attention (the fast path needs SDPA)."""
    import shutil

    folder = tmp_path / "eager-model"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, attn_implementation="eager")))
    return str(folder)


def resumable_folder(tmp_path, weights=b"not a checkpoint", state=None):
    folder = tmp_path / "runs" / "bad"
    folder.mkdir(parents=True)
    (folder / "checkpoint_1").write_bytes(weights)
    if state is not None:
        (folder / "checkpoint_1.state").write_bytes(state)
    return folder


def real_checkpoint_bytes(model_dir, tmp_path):
    from helpers import load_tokenizer_and_model

    path = tmp_path / "plain.pt"
    torch.save(load_tokenizer_and_model(model_dir)[1].state_dict(), path)
    return path.read_bytes()


# (case id, config changes or a callable(tmp_path, model_dir) -> changes, extra argv, expected text in the one line)
CASES = [
    ("unknown-key", {"num_epoch": 2}, [], "unknown key 'num_epoch' (did you mean 'num_epochs'?)"),
    ("int-type", {"num_epochs": "two"}, [], "key 'num_epochs' must be int, got str 'two'"),
    ("bool-type", {"coconut": "yes"}, [], "key 'coconut' must be bool"),
    ("float-type", {"lr": "fast"}, [], "key 'lr' must be float"),
    ("missing-key", {"_drop": "model_id"}, [], "missing required key 'model_id'"),
    ("two-methods", {"cot": True}, [], "keys coconut and cot are both set"),
    ("coconut-no-thoughts", {"c_thought": 0}, [], "key 'c_thought' is 0 with coconut set"),
    ("eval-no-checkpoint", {"only_eval": True}, [], "key 'load_model_path' must name a checkpoint when only_eval is set"),
    ("resume-past-end", {"resume": 5, "num_epochs": 5}, [], "key 'resume' (5) must be below num_epochs (5)"),
    ("uniform-prob", {"uniform_prob": 1.5}, [], "key 'uniform_prob' must be between 0 and 1"),
    ("cot-uniform-prob", {"coconut": False, "cot": True, "uniform_prob": 0.3}, [], "keys cot and uniform_prob are both set"),
    ("zero-batch", {"batch_size_training": 0}, [], "key 'batch_size_training' must be >= 1"),
    ("negative-lr", {"lr": -0.1}, [], "key 'lr' must be > 0"),
    ("two-precisions", {"bf16": True, "mixed_precision": True}, [], "keys bf16 and mixed_precision are both set"),
    ("fast-path-value", {"fast_path": "fastest"}, [], "key 'fast_path' must be one of auto, compiled, static, eager, got 'fastest'"),
    ("fast-path-yaml-boolean", {}, ["fast_path=off"], "key 'fast_path' must be str, got bool False (quote it: YAML reads on, off"),
    ("sync-every-zero", {"sync_every": 0}, [], "key 'sync_every' must be >= 1"),
    ("fast-path-eager-attention", lambda t, m: {"fast_path": "static", "model_id": eager_attention_copy(t, m)}, [],
     "key 'fast_path' is 'static', but model_id"),
    ("no-config-file", "MISSING", [], "config file not found"),
    ("config-not-yaml", "num_epochs: [1,\n", [], "not valid YAML"),
    ("config-a-list", "- 1\n- 2\n", [], "expected a mapping of config keys"),
    ("override-no-equals", {}, ["num_epochs"], "command line: expected key=value, got 'num_epochs'"),
    ("override-unknown", {}, ["epochs=3"], "command line: unknown key 'epochs'"),
    ("override-type", {}, ["num_epochs=abc"], "command line: key 'num_epochs' must be int"),
    ("unknown-flag", {}, ["--fast"], "command line: unrecognized arguments: --fast"),
    ("train-missing", lambda t, m: {"train_path": str(t / "none.json")}, [], "none.json: data file not found"),
    ("val-not-json", lambda t, m: {"val_path": data_file(t, "v.json", "{oops")}, [], "v.json: not valid JSON"),
    ("val-an-object", lambda t, m: {"val_path": data_file(t, "v.json", {"question": "q"})}, [], "v.json: expected a JSON list of samples, got dict"),
    ("val-empty", lambda t, m: {"val_path": data_file(t, "v.json", [])}, [], "v.json: holds no samples"),
    ("sample-no-steps", lambda t, m: {"val_path": data_file(t, "v.json", GOOD + [{"question": "q", "answer": "a"}])}, [],
     "v.json: sample 1: missing key 'steps'"),
    ("question-type", lambda t, m: {"train_path": data_file(t, "t.json", GOOD + GOOD + [{"question": 1, "answer": "a", "steps": []}])}, [],
     "t.json: sample 2: 'question' must be a string, got int"),
    ("steps-type", lambda t, m: {"val_path": data_file(t, "v.json", [{"question": "q", "answer": "a", "steps": [1]}])}, [],
     "v.json: sample 0: 'steps' must be a list of strings"),
    ("model-missing", {"model_id": "/nonexistent/model"}, [], "model_id '/nonexistent/model': cannot load model or tokenizer"),
    ("model-empty-folder", lambda t, m: {"model_id": str((t / "empty").mkdir() or t / "empty")}, [], "/empty': cannot load model or tokenizer"),
    ("checkpoint-missing", {"load_model_path": "/nonexistent/ckpt"}, [], "load_model_path '/nonexistent/ckpt': no such checkpoint file"),
    ("checkpoint-garbage", lambda t, m: {"load_model_path": data_file(t, "junk.pt", "junk")}, [], "junk.pt': not a readable checkpoint"),
    ("checkpoint-wrong-shapes",
     lambda t, m: {"load_model_path": str(t / "c.pt"), "_save": (t / "c.pt", {"transformer.wte.weight": torch.zeros(3, 3)})},
     [], "c.pt': weights do not fit the model"),
    ("coconut-into-plain",
     lambda t, m: {"coconut": False, "cot": True, "load_model_path": str(t / "c.pt"), "_save": (t / "c.pt", coconut_checkpoint())},
     [], "c.pt': holds Coconut weights (base_causallm.*) but coconut is off"),
    ("corrupt-checkpoint-in-run-folder", lambda t, m: {"_folder": lambda: resumable_folder(t)}, [], "checkpoint_1': not a readable checkpoint"),
    ("corrupt-state-in-run-folder", lambda t, m: {"_folder": lambda: resumable_folder(t, real_checkpoint_bytes(m, t), b"junk")}, [],
     "checkpoint_1.state: not a readable training state"),
]


def test_the_table_is_long_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case, changes, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, changes, argv, expected, workspace, tmp_path, monkeypatch, capsys):
    root, model_dir = workspace
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")  # would write ./wandb if the run got that far
    values = dict(
        save_path=str(tmp_path / "runs"), name="bad", coconut=True, c_thought=1, max_latent_stage=1, model_id=model_dir,
        train_path=str(root / "train.json"), val_path=str(root / "valid.json"), num_epochs=2, batch_size_training=8,
    )
    config = tmp_path / "bad.yaml"
    if isinstance(changes, str):
        if changes != "MISSING":
            config.write_text(changes)
    else:
        changes = changes(tmp_path, model_dir) if callable(changes) else dict(changes)
        if "_drop" in changes:
            del values[changes.pop("_drop")]
        if "_save" in changes:
            torch.save(changes.pop("_save")[1], changes["load_model_path"])
        if "_folder" in changes:
            changes.pop("_folder")()
        values.update(changes)
        config.write_text(yaml.safe_dump(values))
    before = snapshot(tmp_path / "runs")

    code = cli.main([str(config)] + argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert lines[-1].startswith("error: ") and expected in lines[-1], lines[-1]
    assert "Traceback" not in err
    assert snapshot(tmp_path / "runs") == before  # nothing created or changed
    assert not (tmp_path / "wandb").exists()

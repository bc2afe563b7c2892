"""Config loading and checking (utils.load_config), and its resolution into
the frozen RunConfig a run uses, with the saved asked and resolved files.

python -m pytest -q tests/test_config.py
"""

import dataclasses
import os

import pytest
import yaml

from checkpoints import ResumePoint, save_run_config
from utils import CONFIG_KEYS, REQUIRED, Config, RunConfig, UserError, asked_config, load_config, read_config, resolve_config

ARGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "args")
MINIMAL = dict(save_path="runs", name="x", model_id="m", train_path="t.json", val_path="v.json", num_epochs=2)


def write(tmp_path, values, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values) if not isinstance(values, str) else values)
    return str(path)


def test_defaults_and_attribute_access(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert isinstance(config, Config) and config.name == "x" and config["num_epochs"] == 2
    assert config.load_model_path == "None" and config.lr == 1e-4 and config.batch_size_eval == 1
    config.resume = 3
    assert config["resume"] == 3


def test_float_written_without_dot_and_null_path(tmp_path):
    config = load_config(write(tmp_path, "lr: 1e-4\nload_model_path: null\n" + yaml.safe_dump(MINIMAL)))
    assert config.lr == 1e-4 and config.load_model_path == "None"


def test_overrides(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["num_epochs=5", "coconut=true", "lr=0.5"])
    assert (config.num_epochs, config.coconut, config.lr) == (5, True, 0.5)
    with pytest.raises(UserError, match="command line: unknown key 'num_epoch' \\(did you mean 'num_epochs'\\?\\)"):
        load_config(write(tmp_path, MINIMAL), ["num_epoch=5"])
    with pytest.raises(UserError, match="expected key=value"):
        load_config(write(tmp_path, MINIMAL), ["num_epochs"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"batch_size_trainig": 4}, "unknown key 'batch_size_trainig' (did you mean 'batch_size_training'?)"),
        ({"num_epochs": "ten"}, "key 'num_epochs' must be int, got str 'ten'"),
        ({"coconut": "yes"}, "key 'coconut' must be bool"),
        ({"seed": True}, "key 'seed' must be int, got bool"),
        ({"lr": "fast"}, "key 'lr' must be float"),
        ({"name": None}, "key 'name' must be str"),
        ({"cot": True, "coconut": True}, "keys coconut and cot are both set"),
        ({"batch_size_training": 0}, "key 'batch_size_training' must be >= 1"),
        ({"train_samples": -1}, "key 'train_samples' must be >= 0"),
        ({"uniform_prob": 2.0}, "key 'uniform_prob' must be between 0 and 1"),
        ({"train_path": None}, "key 'train_path' must be str"),
        ({"data_format": "alpaca"}, "key 'data_format' must be one of coconut, gsm8k, got 'alpaca'"),
        ({"data_columns": "question"}, "key 'data_columns': expected field=column, got 'question'"),
        ({"data_columns": "question=a,question=b"}, "key 'data_columns': 'question' is given twice"),
        ({"data_columns": "prompt=a"}, "key 'data_columns': 'prompt' is not one of question, answer, steps"),
    ],
)
def test_bad_values(change, message, tmp_path):
    path = write(tmp_path, {**MINIMAL, **change})
    with pytest.raises(UserError) as err:
        load_config(path)
    assert message in str(err.value) and str(err.value).startswith(path)


def test_missing_and_malformed(tmp_path):
    values = dict(MINIMAL)
    del values["model_id"]
    with pytest.raises(UserError, match="missing required key 'model_id'"):
        load_config(write(tmp_path, values))
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n"))
    no_train = {k: v for k, v in MINIMAL.items() if k != "train_path"}
    with pytest.raises(UserError, match="'train_path' is required unless only_eval"):
        load_config(write(tmp_path, no_train))
    assert load_config(write(tmp_path, {**no_train, "only_eval": True, "load_model_path": "ckpt"})).only_eval


@pytest.mark.parametrize("name", sorted(os.listdir(ARGS)))
def test_reference_configs_load_and_set_every_reference_key(name):
    with open(os.path.join(ARGS, name)) as f:
        raw = yaml.safe_load(f)
    reference_keys = list(CONFIG_KEYS)[: list(CONFIG_KEYS).index("batch_size_eval")]  # the extensions follow
    assert set(reference_keys) <= set(raw), name
    load_config(os.path.join(ARGS, name))


# ------------------------------------------------------- the frozen RunConfig
def test_run_config_is_frozen_typed_and_has_none_for_absent_paths(tmp_path):
    user = load_config(write(tmp_path, {**MINIMAL, "only_eval": True, "load_model_path": "ckpt"}, "e.yaml"))
    configs = resolve_config(load_config(write(tmp_path, MINIMAL)))
    assert isinstance(configs, RunConfig) and configs.load_model_path is None and configs.train_path == "t.json"
    assert resolve_config(user).train_path == "t.json" and resolve_config(user).load_model_path == "ckpt"
    with pytest.raises(dataclasses.FrozenInstanceError):
        configs.lr = 0.5
    assert configs.to_dict() == {**{k: v for k, (_, v, _) in CONFIG_KEYS.items() if v is not REQUIRED}, **MINIMAL,
                                 "load_model_path": None}
    assert resolve_config(configs) is configs  # resolved once; a RunConfig passes through


def test_config_keys_are_the_documented_run_config_fields():
    specs = dataclasses.fields(RunConfig)
    assert list(CONFIG_KEYS) == [spec.name for spec in specs]
    assert all(spec.metadata["meaning"].strip() for spec in specs)
    assert CONFIG_KEYS["load_model_path"][:2] == (str, "None") and CONFIG_KEYS["name"][1] is REQUIRED
    assert CONFIG_KEYS["lr"][:2] == (float, 1e-4) and CONFIG_KEYS["coconut"][:2] == (bool, False)


@pytest.mark.parametrize("keys, method, latent_tokens", [
    ({"coconut": True}, "coconut", True), ({"cot": True}, "cot", False), ({"no_cot": True}, "no_cot", False),
    ({"no_thoughts": True}, "no_thoughts", False), ({}, "none", True),
])
def test_method_is_derived_from_the_method_keys(keys, method, latent_tokens, tmp_path):
    configs = resolve_config(load_config(write(tmp_path, {**MINIMAL, **keys})))
    assert (configs.method, configs.latent_tokens) == (method, latent_tokens)


def test_resolution_no_thoughts_and_resume_point(tmp_path):
    user = load_config(write(tmp_path, {**MINIMAL, "no_thoughts": True, "c_thought": 2}))
    configs = resolve_config(user, ResumePoint(epoch=1, batches_done=3, checkpoint="runs/x/partial_2_3"))
    assert (configs.c_thought, configs.coconut, configs.resume, configs.load_model_path) == (0, False, 1, "runs/x/partial_2_3")
    # the user's Config shows what set-up changed, as the reference's config does
    assert (user.c_thought, user.resume, user.load_model_path) == (0, 1, "runs/x/partial_2_3")
    assert asked_config(Config(MINIMAL, no_thoughts=True, c_thought=2)).c_thought == 2  # asked, before set-up


def test_resolution_checks_a_hand_made_config():
    with pytest.raises(UserError, match="config: missing required key 'save_path'"):
        resolve_config(Config(name="x"))
    with pytest.raises(UserError, match="config: unknown key 'epochs'"):
        resolve_config(Config(MINIMAL, epochs=3))
    with pytest.raises(UserError, match="config: keys coconut and cot are both set"):
        resolve_config(Config(MINIMAL, coconut=True, cot=True))


def test_read_config_tells_what_was_asked_from_the_defaults(tmp_path):
    config, asked = read_config(write(tmp_path, {**MINIMAL, "lr": "1e-3"}), ["seed=4", "lr=0.5"])
    assert asked == {**MINIMAL, "lr": 0.5, "seed": 4} and list(asked)[-1] == "seed"
    assert config == load_config(write(tmp_path, {**MINIMAL, "lr": "1e-3"}), ["seed=4", "lr=0.5"]) and config.weight_decay == 0.01


def test_saved_config_files_tell_asked_from_resolved(tmp_path):
    path = write(tmp_path, {**MINIMAL, "save_path": str(tmp_path / "runs"), "no_thoughts": True, "c_thought": 2})
    user, asked = read_config(path, ["seed=7"])
    configs = resolve_config(user, ResumePoint(2, 0, str(tmp_path / "runs" / "x" / "checkpoint_2")))
    save_run_config(asked, configs)
    folder = tmp_path / "runs" / "x"
    with open(folder / "config.yaml") as f:
        assert yaml.safe_load(f) == asked  # only what was asked: no defaults
    assert load_config(str(folder / "config.yaml")) == load_config(path, ["seed=7"])  # and it runs as the original
    resolved_text = (folder / "resolved.yaml").read_text()
    assert yaml.safe_load(resolved_text) == configs.to_dict()
    head = [line for line in resolved_text.splitlines() if line.startswith("#")]
    assert "method: no_thoughts" in head[0]
    assert sorted(line.split(":")[0].strip("# ") for line in head[2:]) == ["c_thought", "load_model_path", "resume"]
    assert f"#   load_model_path: None -> {configs.load_model_path}" in head and "#   c_thought: 2 -> 0" in head

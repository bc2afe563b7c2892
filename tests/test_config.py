"""Config loading and checking (utils.load_config).

python -m pytest -q tests/test_config.py
"""

import os

import pytest
import yaml

from utils import CONFIG_KEYS, Config, UserError, load_config

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

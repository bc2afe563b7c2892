"""Tests for the quickstart recipe and its reproducibility script: the README
command, the configs' comments and benchmarks/quickstart_seeds.py make the
same data and model; the three configs train the same budget; the pinned
stack satisfies the ranges; and the script runs end to end on a short
schedule and prints its table.

python -m pytest -q tests/test_quickstart.py
"""

import importlib.util
import json
import os
import re

import pytest
import yaml
from helpers import REPO
from packaging.requirements import Requirement

from utils import load_config

CONFIGS = ("quickstart.yaml", "quickstart_nocot.yaml", "quickstart_cot.yaml")


def load_seeds_script():
    spec = importlib.util.spec_from_file_location("quickstart_seeds", os.path.join(REPO, "benchmarks", "quickstart_seeds.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seeds = load_seeds_script()


def one_line(text):
    """Shell text with its line continuations and runs of spaces collapsed."""
    return re.sub(r"\s+", " ", text.replace("\\\n", " "))


def readme_quickstart_command():
    with open(os.path.join(REPO, "README.md")) as f:
        section = f.read().split("## Quickstart", 1)[1]
    return one_line(section.split("```bash\n", 1)[1].split("```", 1)[0])


def config_comment(name):
    with open(os.path.join(REPO, "args", name)) as f:
        return one_line(" ".join(line.lstrip("# ") for line in f if line.startswith("#")))


DATA_COMMAND = "python preprocessing/tasks.py " + " ".join(seeds.TASK_ARGS)
MODEL_COMMAND = "python preprocessing/tiny_model.py data/modsum_train.json --out models/tiny-gpt2 " + " ".join(seeds.MODEL_ARGS)


@pytest.mark.parametrize("where", ["README.md", "args/quickstart.yaml"])
def test_data_and_model_commands_agree_with_the_script(where):
    text = readme_quickstart_command() if where == "README.md" else config_comment("quickstart.yaml")
    assert DATA_COMMAND in text
    assert MODEL_COMMAND in text


def test_readme_command_installs_the_tested_stack_and_trains_both_runs():
    command = readme_quickstart_command()
    assert "pip install -r requirements.txt -c constraints.txt" in command
    assert "python run.py args/quickstart.yaml" in command and "python run.py args/quickstart_nocot.yaml" in command
    with open(os.path.join(REPO, ".ci", "run")) as f:
        assert "-c constraints.txt" in f.read()


def test_configs_share_data_model_and_budget():
    configs = {name: load_config(os.path.join(REPO, "args", name)) for name in CONFIGS}
    shared = ("model_id", "train_path", "val_path", "num_epochs", "lr", "batch_size_training", "train_samples", "seed")
    first = configs[CONFIGS[0]]
    for name, config in configs.items():
        assert {k: config[k] for k in shared} == {k: first[k] for k in shared}, name
        assert config.load_model_path == "None" and config.resume == 0, name  # each trains from the built model
    coconut = configs["quickstart.yaml"]
    assert coconut.coconut and configs["quickstart_nocot.yaml"].no_cot and configs["quickstart_cot.yaml"].cot


def test_final_stage_writes_no_step():
    """The data's samples have max_hops steps; the last epoch's stage replaces all of them."""
    coconut = load_config(os.path.join(REPO, "args", "quickstart.yaml"))
    steps = int(seeds.TASK_ARGS[seeds.TASK_ARGS.index("--max-hops") + 1])
    final_stage = (coconut.num_epochs - 1) // coconut.epochs_per_stage
    assert final_stage >= steps and coconut.max_latent_stage >= steps  # every step a thought slot, none written


def requirement_names(*files):
    names = {}
    for path in files:
        with open(os.path.join(REPO, path)) as f:
            for line in f:
                if line.strip() and not line.startswith("#"):
                    requirement = Requirement(line.strip())
                    names[requirement.name.lower()] = requirement
    return names


def test_constraints_pin_every_requirement_within_its_range():
    wanted = requirement_names("requirements.txt", "tests/requirements.txt")
    pinned = requirement_names("constraints.txt")
    for name, requirement in wanted.items():
        assert name in pinned, f"{name} is not pinned in constraints.txt"
        (spec,) = pinned[name].specifier
        assert spec.operator == "==", name
        assert requirement.specifier.contains(spec.version), f"{name}=={spec.version} is outside {requirement.specifier}"


@pytest.mark.slow
def test_seeds_script_runs_and_prints_the_table(tmp_path, capsys):
    """Seed 1 on one thread, Coconut and No-CoT, two epochs of two batches:
    the recipe's own data and model are made, both runs train, and the table
    holds a figure for each stage and the baseline."""
    out = tmp_path / "seeds"
    code = seeds.main(["--seeds", "1", "--threads", "1", "--runs", "coconut,nocot", "--out", str(out),
                       "num_epochs=2", "train_samples=64", "batch_size_eval=250"])
    assert code == 0
    table = (out / "table.md").read_text()
    assert "| seed | threads | Coconut stage 0 | Coconut stage 1 | No-CoT | minutes (coconut + nocot) |" in table
    assert re.search(r"\| 1 \| 1 \| [01]\.\d{3} \| [01]\.\d{3} \| [01]\.\d{3} \| \d+\.\d \+ \d+\.\d \|", table)
    (row,) = json.loads((out / "table.json").read_text())
    assert row["seed"] == 1 and row["threads"] == 1
    assert sorted(row["coconut"]["accuracy"]) == ["0", "1"] and sorted(row["nocot"]["accuracy"]) == ["0"]
    assert (out / "seed1" / "data" / "modsum_train.json").exists() and (out / "seed1" / "model" / "config.json").exists()
    with open(out / "seed1" / "threads1" / "coconut" / "config.yaml") as f:
        assert yaml.safe_load(f)["seed"] == 1
    assert table[table.index("| seed"):].strip() in capsys.readouterr().out  # printed as well

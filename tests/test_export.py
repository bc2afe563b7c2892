"""HF-format export (`analysis.py export`) and `Coconut.from_pretrained`:
export a trained run, load it back, and get the same generations; the base
model alone loads with AutoModelForCausalLM; bad targets give one line.

python -m pytest -q tests/test_export.py
"""

import json
import os

import pytest
import torch
from helpers import config_for

import analysis
import build
import run as cli
from coconut import Coconut
from dataset import MyCollator, get_dataset, get_question_latent_dataset

pytestmark = pytest.mark.slow  # every test here reads the `trained` fixture's two-epoch run


@pytest.fixture(scope="module")
def trained(workspace, tmp_path_factory):
    """A two-epoch Coconut run (stage 1 last) with a latent projection and rms norm."""
    folder = tmp_path_factory.mktemp("export")
    configs = config_for(workspace, folder, "exp", num_epochs=2, latent_projection=True, latent_norm="rms")
    cli.run(configs, 0, 1, torch.device("cpu"))
    return folder / "runs" / "exp", configs


def generations(coconut, tokenizer, configs, ids, stage):
    base = get_dataset(configs.val_path, tokenizer)
    prompts = list(get_question_latent_dataset(stage, base, configs, ids[0], ids[1], ids[2]))
    batch = MyCollator(tokenizer, latent_id=ids[1])(prompts)
    coconut.eval()
    return [t.tolist() for t in coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=12)]


def test_export_round_trip_gives_the_same_generations(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_folder, configs = trained
    out = tmp_path / "hf"
    assert analysis.main(["export", str(run_folder), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "coconut.json", "latent_projection.safetensors"} <= set(os.listdir(out))
    meta = json.loads((out / "coconut.json").read_text())
    assert (meta["stage"], meta["c_thought"], meta["latent_norm"], meta["latent_projection"]) == (1, 1, "rms", True)
    assert meta["checkpoint"].endswith("checkpoint_2")

    configs.load_model_path, configs.only_eval = str(run_folder / "checkpoint_2"), True
    original, tokenizer, id_map = build.build_model(configs)
    ids = (id_map["<|start-latent|>"], id_map["<|latent|>"], id_map["<|end-latent|>"])
    loaded = Coconut.from_pretrained(str(out))
    loaded_tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert [loaded_tokenizer.convert_tokens_to_ids(t) for t in ("<|start-latent|>", "<|latent|>", "<|end-latent|>")] == list(ids)
    assert (loaded.latent_token_id, loaded.start_latent_id, loaded.end_latent_id) == (ids[1], ids[0], ids[2])
    torch.testing.assert_close(loaded.latent_projection.weight, original.latent_projection.weight)

    expected = generations(original, tokenizer, configs, ids, stage=1)
    assert generations(loaded, loaded_tokenizer, configs, ids, stage=1) == expected
    assert any(ids[1] in row for row in expected)  # the prompts did hold thoughts

    plain = AutoModelForCausalLM.from_pretrained(str(out))  # the base model alone, for use elsewhere
    for name, value in original.base_causallm.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[name], value, msg=name)


@pytest.mark.parametrize("case", ["missing", "no-config", "out-not-empty"])
def test_export_bad_targets_give_one_line(case, trained, tmp_path, capsys):
    run_folder, _ = trained
    target, out = str(run_folder), tmp_path / "hf"
    if case == "missing":
        target = str(tmp_path / "nowhere")
    elif case == "no-config":
        (tmp_path / "bare").mkdir()
        (tmp_path / "bare" / "checkpoint_1").write_bytes((run_folder / "checkpoint_1").read_bytes())
        target = str(tmp_path / "bare" / "checkpoint_1")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    assert analysis.main(["export", target, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"missing": "no such run folder or checkpoint file", "no-config": "no config.yaml in",
                "out-not-empty": "exists and is not an empty folder"}[case]
    assert err[-1].startswith("error: ") and expected in err[-1]
    assert (out / "keep.txt").exists() if case == "out-not-empty" else not out.exists()

"""No pickle on any load path: training states load with
torch.load(weights_only=True), a .state carrying a code-running pickle is
refused with one line and runs nothing, an older state file resumes only
with `legacy_state_files` (and says so), and the token cache is plain
Arrow, read by datasets without pickle.

python -m pytest -q tests/test_file_safety.py
"""

import os

import numpy as np
import torch
from helpers import config_for

import dataset
import run as cli
from dataset import get_dataset


class Payload:
    """Unpickling this calls `open(marker, "w")`: code run by loading a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def trained_folder(workspace, tmp_path, name):
    configs = config_for(workspace, tmp_path, name, num_epochs=1, reset_optimizer=False)
    cli.run(configs, 0, 1, torch.device("cpu"))
    return tmp_path / "runs" / name


def resume(workspace, tmp_path, name, capsys, **kw):
    """run.py on the run folder again, one more epoch: (exit status, stderr lines)."""
    config = tmp_path / f"{name}.yaml"
    code = cli.main([str(config), "num_epochs=2"] + [f"{k}={v}" for k, v in kw.items()])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_state_files_load_with_weights_only(workspace, tmp_path):
    folder = trained_folder(workspace, tmp_path, "safe")
    state = torch.load(folder / "checkpoint_1.state", weights_only=True)
    assert state["optimizer"]["state"] and state["rng"][0]["numpy"][0] == "MT19937"


def test_a_state_with_a_code_running_pickle_is_refused(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    folder = trained_folder(workspace, tmp_path, "evil")
    marker = tmp_path / "PWNED"
    torch.save({"rng": [Payload(str(marker))]}, folder / "checkpoint_1.state")
    before = sorted(os.listdir(folder))

    code, err = resume(workspace, tmp_path, "evil", capsys)
    assert code == 2 and err[-1].startswith("error: ") and "checkpoint_1.state: holds objects that safe loading refuses" in err[-1]
    assert "legacy_state_files: True" in err[-1] and not any("Traceback" in line for line in err)
    assert not marker.exists()  # nothing was executed
    assert sorted(os.listdir(folder)) == before  # and nothing written


def test_an_older_state_resumes_only_when_asked(workspace, tmp_path, capsys, monkeypatch):
    """A state file as written before 2026-12-05: NumPy's RNG state as an array."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    folder = trained_folder(workspace, tmp_path, "old")
    state = torch.load(folder / "checkpoint_1.state", weights_only=True)
    kind, keys, *rest = state["rng"][0]["numpy"]
    state["rng"][0]["numpy"] = (kind, keys.numpy().astype(np.uint32), *rest)
    torch.save(state, folder / "checkpoint_1.state")

    code, err = resume(workspace, tmp_path, "old", capsys)
    assert code == 2 and "holds objects that safe loading refuses" in err[-1]
    code, err = resume(workspace, tmp_path, "old", capsys, legacy_state_files="true")
    assert code == 0
    assert any(line.startswith("warning: ") and "checkpoint_1.state: an older training state" in line for line in err)
    assert (folder / "checkpoint_2").exists()


def test_token_cache_is_plain_arrow(workspace, tmp_path, monkeypatch):
    import pyarrow as pa
    from transformers import AutoTokenizer

    root, model_dir = workspace
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    first = get_dataset(str(root / "train.json"), tokenizer)
    (cache,) = [f["filename"] for f in first.table.cache_files]
    assert cache.endswith(".arrow")
    with pa.memory_map(cache) as source:  # an Arrow stream of int columns: nothing to unpickle
        table = pa.ipc.open_stream(source).read_all()
    assert table.column_names == ["question_tokenized", "steps_tokenized", "answer_tokenized", "idx"]
    assert table.column("question_tokenized").to_pylist() == [s["question_tokenized"] for s in first]

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again: the cache was not read")

    monkeypatch.setattr(dataset, "encode_all", no_tokenising)
    assert list(get_dataset(str(root / "train.json"), tokenizer)) == list(first)

"""Data sources read through HF datasets: a JSON file, a saved dataset
folder, a folder of Parquet files in a hub repository's layout (the path a
hub id takes: the hub is unreachable here), column mapping and the GSM8K
format; every source gives the JSON file's samples, token for token.

python -m pytest -q tests/test_data_sources.py
"""

import json
import re

import datasets
import pytest
import torch
from helpers import config_for, make_samples

import run as cli
from dataset import get_dataset, load_samples
from utils import UserError

SAMPLES = make_samples(12, seed=4)



def gsm8k_solution(sample):
    """A worked solution in openai/gsm8k's form: prose around <<...>>
    annotations, then #### and the answer."""
    lines = [f"Then {step[2:-2].split('=')[1]} {step}." for step in sample["steps"]]
    return "\n".join(lines + [f"#### {sample['answer']}"])


def hub_folder(root, rows_by_split):
    """A local copy of a hub dataset repository in openai/gsm8k's layout:
    a README naming config `main` and its splits, one Parquet file each."""
    (root / "main").mkdir(parents=True)
    splits = "".join(f"  - split: {split}\n    path: main/{split}-*\n" for split in rows_by_split)
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: main\n  data_files:\n{splits}---\n")
    for split, rows in rows_by_split.items():
        datasets.Dataset.from_list(rows).to_parquet(str(root / "main" / f"{split}-00000-of-00001.parquet"))
    return str(root)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, model_dirs):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("sources")
    (root / "d.json").write_text(json.dumps(SAMPLES))
    saved = datasets.Dataset.from_list(SAMPLES)
    saved.save_to_disk(str(root / "saved"))
    datasets.DatasetDict(train=saved, test=saved.select(range(3))).save_to_disk(str(root / "saved_splits"))
    hub_folder(root / "hub", {"train": SAMPLES, "test": SAMPLES[:3]})
    renamed = [{"problem": s["question"], "solution": s["answer"], "rationale": s["steps"], "answer": 0} for s in SAMPLES]
    hub_folder(root / "renamed", {"train": renamed})
    gsm8k = [{"question": s["question"], "answer": gsm8k_solution(s)} for s in SAMPLES]
    hub_folder(root / "gsm8k", {"train": gsm8k, "test": gsm8k[:3]})
    return root, AutoTokenizer.from_pretrained(model_dirs["gpt2"])


@pytest.mark.parametrize(
    "source, options",
    [
        ("saved", {}),
        ("saved_splits:train", {}),
        ("hub:main:train", {}),  # ID:CONFIG:SPLIT, as openai/gsm8k:main:train
        ("renamed:main:train", dict(columns="question=problem, answer=solution,steps=rationale")),
        ("gsm8k:main:train", dict(data_format="gsm8k")),
    ],
)
def test_every_source_gives_the_json_samples(sources, source, options):
    root, tokenizer = sources
    expected = list(get_dataset(str(root / "d.json"), tokenizer))
    path = str(root / source)
    raw = load_samples(path, **options)
    assert [{k: raw[i][k] for k in ("question", "answer", "steps")} for i in range(len(raw))] == SAMPLES
    assert list(get_dataset(path, tokenizer, **options)) == expected
    assert list(get_dataset(path, tokenizer, max_size=5, **options)) == expected[:5]


def test_a_folder_of_data_files_without_a_split_holds_one(sources, tmp_path):
    root, tokenizer = sources
    folder = tmp_path / "one"
    folder.mkdir()
    datasets.Dataset.from_list(SAMPLES).to_parquet(str(folder / "part.parquet"))
    assert list(get_dataset(str(folder), tokenizer)) == list(get_dataset(str(root / "d.json"), tokenizer))


def test_a_read_only_source_folder_is_tokenised_in_memory(sources, monkeypatch):
    """datasets writes a transform's result beside the source's files: in a
    folder the user cannot write (a shared copy), nothing is written."""
    import dataset

    root, tokenizer = sources
    expected = list(get_dataset(str(root / "d.json"), tokenizer))
    shared = root / "shared"
    datasets.Dataset.from_list(SAMPLES).save_to_disk(str(shared))
    before = sorted(p.name for p in shared.iterdir())
    monkeypatch.setattr(dataset.os, "access", lambda path, mode: not path.startswith(str(shared)))
    samples = get_dataset(str(shared), tokenizer)
    assert not samples.table.cache_files and list(samples) == expected
    assert sorted(p.name for p in shared.iterdir()) == before
    monkeypatch.undo()
    assert get_dataset(str(shared), tokenizer).table.cache_files  # writable: cached beside the source
    assert len(list(shared.iterdir())) > len(before)


def test_gsm8k_format_takes_annotations_and_final_answer():
    from dataset import gsm8k_fields

    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"
    assert gsm8k_fields({"answer": [solution, "No working.\n#### 1,000"]}) == {
        "answer": ["72", "1,000"], "steps": [["<<48/2=24>>", "<<48+24=72>>"], []],
    }


BAD_SOURCES = [
    ("hub:main:dev", {}, 'cannot be read by datasets: Unknown split "dev"'),
    ("saved_splits", {}, "holds several splits (it has train, test): name one as"),
    ("saved:train", {}, "a saved single dataset has no splits"),
    ("renamed:main:train", dict(columns="question=problem,steps=rationale"), "sample 0: 'answer' must be a string, got int"),
    ("renamed:main:train", dict(columns="question=prompt"), "data_columns names column 'prompt', which the data does not have"),
    ("renamed:main:train", dict(columns="query=problem"), "data_columns: 'query' is not one of question, answer, steps"),
    ("hub:main:train", dict(data_format="gsm8k"), "sample 0: 'answer' has no '####'"),
    ("gsm8k:main:train", {}, "sample 0: missing key 'steps'"),
    ("nowhere/none:train", {}, "cannot be read by datasets"),
    ("nowhere/none", {}, "data file not found (a hub dataset is named ID:SPLIT)"),
]


@pytest.mark.parametrize("source, options, message", BAD_SOURCES)
def test_bad_sources_are_one_line_errors(sources, source, options, message, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no retries against an unreachable hub
    root, tokenizer = sources
    path = str(root / source)
    with pytest.raises(UserError, match=re.escape(message)) as err:
        get_dataset(path, tokenizer, **options)
    assert str(err.value).startswith(path + ": ") and "\n" not in str(err.value)


def test_bad_rows_of_a_table_are_named(tmp_path):
    rows = [dict(SAMPLES[0]), dict(SAMPLES[1], steps=None)]
    folder = hub_folder(tmp_path / "nulls", {"train": rows})
    with pytest.raises(UserError, match=re.escape("sample 1: 'steps' must be a list of strings")):
        load_samples(folder + ":main:train")


def test_a_run_reads_a_hub_layout_folder(sources, workspace, tmp_path, capsys):
    """run.py trains and evaluates from ID:CONFIG:SPLIT sources in GSM8K's
    format: the same losses and accuracy as from the equivalent JSON files."""
    root, _ = sources
    (tmp_path / "train.json").write_text(json.dumps(SAMPLES))
    (tmp_path / "valid.json").write_text(json.dumps(SAMPLES[:3]))
    results = {}
    for name, paths in {
        "json": dict(train_path=str(tmp_path / "train.json"), val_path=str(tmp_path / "valid.json")),
        "hub": dict(train_path=f"{root / 'gsm8k'}:main:train", val_path=f"{root / 'gsm8k'}:main:test", data_format="gsm8k"),
    }.items():
        configs = config_for(workspace, tmp_path, name, num_epochs=2, max_latent_stage=1, batch_size_training=4, **paths)
        cli.run(configs, 0, 1, torch.device("cpu"))
        out = capsys.readouterr().out
        results[name] = [line for line in out.splitlines() if line.startswith(("Accuracy on validation set", "CoT match"))]
        with open(tmp_path / "runs" / name / "metrics.jsonl") as f:
            results[name].append([row.get("train/loss") for row in map(json.loads, f) if "train/loss" in row])
    assert len(results["json"]) == 5 and len(results["json"][-1]) == 6  # 2 epochs x 3 batches
    assert results["hub"] == results["json"]

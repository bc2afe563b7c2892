"""Distributed equivalence on CPU (gloo, FSDP): two processes with batch b
train to the same losses and weights as one process with batch 2b, and
evaluation counts each sample once, so accuracy is the same on one and two
processes even when the validation set does not divide by the world size.

Exactness needs each rank's batch to hold the same number of label tokens:
data-parallel training averages the ranks' mean losses (as the reference
does), which equals the global mean only then. The data here is built so.

python -m pytest -q tests/test_distributed.py
"""

import collections
import json
import re
import shutil

import pytest
import torch
from helpers import load_tokenizer_and_model, make_samples, run_cli, write_config

import build
import evaluation
from dataset import MyCollator, get_dataset, get_question_latent_dataset
from distributed import Process
from utils import load_config

pytestmark = pytest.mark.slow  # every test here runs run.py under torchrun


def equal_length_samples(tokenizer, n):
    """Two-step problems whose steps and answer tokenise to the same lengths."""
    candidates = []
    for a in range(1, 4):
        for b in range(1, 10):
            for c in range(1, 4):
                for d in range(1, 4):
                    steps = [f"<<{a}+{c}={a + c}>>", f"<<{a + c}+{d}={a + c + d}>>"]
                    candidates.append({"question": f"Tom has {a} apples and gets {b} more?", "steps": steps, "answer": str(a + c + d)})

    def shape(sample):
        pieces = [t + "\n" for t in sample["steps"]] + ["### " + sample["answer"]]
        return tuple(len(tokenizer.encode(piece, add_special_tokens=False)) for piece in pieces)

    common = collections.Counter(map(shape, candidates)).most_common(1)[0][0]
    chosen = [s for s in candidates if shape(s) == common]
    assert len(chosen) >= n
    return chosen[:n]


@pytest.fixture(scope="module")
def no_dropout(model_dirs, tmp_path_factory):
    """The tiny GPT-2 without dropout (dropout masks depend on how rows are split)."""
    folder = tmp_path_factory.mktemp("nodrop") / "gpt2"
    shutil.copytree(model_dirs["gpt2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer, _ = load_tokenizer_and_model(str(folder))
    root = folder.parent
    samples = equal_length_samples(tokenizer, 22)
    (root / "train.json").write_text(json.dumps(samples[:16]))
    # the loss set divides by 2 (the sampler would repeat a sample otherwise); the
    # accuracy set does not (evaluation counts each sample once regardless)
    (root / "valid.json").write_text(json.dumps(samples[16:22]))
    (root / "valid5.json").write_text(json.dumps(samples[16:21]))
    return root, str(folder)


def eval_losses(stdout):
    return [float(x) for x in re.findall(r"^eval loss (\S+)$", stdout, re.M)]


def test_two_processes_match_one_with_double_batch(no_dropout, tmp_path):
    root, model_dir = no_dropout
    common = dict(save_path=str(tmp_path / "runs"), train_path=str(root / "train.json"), val_path=str(root / "valid.json"),
                  num_epochs=3, max_latent_stage=2, reset_optimizer=False)
    one = run_cli([write_config(tmp_path, model_dir, "one", batch_size_training=8, **common)], tmp_path, WANDB_MODE="disabled")
    two = run_cli([write_config(tmp_path, model_dir, "two", batch_size_training=4, **common)], tmp_path, torchrun=True, WANDB_MODE="disabled")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    assert len(eval_losses(one.stdout)) == 3
    torch.testing.assert_close(eval_losses(two.stdout), eval_losses(one.stdout), rtol=1e-5, atol=1e-6)
    a = torch.load(tmp_path / "runs" / "one" / "checkpoint_3", weights_only=True)
    b = torch.load(tmp_path / "runs" / "two" / "checkpoint_3", weights_only=True)
    for key in a:  # 6 optimizer steps over 3 stages
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_accuracy_is_the_same_on_one_and_two_processes(no_dropout, tmp_path):
    """Make some answers right by construction (the model's own predictions),
    then evaluate 5 samples on 1 and on 2 processes."""
    root, model_dir = no_dropout
    config = write_config(tmp_path, model_dir, "probe", save_path=str(tmp_path / "runs"), train_path=str(root / "train.json"),
                          val_path=str(root / "valid5.json"), num_epochs=2)
    configs = load_config(config)
    model, tokenizer, ids = build.build_model(configs)
    with torch.no_grad():  # untrained, the three new rows tie exactly with `<<`; break the ties
        torch.manual_seed(0)
        table = model.base_causallm.get_input_embeddings().weight  # tied with the LM head
        table[list(ids.values())] += 0.05 * torch.randn(3, table.shape[1])
    checkpoint = tmp_path / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    raw = json.loads((root / "valid5.json").read_text())
    prompts = get_question_latent_dataset(1, get_dataset(str(root / "valid5.json"), tokenizer), configs,
                                          ids["<|start-latent|>"], ids["<|latent|>"], ids["<|end-latent|>"])
    records = []
    evaluation.evaluate(model, prompts, raw, configs, tokenizer=tokenizer, collator=MyCollator(tokenizer, latent_id=ids["<|latent|>"]),
                        process=Process(0, 1, torch.device("cpu")), max_new_tokens=128, records=records)
    for index in (1, 3, 4):  # sample 0 keeps its answer: it is the one the tokenizer check reads
        raw[index]["answer"] = evaluation.extract_answer(records[index][1])
    (tmp_path / "valid.json").write_text(json.dumps(raw))

    args = [config, "only_eval=true", f"load_model_path={checkpoint}", "resume=1", f"val_path={tmp_path / 'valid.json'}"]
    one = run_cli(args, tmp_path, WANDB_MODE="disabled")
    two = run_cli(args + ["batch_size_eval=2"], tmp_path, torchrun=True, WANDB_MODE="disabled")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    accuracy = re.findall(r"Accuracy on validation set: \d+ / \d+", one.stdout)
    assert accuracy == ["Accuracy on validation set: 3 / 5"]
    assert re.findall(r"Accuracy on validation set: \d+ / \d+", two.stdout) == accuracy
    assert "Total=3" in two.stdout and "Total=2" in two.stdout  # 3 + 2: none twice, none dropped


def test_unequal_latent_counts_on_the_two_ranks(workspace, tmp_path):
    """Rows with different latent counts on the two ranks, in training
    (uniform_prob draws a stage per sample) and in evaluation
    (pad_latent_to_max off; rank 0's samples have no steps, rank 1's one):
    every rank still makes as many sharded model calls as the other, so the
    run ends (it used to wait forever) and evaluates every sample once."""
    root, model_dir = workspace
    (tmp_path / "train.json").write_text(json.dumps(make_samples(16, seed=3)))
    valid = [dict(s, steps=s["steps"][:1] if i % 2 else []) for i, s in enumerate(make_samples(6, seed=4, max_steps=3))]
    (tmp_path / "valid.json").write_text(json.dumps(valid))
    config = write_config(tmp_path, model_dir, "unequal", save_path=str(tmp_path / "runs"), train_path=str(tmp_path / "train.json"),
                          val_path=str(tmp_path / "valid.json"), num_epochs=2, max_latent_stage=2, pad_latent_to_max=False,
                          uniform_prob=0.5, batch_size_training=4)
    two = run_cli([config, "batch_size_eval=3"], tmp_path, torchrun=True, timeout=300, WANDB_MODE="disabled")
    assert two.returncode == 0, two.stderr[-2000:]
    assert len(eval_losses(two.stdout)) == 2
    assert len(re.findall(r"Accuracy on validation set: \d+ / 6", two.stdout)) == 2

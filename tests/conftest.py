"""Shared fixtures: a BPE tokenizer trained here with the `tokenizers` library,
tiny random GPT-2 / Llama / Qwen2 models saved to temp folders and loaded back
through `from_pretrained` (the path a user's `model_id` takes), and small
data files. No network. Plain helper functions shared by the test files live
in tests/helpers.py.

Run the whole suite with: python -m pytest -q tests
Only the fast tier (no end-to-end runs, torchrun or compilation):
python -m pytest -q -m "not slow" tests
"""

import atexit
import json
import os
import shutil
import sys
import tempfile

import pytest

# helpers.py holds assertions (assert_one_line_error): rewritten like a test
# file's, for the same failure messages, so registered before its import
pytest.register_assert_rewrite("helpers")

from helpers import REPO, make_samples, toy_tokenizer  # noqa: E402

sys.path.insert(0, REPO)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hf-datasets-")  # never the user's own cache
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

def train_tokenizer(folder, add_bos=False):
    """helpers.toy_tokenizer, saved to `folder`."""
    fast = toy_tokenizer(add_bos=add_bos)
    fast.save_pretrained(folder)
    return fast


def build_model_dir(folder, arch, add_bos=False):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_tokenizer(folder, add_bos=add_bos)
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=32, n_layer=2, n_head=2, bos_token_id=eos, eos_token_id=eos)
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
        )
        model = LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = Qwen2Config(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, eos_token_id=eos, tie_word_embeddings=True,
        )
        model = Qwen2ForCausalLM(config)
    else:
        raise ValueError(arch)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: on a small shared CPU, two
    threads per tiny matmul mostly wait for each other (greedy decoding ran
    up to 100x slower); restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """{arch: folder} for tiny gpt2, llama (tokenizer adds BOS) and qwen2."""
    root = tmp_path_factory.mktemp("models")
    return {
        "gpt2": build_model_dir(str(root / "gpt2"), "gpt2"),
        "llama": build_model_dir(str(root / "llama"), "llama", add_bos=True),
        "qwen2": build_model_dir(str(root / "qwen2"), "qwen2"),
    }


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name, n, seed in (("train", 48, 1), ("valid", 10, 2)):
        with open(root / f"toy_{name}.json", "w") as f:
            json.dump(make_samples(n, seed=seed), f)
    return root


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, model_dirs):
    root = tmp_path_factory.mktemp("run")
    (root / "train.json").write_text(json.dumps(make_samples(24, seed=1)))
    (root / "valid.json").write_text(json.dumps(make_samples(5, seed=2)))
    return root, model_dirs["gpt2"]

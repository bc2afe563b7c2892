"""Llama and Qwen2 through run.py: the FSDP units are their decoder layers
(from `_no_split_modules`), weights load in float32 whatever dtype the
checkpoint was saved in, and a Coconut run with a latent stage trains,
saves and evaluates on one process and on two (torchrun, gloo; with
`latent_projection`, so the wrapper's own parameters are sharded too).

python -m pytest -q tests/test_models.py
"""

import pytest
import torch
from helpers import checkpoints, load_tokenizer_and_model, run_cli, write_config

import build
import distributed
from coconut import Coconut
from utils import load_config

BLOCKS = {"gpt2": "GPT2Block", "llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer"}


pytestmark = pytest.mark.usefixtures("one_thread")


def run_config(workspace, folder, arch, model_dirs, name, **kw):
    root, _ = workspace
    return write_config(folder, model_dirs[arch], name, save_path=str(folder / "runs"), train_path=str(root / "train.json"),
                        val_path=str(root / "valid.json"), num_epochs=2, max_latent_stage=1, batch_size_eval=5, **kw)


@pytest.mark.parametrize("arch", sorted(BLOCKS))
def test_shard_units_are_the_decoder_layers(arch, model_dirs):
    _, model = load_tokenizer_and_model(model_dirs[arch])
    for wrapped in (model, Coconut(model, 0, 1, 2, 3)):
        units = distributed.shard_units(wrapped)
        assert [type(m).__name__ for m in units] == [BLOCKS[arch]] * 2  # the tiny models have 2 blocks
        assert all(not any(u is not m and u in set(m.modules()) for u in units) for m in units)  # none nested


def test_weights_load_in_float32(model_dirs, tmp_path):
    """transformers 5 would load a bfloat16 checkpoint (Llama 3.2, Qwen2.5
    on the hub) in bfloat16; the run wants float32 unless bf16 is set."""
    tokenizer, model = load_tokenizer_and_model(model_dirs["llama"])
    folder = tmp_path / "llama-bf16"
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded, _ = build.load_pretrained(str(folder))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_coconut_run_one_process(arch, model_dirs, workspace, tmp_path):
    config = run_config(workspace, tmp_path, arch, model_dirs, arch)
    done = run_cli([config], tmp_path, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoints(tmp_path, arch) == ["checkpoint_1", "checkpoint_2"]
    assert done.stdout.count("Accuracy on validation set: ") == 2 and "/ 5 = " in done.stdout
    assert "stage 1 (epoch 2)" in done.stdout  # the second epoch had continuous thoughts
    state = torch.load(tmp_path / "runs" / arch / "checkpoint_2", weights_only=True)
    expected, _, _ = build.build_model(load_config(config))
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected.state_dict().items()}
    first = torch.load(tmp_path / "runs" / arch / "checkpoint_1", weights_only=True)
    assert any(not torch.equal(first[k], state[k]) for k in state)  # it trained


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_coconut_run_two_processes(arch, model_dirs, workspace, tmp_path):
    config = run_config(workspace, tmp_path, arch, model_dirs, f"pair-{arch}", latent_projection=True)
    done = run_cli([config], tmp_path, torchrun=True, WANDB_MODE="disabled")
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    assert f"FSDP: 2 shard units ({BLOCKS[arch]}) and the root" in done.stdout
    assert checkpoints(tmp_path, f"pair-{arch}") == ["checkpoint_1", "checkpoint_2"]
    assert "Total=3" in done.stdout and "Total=2" in done.stdout and " / 5 = " in done.stdout
    # whole tensors in the reference key format, plus the projection; it trained at stage 1
    state = torch.load(tmp_path / "runs" / f"pair-{arch}" / "checkpoint_2", weights_only=True)
    expected, _, _ = build.build_model(load_config(config))
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected.state_dict().items()}
    width = state["latent_projection.weight"].shape[0]
    assert not torch.equal(state["latent_projection.weight"], torch.eye(width))


"""Latent feedback variants of the Coconut wrapper (`latent_layer`,
`latent_norm`, `latent_projection`): the defaults are the reference,
each variant feeds back what it says (checked against the naive
one-latent-at-a-time reference, helpers.naive_forward, given the variant's
layer and transform), in training and in generation, and a projection run
saves, resumes and refuses to load into a run without it.

python -m pytest -q tests/test_feedback.py
"""

import copy

import pytest
import torch
from helpers import checkpoints, mixed_batch, naive_forward, run_cli, setup_model, write_config

import build
import run as cli
from coconut import Coconut
from utils import UserError, load_config

pytestmark = pytest.mark.usefixtures("one_thread")


DEFAULTS = dict(pause_as_thought=False, latent_layer=-1, latent_norm="none", latent_projection=False)


def wrap(model, tokenizer, ids, **kw):
    start, latent, end = ids
    return Coconut(model, latent, start, end, tokenizer.eos_token_id, **kw)


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "idx"}


@pytest.fixture
def gpt2(model_dirs, tmp_path):
    tokenizer, model, ids = setup_model(model_dirs["gpt2"])
    return tokenizer, model, ids, mixed_batch(tokenizer, ids, tmp_path)


def test_default_keywords_change_nothing(gpt2):
    """Explicit defaults give bit-identical loss, logits, gradients,
    generations and state-dict keys (dropout on: same RNG, same masks)."""
    tokenizer, model, ids, batch = gpt2
    model.train()
    other = copy.deepcopy(model)
    plain, explicit = wrap(model, tokenizer, ids), wrap(other, tokenizer, ids, **DEFAULTS)
    torch.manual_seed(3)
    a = plain(**inputs(batch))
    torch.manual_seed(3)
    b = explicit(**inputs(batch))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.logits, b.logits) and torch.equal(a.inputs_embeds, b.inputs_embeds)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert list(plain.state_dict()) == list(explicit.state_dict())
    assert all(k.startswith(("base_causallm.", "embedding.")) for k in plain.state_dict())
    plain.eval(), explicit.eval()
    out_a = plain.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6)
    out_b = explicit.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6)
    assert [t.tolist() for t in out_a] == [t.tolist() for t in out_b]


def embedding_rms(model):
    table = model.get_input_embeddings().weight.detach()
    return table.pow(2).mean(dim=1).sqrt().mean()


VARIANTS = {
    "layer1": (dict(latent_layer=1), 1, lambda model: (lambda h: h)),
    "layer0": (dict(latent_layer=-3), 0, lambda model: (lambda h: h)),  # GPT-2 has 2 blocks: -3 is the embeddings output
    "rms": (dict(latent_norm="rms"), -1, lambda model: (lambda h: h * embedding_rms(model) / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())),
    "layernorm": (dict(latent_norm="layernorm"), -1, lambda model: (lambda h: torch.nn.functional.layer_norm(h, h.shape[-1:]))),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_naive_reference(variant, gpt2):
    tokenizer, model, ids, batch = gpt2
    keywords, layer, transform = VARIANTS[variant]
    reference = copy.deepcopy(model)
    coconut = wrap(model, tokenizer, ids, **keywords)
    out = coconut(**inputs(batch))
    ref_loss, ref_logits, ref_embeds = naive_forward(reference, batch, ids[1], layer, transform(reference))
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[real], ref_logits[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.inputs_embeds, ref_embeds, rtol=1e-4, atol=1e-5)
    out.loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # and it differs from the reference feedback
    default = wrap(copy.deepcopy(reference), tokenizer, ids)(**inputs(batch))
    assert not torch.allclose(default.inputs_embeds, out.inputs_embeds)


def latent_vectors(out, batch, latent_id):
    return out.inputs_embeds[batch["input_ids"] == latent_id]


def test_rms_and_layernorm_scales(gpt2):
    tokenizer, model, ids, batch = gpt2
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(3.0)  # the target follows the table as it is at forward time
    rms = wrap(model, tokenizer, ids, latent_norm="rms")(**inputs(batch))
    vectors = latent_vectors(rms, batch, ids[1])
    assert vectors.shape[0] == 12  # 0 + 2 + 4 + 6 latents
    target = embedding_rms(model)
    torch.testing.assert_close(vectors.pow(2).mean(-1).sqrt(), target.expand(vectors.shape[0]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(vectors.norm(dim=-1).mean(), model.get_input_embeddings().weight.norm(dim=-1).mean(), rtol=1e-4, atol=0)
    normed = latent_vectors(wrap(model, tokenizer, ids, latent_norm="layernorm")(**inputs(batch)), batch, ids[1])
    torch.testing.assert_close(normed.mean(-1), torch.zeros(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.var(-1, unbiased=False), torch.ones(12), atol=1e-3, rtol=0)


def test_projection_starts_as_identity_and_learns(gpt2):
    tokenizer, model, ids, batch = gpt2
    reference = wrap(copy.deepcopy(model), tokenizer, ids)(**inputs(batch))
    coconut = wrap(model, tokenizer, ids, latent_projection=True)
    assert {k for k in coconut.state_dict() if not k.startswith(("base_causallm.", "embedding."))} == {
        "latent_projection.weight", "latent_projection.bias"}
    out = coconut(**inputs(batch))
    torch.testing.assert_close(out.logits, reference.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    projection = coconut.latent_projection
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert projection.bias.grad.abs().sum() > 0
    # a projection learned away from the identity changes the fed-back vectors
    with torch.no_grad():
        projection.weight.mul_(0.5)
    changed = coconut(**inputs(batch))
    is_latent = batch["input_ids"] == ids[1]
    first = is_latent & (is_latent.cumsum(dim=1) == 1)  # each row's first latent: fed from the question alone
    torch.testing.assert_close(changed.inputs_embeds[first], 0.5 * out.inputs_embeds[first].detach())


@pytest.mark.parametrize("keywords", [dict(latent_layer=1), dict(latent_norm="rms", latent_projection=True)])
def test_generate_feeds_back_the_variant(keywords, gpt2):
    """The prompt's filled embeddings in generation are the training
    forward's, variant included, and the first new token follows its logits."""
    tokenizer, model, ids, batch = gpt2
    model.eval()
    coconut = wrap(model, tokenizer, ids, **keywords)
    if coconut.latent_projection is not None:
        with torch.no_grad():
            coconut.latent_projection.weight.add_(0.01 * torch.randn_like(coconut.latent_projection.weight))
    row = int((batch["input_ids"] == ids[1]).sum(1).argmax())  # the row with 6 latents
    real = batch["attention_mask"][row].bool()
    input_ids = batch["input_ids"][row][real][None]
    end = input_ids.shape[1]
    with torch.no_grad():
        out = coconut(input_ids, torch.ones_like(input_ids), position_ids=torch.arange(end)[None])
    tokens, embeds = coconut.generate(input_ids, torch.ones_like(input_ids), max_new_tokens=3, output_embedding=True)
    torch.testing.assert_close(embeds[0, :end], out.inputs_embeds[0])
    assert int(tokens[0, end]) == int(out.logits[0, -1].argmax())


def test_latent_layer_out_of_range(gpt2, workspace, tmp_path, capsys, monkeypatch):
    tokenizer, model, ids, _ = gpt2
    with pytest.raises(ValueError, match="out of range"):
        wrap(model, tokenizer, ids, latent_layer=3)
    root, model_dir = workspace
    config = write_config(tmp_path, model_dir, "deep", train_path=str(root / "train.json"), val_path=str(root / "valid.json"),
                          save_path=str(tmp_path / "runs"), latent_layer=-4)
    with pytest.raises(UserError, match="key 'latent_layer' with model_id .*hidden states -3 .. 2"):
        build.build_model(load_config(config))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert cli.main([config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_projection_run_saves_resumes_and_guards_its_weights(workspace, tmp_path, monkeypatch, capsys):
    root, model_dir = workspace
    paths = dict(train_path=str(root / "train.json"), val_path=str(root / "valid.json"), save_path=str(tmp_path / "runs"))
    config = write_config(tmp_path, model_dir, "proj", num_epochs=2, max_latent_stage=1, latent_projection=True, latent_norm="rms",
                          batch_size_eval=5, **paths)
    done = run_cli([config], tmp_path, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoints(tmp_path, "proj") == ["checkpoint_1", "checkpoint_2"]
    state = torch.load(tmp_path / "runs" / "proj" / "checkpoint_2", weights_only=True)
    width = state["latent_projection.weight"].shape[0]
    assert not torch.equal(state["latent_projection.weight"], torch.eye(width))  # it trained (stage 1 has latents)

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert cli.main([config, "num_epochs=3"]) == 0  # resumes, optimizer state of the projection included
    assert "resuming from checkpoint_2" in capsys.readouterr().out
    assert checkpoints(tmp_path, "proj")[-1] == "checkpoint_3"

    # without latent_projection the trained map would be dropped: refused in one line
    checkpoint = tmp_path / "runs" / "proj" / "checkpoint_3"
    assert cli.main([config, "name=plain", "latent_projection=false", f"load_model_path={checkpoint}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("holds latent_projection weights but latent_projection is off") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "runs" / "plain").exists()

"""The fast path (Coconut.use_fast_path) pinned to the eager path on CPU: the
latent passes with a mask built once and no host sync, generation on a
static cache, and the compiled kernels (Inductor's C++ backend here, CUDA
graphs on a GPU) to floating-point tolerance with equal greedy tokens.

python -m pytest -q tests/test_fast_path.py
"""

import copy

import pytest
import torch
from helpers import ARCHS, eval_prompts, mixed_batch, pick_eos, setup_model

from coconut import Coconut, fast_path_unsupported
from dataset import MyCollator


def pair(model, ids, eos, **variant):
    """(eager Coconut, fast Coconut without compiling) over two copies of one model."""
    eager = Coconut(model, ids[1], ids[0], ids[2], eos, **variant)
    fast = Coconut(copy.deepcopy(model), ids[1], ids[0], ids[2], eos, **variant)
    fast.load_state_dict(eager.state_dict())  # the same latent_projection, if any
    fast.use_fast_path(compile=False)
    return eager, fast


def assert_same_training_pass(eager, fast, batch, rtol=1.3e-6, atol=1e-5):
    inputs = {k: v for k, v in batch.items() if k != "idx"}
    out_eager, out_fast = eager(**inputs), fast(**inputs)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out_fast.loss, out_eager.loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(out_fast.logits[real], out_eager.logits[real], rtol=rtol, atol=atol)
    torch.testing.assert_close(out_fast.inputs_embeds, out_eager.inputs_embeds, rtol=rtol, atol=atol)
    assert fast.gen_forward_cnt == eager.gen_forward_cnt
    out_eager.loss.backward()
    out_fast.loss.backward()
    fast_params = dict(fast.named_parameters())
    for name, param in eager.named_parameters():
        torch.testing.assert_close(fast_params[name].grad, param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_training_pass_matches_eager(arch, model_dirs, tmp_path):
    tokenizer, model, ids = setup_model(model_dirs[arch])
    batch = mixed_batch(tokenizer, ids, tmp_path)  # rows with 0, 2, 4 and 6 latents
    assert_same_training_pass(*pair(model, ids, tokenizer.eos_token_id), batch)


def test_fast_training_pass_with_feedback_variants(model_dirs, tmp_path):
    tokenizer, model, ids = setup_model(model_dirs["gpt2"])
    batch = mixed_batch(tokenizer, ids, tmp_path)
    variant = dict(latent_layer=-2, latent_norm="rms", latent_projection=True)
    eager, fast = pair(model, ids, tokenizer.eos_token_id, **variant)
    with torch.no_grad():  # a projection that is not the identity
        eager.latent_projection.weight.add_(0.01 * torch.randn_like(eager.latent_projection.weight))
        fast.latent_projection.weight.copy_(eager.latent_projection.weight)
    assert_same_training_pass(eager, fast, batch)


def test_fast_pass_refuses_unaligned_latents(model_dirs):
    tokenizer, model, ids = setup_model(model_dirs["gpt2"])
    _, fast = pair(model, ids, tokenizer.eos_token_id)
    input_ids = torch.tensor([[5, 6, ids[1], 7, 8], [5, 6, 7, ids[1], 8]])
    with pytest.raises(ValueError, match="aligned"):
        fast(input_ids, torch.ones_like(input_ids), input_ids, torch.arange(5).expand(2, 5))


@pytest.mark.parametrize("arch", ARCHS)
def test_static_cache_generation_matches_eager_token_for_token(arch, model_dirs, data_dir):
    tokenizer, model, ids = setup_model(model_dirs[arch])
    collator = MyCollator(tokenizer, latent_id=ids[1])
    prompts = list(eval_prompts(tokenizer, ids, data_dir, stage=2))  # 0 to 2 latents, padding both sides
    eager, fast = pair(model, ids, tokenizer.eos_token_id)
    eager.eos_token_id = fast.eos_token_id = pick_eos(eager, prompts, collator)

    alone = []
    for p in prompts:
        batch = collator([p])
        out = eager.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=10)
        assert torch.equal(fast.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=10), out)
        assert fast.gen_forward_cnt == eager.gen_forward_cnt
        alone.append(out[0].tolist())
    assert len({len(a) for a in alone}) > 1  # rows stopped at different steps

    batch = collator(prompts)
    together = fast.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=10)
    assert [t.tolist() for t in together] == alone
    tokens, embeds = fast.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=10, output_embedding=True)
    _, eager_embeds = eager.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=10, output_embedding=True)
    for a, b in zip(embeds, eager_embeds):
        torch.testing.assert_close(a, b)


def test_static_caches_are_reused_per_shape(model_dirs, data_dir):
    tokenizer, model, ids = setup_model(model_dirs["gpt2"])
    collator = MyCollator(tokenizer, latent_id=ids[1])
    prompts = list(eval_prompts(tokenizer, ids, data_dir, stage=2))
    _, fast = pair(model, ids, tokenizer.eos_token_id)
    batch = collator(prompts[:4])
    first = fast.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6)
    caches = list(fast._static_caches.values())
    again = fast.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6)
    assert [t.tolist() for t in again] == [t.tolist() for t in first]  # the reused cache was reset
    assert list(fast._static_caches.values()) == caches and len(caches) == 1
    for n in (3, 2, 1):  # other batch sizes: other caches, at most two kept
        batch = collator(prompts[:n])
        fast.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6)
    assert len(fast._static_caches) == 2 and caches[0] not in fast._static_caches.values()


def test_fast_path_refuses_models_it_does_not_support(model_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"], attn_implementation="eager")
    assert "sdpa" in fast_path_unsupported(model)
    coconut = Coconut(model, 0, 1, 2, 3)
    with pytest.raises(ValueError, match="sdpa"):
        coconut.use_fast_path()
    assert not coconut.fast
    assert fast_path_unsupported(AutoModelForCausalLM.from_pretrained(model_dirs["llama"])) is None


@pytest.mark.slow
def test_compiled_fast_path_matches_eager(model_dirs, data_dir, tmp_path):
    """Inductor-compiled training passes and decoding step: the same values to
    tolerance, the same greedy tokens (one compilation each, about a minute)."""
    from torch._dynamo.utils import counters

    tokenizer, model, ids = setup_model(model_dirs["gpt2"])
    eager, fast = pair(model, ids, tokenizer.eos_token_id)
    fast.use_fast_path(compile=True)
    graphs = counters["stats"]["unique_graphs"]
    assert_same_training_pass(eager, fast, mixed_batch(tokenizer, ids, tmp_path), rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] > graphs  # the passes did run compiled
    graphs = counters["stats"]["unique_graphs"]

    collator = MyCollator(tokenizer, latent_id=ids[1])
    prompts = list(eval_prompts(tokenizer, ids, data_dir, stage=2))
    batch = collator(prompts)
    expected = eager.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=8)
    got = fast.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=8)
    assert [t.tolist() for t in got] == [t.tolist() for t in expected]
    assert counters["stats"]["unique_graphs"] > graphs  # and so did the decoding step

    # single prompts of other widths and latent counts: after the first, the
    # same compiled step serves them all (no compilation per prompt)
    singles = [collator([p]) for p in prompts if ids[1] in p["input_ids"]][:3]
    assert len({b["input_ids"].shape[1] for b in singles}) > 1
    for i, single in enumerate(singles):
        expected = eager.generate(single["input_ids"], single["attention_mask"], max_new_tokens=8)
        assert torch.equal(fast.generate(single["input_ids"], single["attention_mask"], max_new_tokens=8), expected)
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs

"""The continuous-thought forward pass and generation (docs/behaviour.md sections 5, 6),
pinned against naive references: latents filled one at a time with a full
recomputation each time (helpers.naive_forward), and greedy decoding without
a cache (written here).

python -m pytest -q tests/test_coconut.py
"""

import copy

import pytest
import torch
from helpers import ARCHS, eval_prompts, mixed_batch, naive_forward, pick_eos, setup_model

from coconut import MAX_N_LATENT, Coconut
from dataset import MyCollator


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_naive_reference(arch, model_dirs, tmp_path):
    tokenizer, model, ids = setup_model(model_dirs[arch])
    batch = mixed_batch(tokenizer, ids, tmp_path)
    counts = (batch["input_ids"] == ids[1]).sum(1).tolist()
    assert sorted(counts) == [0, 2, 4, 6]  # rows of different latent counts and one with none

    reference = copy.deepcopy(model)
    coconut = Coconut(model, ids[1], ids[0], ids[2], tokenizer.eos_token_id)
    out = coconut(**{k: v for k, v in batch.items() if k != "idx"})
    ref_loss, ref_logits, ref_embeds = naive_forward(reference, batch, ids[1])

    real = batch["attention_mask"].bool()
    assert out.logits.shape == ref_logits.shape
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[real], ref_logits[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.inputs_embeds, ref_embeds, rtol=1e-4, atol=1e-5)

    out.loss.backward()
    ref_loss.backward()
    ref_params = dict(reference.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        ref_grad = ref_params[name].grad
        assert (param.grad is None) == (ref_grad is None), name
        if param.grad is not None:
            torch.testing.assert_close(param.grad, ref_grad, rtol=1e-4, atol=1e-6, msg=name)
            checked += 1
    assert checked == len(ref_params)


def test_no_latents_is_one_plain_pass(model_dirs, tmp_path):
    tokenizer, model, ids = setup_model(model_dirs["gpt2"])
    batch = mixed_batch(tokenizer, ids, tmp_path, stages=(0, 0))
    coconut = Coconut(model, ids[1], ids[0], ids[2], tokenizer.eos_token_id)
    out = coconut(**{k: v for k, v in batch.items() if k != "idx"})
    plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    torch.testing.assert_close(out.logits, plain.logits)
    assert coconut.gen_forward_cnt == 1


def test_min_passes_adds_calls_but_nothing_to_loss_or_gradients(model_dirs, tmp_path):
    """Sharded training pads every forward to the stage's widest sequence:
    the extra base-model calls leave the loss and every gradient exactly as
    they were."""
    tokenizer, model, ids = setup_model(model_dirs["gpt2"])
    batch = mixed_batch(tokenizer, ids, tmp_path, stages=(0, 1))  # 2 latents: 3 calls
    inputs = {k: v for k, v in batch.items() if k != "idx"}
    coconut = Coconut(model, ids[1], ids[0], ids[2], tokenizer.eos_token_id)
    results = {}
    for min_passes in (0, 6):
        coconut.zero_grad(set_to_none=True)
        coconut.gen_forward_cnt = 0
        out = coconut(**inputs, min_passes=min_passes)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in coconut.named_parameters() if p.grad is not None}
        results[min_passes] = (out.loss.detach(), out.logits.detach(), grads, coconut.gen_forward_cnt)
    (loss, logits, grads, calls), (padded_loss, padded_logits, padded_grads, padded_calls) = results[0], results[6]
    assert calls == 3 and padded_calls == 7
    assert torch.equal(padded_loss, loss) and torch.equal(padded_logits, logits)
    assert grads.keys() == padded_grads.keys() and all(torch.equal(padded_grads[k], grads[k]) for k in grads)


def test_unaligned_latents_are_refused(model_dirs):
    tokenizer, model, ids = setup_model(model_dirs["gpt2"])
    coconut = Coconut(model, ids[1], ids[0], ids[2], tokenizer.eos_token_id)
    input_ids = torch.tensor([[5, 6, ids[1], 7, 8], [5, 6, 7, ids[1], 8]])
    with pytest.raises(ValueError, match="aligned"):
        coconut(input_ids, torch.ones_like(input_ids), input_ids, torch.arange(5).expand(2, 5))


# ------------------------------------------------------------------ generation
def naive_generate(coconut, input_ids, max_new_tokens, eos):
    """Reference decoding for one row: the prompt through the naive latent
    fill, then full recomputation for every new token."""
    base = coconut.base_causallm
    batch = {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
        "position_ids": torch.arange(input_ids.shape[1])[None], "labels": input_ids,
    }
    with torch.no_grad():
        _, logits, embeds = naive_forward(base, batch, coconut.latent_token_id)
        tokens = input_ids[0].tolist()
        next_token = int(logits[0, -1].argmax())
        tokens.append(next_token)
        for _ in range(max_new_tokens - 1):
            embeds = torch.cat([embeds, base.get_input_embeddings()(torch.tensor([[next_token]]))], dim=1)
            next_token = int(base(inputs_embeds=embeds).logits[0, -1].argmax())
            if next_token == eos:
                break
            tokens.append(next_token)
    return tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_matches_naive_greedy_and_batches_agree(arch, model_dirs, data_dir):
    tokenizer, model, ids = setup_model(model_dirs[arch])
    collator = MyCollator(tokenizer, latent_id=ids[1])
    # pad_latent_to_max off: rows get 0..2 latents, so prompt lengths differ
    prompts = list(eval_prompts(tokenizer, ids, data_dir, stage=2))
    coconut = Coconut(model, ids[1], ids[0], ids[2], tokenizer.eos_token_id)
    coconut.eos_token_id = pick_eos(coconut, prompts, collator)

    alone = []
    for p in prompts:
        batch = collator([p])
        out = coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=10)
        assert out.shape[0] == 1 and out.dim() == 2
        assert out[0].tolist() == naive_generate(coconut, batch["input_ids"], 10, coconut.eos_token_id)
        alone.append(out[0].tolist())
    assert len({len(a) - len(p["input_ids"]) for a, p in zip(alone, prompts)}) > 1  # rows stopped at different steps

    batch = collator(prompts)
    assert batch["attention_mask"].eq(0).any()  # padding on the left and/or right
    together = coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=10)
    assert [t.tolist() for t in together] == alone


def test_generate_synced_call_count_and_embeddings(model_dirs, data_dir):
    tokenizer, model, ids = setup_model(model_dirs["gpt2"])
    collator = MyCollator(tokenizer, latent_id=ids[1])
    prompt = next(p for p in eval_prompts(tokenizer, ids, data_dir, stage=2) if ids[1] in p["input_ids"])
    batch = collator([prompt])
    coconut = Coconut(model, ids[1], ids[0], ids[2], tokenizer.eos_token_id)
    tokens = coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=5, synced_gpus=True)
    assert coconut.gen_forward_cnt == 5 + MAX_N_LATENT
    tokens2, embeds = coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=5, output_embedding=True)
    assert torch.equal(tokens, tokens2)
    assert embeds.shape == (1, tokens.shape[1], model.config.n_embd)
    n_prompt = batch["input_ids"].shape[1]
    # new-token rows are plain embeddings; latent rows hold hidden states
    torch.testing.assert_close(embeds[0, n_prompt:], model.get_input_embeddings()(tokens[0, n_prompt:]))
    latent_rows = batch["input_ids"][0] == ids[1]
    assert latent_rows.any()
    assert not torch.allclose(embeds[0, : n_prompt][latent_rows], model.get_input_embeddings()(batch["input_ids"][0][latent_rows]))


def test_synced_generation_stops_when_every_rank_is_done(model_dirs, data_dir):
    tokenizer, model, ids = setup_model(model_dirs["gpt2"])
    collator = MyCollator(tokenizer, latent_id=ids[1])
    prompt = next(p for p in eval_prompts(tokenizer, ids, data_dir, stage=2) if p["input_ids"].count(ids[1]) == 2)
    batch = collator([prompt])
    coconut = Coconut(model, ids[1], ids[0], ids[2], tokenizer.eos_token_id)
    free = coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=12)
    n_prompt = batch["input_ids"].shape[1]
    coconut.eos_token_id = int(free[0, n_prompt + 1])  # this rank stops after one decoding call
    alone = coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=12)
    assert coconut.gen_forward_cnt == 3 + 1  # 2 latents: 3 passes, then one call meets eos

    asked = []

    def rank_max(value):
        """Another rank with 4 latents (5 passes) that stays alive for 3 more tokens."""
        asked.append(value)
        other = 5 if len(asked) == 1 else int(len(asked) <= 4)
        return max(value, other)

    synced = coconut.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=12, synced_gpus=True, rank_max=rank_max)
    assert torch.equal(synced, alone)
    assert asked[0] == 3 and coconut.gen_forward_cnt == 5 + 3  # stopped with the other rank, not at 12 + MAX_N_LATENT

"""Tokenisation, stage layouts and the collator (docs/behaviour.md sections 2 to 4).

python -m pytest -q tests/test_dataset.py
"""

import json

import pytest
import torch
from helpers import load_tokenizer_and_model

from dataset import MyCollator, get_cot_latent_dataset, get_dataset, get_question_latent_dataset
from utils import Config, UserError

START, LATENT, END = 1001, 1002, 1003
SAMPLE = {"question": "Tom has 3 apples?", "steps": ["<<3+4=7>>", "<<7+1=8>>", "<<8+2=10>>"], "answer": "10"}


@pytest.fixture(scope="module")
def tokenizers(model_dirs):
    return {arch: load_tokenizer_and_model(folder)[0] for arch, folder in model_dirs.items() if arch in ("gpt2", "llama")}


def write(tmp_path, data, name="d.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def cfg(**kw):
    base = dict(c_thought=1, max_latent_stage=2, pad_latent_to_max=False, uniform_prob=0.0, no_cot=False)
    return Config({**base, **kw})


def fake_sample(n_steps=3, idx=0):
    """Pre-tokenised sample with recognisable ids: question 10.., steps 20.., answer 90."""
    return {
        "question_tokenized": [10, 11],
        "steps_tokenized": [[20 + i, 20 + i] for i in range(n_steps)],
        "answer_tokenized": [90, 0],
        "idx": idx,
    }


# ------------------------------------------------------------- tokenisation
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_get_dataset_pieces(arch, tokenizers, tmp_path):
    tok = tokenizers[arch]
    other = dict(SAMPLE, question="Second?", steps=["<<1+1=2>>"], answer="2", edges=[[0, 1]])
    ds = get_dataset(write(tmp_path, [SAMPLE, other]), tok)
    first = ds[0]
    assert first["question_tokenized"] == tok.encode(SAMPLE["question"] + "\n")  # special tokens added
    if arch == "llama":
        assert first["question_tokenized"][0] == tok.bos_token_id
    assert first["steps_tokenized"] == [tok.encode(s + "\n", add_special_tokens=False) for s in SAMPLE["steps"]]
    assert first["answer_tokenized"] == tok.encode("### 10", add_special_tokens=False) + [tok.eos_token_id]
    assert [s["idx"] for s in ds] == [0, 1]
    assert len(get_dataset(write(tmp_path, [SAMPLE, other]), tok, max_size=1)) == 1


def test_boundary_merge_is_an_error(tmp_path):
    class MergingTokenizer:
        """Characters as ids, except that "\\n#" is one token."""

        eos_token_id = 0

        def encode(self, text, add_special_tokens=True):
            return [1000 if part == "\n#" else ord(part) for part in self._split(text)]

        @staticmethod
        def _split(text):
            out, i = [], 0
            while i < len(text):
                step = 2 if text[i : i + 2] == "\n#" else 1
                out.append(text[i : i + step])
                i += step
            return out

        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [self.encode(t) for t in texts]}

    with pytest.raises(UserError, match="sample 0: tokenizer merges"):
        get_dataset(write(tmp_path, [SAMPLE]), MergingTokenizer())


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "data file not found"),
        ("{not json", "not valid JSON"),
        ({"question": "q"}, "expected a JSON list"),
        ([], "holds no samples"),
        ([SAMPLE, {"question": "q", "answer": "a"}], "sample 1: missing key 'steps'"),
        ([{"question": 3, "answer": "a", "steps": []}], "sample 0: 'question' must be a string"),
        ([{"question": "q", "answer": "a", "steps": "s"}], "sample 0: 'steps' must be a list of strings"),
        ([{"question": "q", "answer": 7, "steps": []}], "sample 0: 'answer' must be a string"),
        (["text"], "sample 0: expected an object"),
    ],
)
def test_bad_data_files(content, message, tmp_path, tokenizers):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(UserError, match=message) as err:
        get_dataset(str(path), tokenizers["gpt2"])
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------ stage layouts
def layout(stage, config, n_steps=3, markers=True):
    row = get_cot_latent_dataset(stage, [fake_sample(n_steps)], config, START, LATENT, END, no_special_marker=not markers)[0]
    return row["input_ids"], row["labels"]


def test_stage_zero_and_one():
    ids, labels = layout(0, cfg())
    assert ids == [10, 11, START, END, 20, 20, 21, 21, 22, 22, 90, 0]
    assert labels == [-100] * 4 + ids[4:]
    ids, labels = layout(1, cfg(c_thought=2))
    assert ids == [10, 11, START, LATENT, LATENT, END, 21, 21, 22, 22, 90, 0]
    assert labels == [-100] * 6 + ids[6:]


def test_beyond_max_stage_removes_all_steps_both_padding_ways():
    ids, _ = layout(5, cfg(max_latent_stage=2, pad_latent_to_max=True), n_steps=1)
    assert ids == [10, 11, START, LATENT, LATENT, END, 90, 0]
    ids, _ = layout(5, cfg(max_latent_stage=2, pad_latent_to_max=False), n_steps=1)
    assert ids == [10, 11, START, LATENT, END, 90, 0]


def test_slots_are_not_capped_by_step_count():
    ids, _ = layout(5, cfg(max_latent_stage=6), n_steps=3)
    assert ids.count(LATENT) == 5 and ids[-2:] == [90, 0] and 20 not in ids


def test_no_cot_and_no_marker_layouts():
    ids, labels = layout(2, cfg(no_cot=True), markers=False)
    assert ids == [10, 11, 90, 0] and labels == [-100, -100, 90, 0]
    ids, labels = layout(1, cfg(c_thought=0), markers=False)
    assert ids == [10, 11, 21, 21, 22, 22, 90, 0] and labels[:2] == [-100, -100]


def test_row_fields():
    row = get_cot_latent_dataset(1, [fake_sample(idx=7)], cfg(), START, LATENT, END)[0]
    n = len(row["input_ids"])
    assert row["attention_mask"] == [1] * n and row["position_ids"] == list(range(n)) and row["idx"] == 7


def test_uniform_prob_draws_stages_per_sample_and_is_seeded():
    samples = [fake_sample(3, idx=i) for i in range(200)]
    config = cfg(uniform_prob=1.0, max_latent_stage=6)
    rows = get_cot_latent_dataset(0, samples, config, START, LATENT, END, seed=3)
    stages = {r["input_ids"].count(LATENT) for r in rows}
    assert stages == {0, 1, 2, 3}  # uniform over 0 .. len(steps)
    again = get_cot_latent_dataset(0, samples, config, START, LATENT, END, seed=3)
    assert [r["input_ids"] for r in rows] == [r["input_ids"] for r in again]
    none = get_cot_latent_dataset(2, samples, cfg(uniform_prob=0.0), START, LATENT, END, seed=3)
    assert {r["input_ids"].count(LATENT) for r in none} == {2}


def test_shuffle_redraws_order_deterministically():
    samples = [fake_sample(idx=i) for i in range(50)]
    order = lambda seed: [r["idx"] for r in get_cot_latent_dataset(0, samples, cfg(), START, LATENT, END, shuffle=True, seed=seed)]
    assert order(1) == order(1) and order(1) != order(2) and sorted(order(1)) == list(range(50))
    assert [r["idx"] for r in get_cot_latent_dataset(0, samples, cfg(), START, LATENT, END)] == list(range(50))


@pytest.mark.parametrize("pad, expected", [(True, [2, 2, 2]), (False, [2, 1, 0])])
def test_question_prompts(pad, expected):
    samples = [fake_sample(3), fake_sample(1), fake_sample(0)]
    rows = get_question_latent_dataset(2, samples, cfg(max_latent_stage=4, pad_latent_to_max=pad, c_thought=1), START, LATENT, END)
    assert [r["input_ids"].count(LATENT) for r in rows] == expected
    assert rows[0]["input_ids"] == [10, 11, START, LATENT, LATENT, END]
    assert rows[0]["position_ids"] == list(range(6))
    capped = get_question_latent_dataset(5, samples, cfg(max_latent_stage=3, pad_latent_to_max=True, c_thought=2), START, LATENT, END)
    assert capped[0]["input_ids"].count(LATENT) == 6
    plain = get_question_latent_dataset(0, samples, cfg(), START, LATENT, END, no_special_marker=True)
    assert plain[0]["input_ids"] == [10, 11]


# ------------------------------------------------------------------ collator
class PadTokenizer:
    pad_token_id = 0


def test_collator_aligns_first_latents_and_pads_right():
    a = {"input_ids": [5, 6, 7, LATENT, LATENT, 8], "labels": [-100] * 5 + [8]}
    b = {"input_ids": [5, LATENT, 8, 9], "labels": [-100, -100, 8, 9]}
    c = {"input_ids": [5, 6], "labels": [5, 6]}  # no latents: not shifted
    for i, f in enumerate((a, b, c)):
        n = len(f["input_ids"])
        f.update(attention_mask=[1] * n, position_ids=list(range(n)), idx=i)
    before = json.dumps([a, b, c])
    batch = MyCollator(PadTokenizer(), latent_id=LATENT)([a, b, c])
    assert json.dumps([a, b, c]) == before  # features are not mutated
    assert batch["input_ids"].tolist() == [[5, 6, 7, LATENT, LATENT, 8], [0, 0, 5, LATENT, 8, 9], [5, 6, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100] * 5 + [8], [-100, -100, -100, -100, 8, 9], [5, 6, -100, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3], [0, 1, 0, 0, 0, 0]]
    assert batch["idx"].tolist() == [0, 1, 2] and batch["idx"].dim() == 1
    assert all(v.dtype == torch.long for v in batch.values())


def test_collator_without_latents_or_labels():
    rows = [{"input_ids": [3, 4, 5], "attention_mask": [1] * 3, "position_ids": [0, 1, 2], "idx": 0},
            {"input_ids": [3], "attention_mask": [1], "position_ids": [0], "idx": 1}]
    batch = MyCollator(PadTokenizer(), latent_id=LATENT)(rows)
    assert "labels" not in batch
    assert batch["input_ids"].tolist() == [[3, 4, 5], [3, 0, 0]]


class CountingTokenizer:
    """Passes through to a fast tokenizer, counting backend batch calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        counter = self

        class Backend:
            def encode_batch(self, texts, add_special_tokens):
                counter.calls += 1
                return inner.backend_tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)

            def to_str(self):
                return inner.backend_tokenizer.to_str()

        self.backend_tokenizer = Backend()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_tokenisation_is_cached_by_datasets(tokenizers, tmp_path):
    """The ids live in datasets' cache (HF_DATASETS_CACHE, a temp folder in
    the tests), keyed by the file's fingerprint and the exact tokenizer."""
    path = write(tmp_path, [SAMPLE, dict(SAMPLE, question="Other?")])
    tok = CountingTokenizer(tokenizers["gpt2"])
    first = list(get_dataset(path, tok))
    assert tok.calls == 3  # questions, answers, steps: one batch each
    again = get_dataset(path, tok)
    assert list(again) == first and tok.calls == 3  # read back, not tokenised
    assert again.table.cache_files  # memory-mapped from the cache on disk
    assert len(get_dataset(path, tok, max_size=1)) == 1 and tok.calls == 6  # another size, another entry
    assert len(get_dataset(path, tok, max_size=1)) == 1 and tok.calls == 6
    write(tmp_path, [SAMPLE])  # the file changes: its cache entry no longer applies
    assert len(get_dataset(path, tok)) == 1 and tok.calls == 9
    from transformers import AutoTokenizer

    other = CountingTokenizer(AutoTokenizer.from_pretrained(tokenizers["gpt2"].name_or_path))
    other.inner.add_tokens(["<|extra|>"])  # another tokenizer: tokenised again
    get_dataset(path, other)
    assert other.calls == 3

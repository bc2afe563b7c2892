"""Data: reading and tokenising the JSON files, the per-stage sequence layouts
of the curriculum, and the batch collator (SPEC sections 2 to 4).

Never imports the model. Samples are plain dicts of Python int lists; a
dataset is a list of them behind the torch Dataset interface.
"""

import hashlib
import itertools
import json
import os
import random
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from utils import UserError, is_main_process


class SampleList(torch.utils.data.Dataset):
    """A list of sample dicts, indexable by the DataLoader."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]

    def __iter__(self):
        return iter(self.samples)


_last_loaded = {}  # (path, size, mtime) -> samples: run.py checks a file early, then tokenises it


def load_samples(path):
    """Read a data file and check every sample's keys and types (once per
    file version; the result is shared, so callers must not modify it)."""
    try:
        stat = os.stat(path)
    except OSError:
        raise UserError(f"{path}: data file not found") from None
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _last_loaded:
        samples = read_and_check(path)
        _last_loaded.clear()  # keep one file: a large train set is not held twice
        _last_loaded[key] = samples
    return _last_loaded[key]


def read_and_check(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: data file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    if not data:
        raise UserError(f"{path}: holds no samples")
    for index, sample in enumerate(data):
        problem = sample_problem(sample)
        if problem:
            raise UserError(f"{path}: sample {index}: {problem}")
    return data


def sample_problem(sample):
    if not isinstance(sample, dict):
        return f"expected an object, got {type(sample).__name__}"
    for key in ("question", "answer", "steps"):
        if key not in sample:
            return f"missing key '{key}'"
    for key in ("question", "answer"):
        if not isinstance(sample[key], str):
            return f"'{key}' must be a string, got {type(sample[key]).__name__}"
    steps = sample["steps"]
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        return "'steps' must be a list of strings"
    return None


def get_dataset(path, tokenizer, max_size=1000000000):
    """Tokenise a data file: question (+ "\\n", special tokens), each step
    (+ "\\n"), answer ("### " + answer, then eos), and the sample index.
    The token ids are kept in an on-disk cache keyed by the file and the
    tokenizer, so a restart (or every rank of a launch) tokenises once."""
    data = load_samples(path)[:max_size]
    cache = cache_path(path, tokenizer, len(data))
    tokens = cached = read_cache(cache)
    if tokens is None:
        texts = (
            [d["question"] + "\n" for d in data],
            ["### " + d["answer"] for d in data],
            [s + "\n" for d in data for s in d["steps"]],
        )
        total = sum(map(len, texts))
        desc = f"Tokenizing {os.path.basename(path)}"
        with tqdm(total=total, desc=desc, unit="text", disable=not is_main_process(), dynamic_ncols=True) as bar:
            tokens = tuple(encode_all(tokenizer, part, special=i == 0, bar=bar) for i, part in enumerate(texts))
    questions, answers, flat_steps = tokens
    bounds = list(itertools.accumulate([len(d["steps"]) for d in data], initial=0))
    eos = tokenizer.eos_token_id
    samples = [
        {
            "question_tokenized": questions[i],
            "steps_tokenized": flat_steps[bounds[i] : bounds[i + 1]],
            "answer_tokenized": answers[i] + [eos],
            "idx": i,
        }
        for i in range(len(data))
    ]
    check_token_boundaries(path, data[0], samples[0], tokenizer)
    if cached is None:
        write_cache(cache, tokens)
    return SampleList(samples)


def cache_path(path, tokenizer, n_samples):
    """Cache file for this data file's content and this exact tokenizer
    (its whole serialised form, added tokens included); None when caching
    is off (COCONUT_CACHE=off) or the tokenizer cannot be fingerprinted."""
    root = os.environ.get("COCONUT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "coconut"))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if root == "off" or backend is None:
        return None
    stat = os.stat(path)
    key = hashlib.sha256()
    for part in (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, n_samples, backend.to_str()):
        key.update(str(part).encode() + b"\0")
    return os.path.join(root, "tokens-" + key.hexdigest()[:32] + ".npz")


CACHE_PARTS = ("questions", "answers", "steps")


def read_cache(cache):
    """The cached (questions, answers, steps) id lists, or None. The file is
    plain arrays (NumPy's .npz, read without pickle), so a cache folder from
    elsewhere cannot run code."""
    if cache is None or not os.path.exists(cache):
        return None
    try:
        with np.load(cache, allow_pickle=False) as arrays:
            return tuple(split_ids(arrays[f"{name}_ids"], arrays[f"{name}_offsets"]) for name in CACHE_PARTS)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # unreadable: tokenise again


def split_ids(ids, offsets):
    ids, offsets = ids.tolist(), offsets.tolist()
    return [ids[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def write_cache(cache, tokens):
    if cache is None:
        return
    arrays = {}
    for name, lists in zip(CACHE_PARTS, tokens):
        arrays[f"{name}_offsets"] = np.array(list(itertools.accumulate(map(len, lists), initial=0)), dtype=np.int64)
        arrays[f"{name}_ids"] = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32)
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        temporary = f"{cache}.{os.getpid()}.tmp"  # ranks may race: each renames its own file
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
        os.replace(temporary, cache)
    except OSError:
        pass  # a read-only home only costs the next run a re-tokenisation


def encode_all(tokenizer, texts, special, bar=None, chunk=50000):
    """Token ids of many texts, in batched calls of `chunk` texts (advancing
    the progress `bar`). A fast tokenizer's Rust backend is called directly:
    the same ids, without building the BatchEncoding that costs most of the
    time for GSM8K's 1.3M steps."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ids = []
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        if backend is not None:
            ids += [e.ids for e in backend.encode_batch(part, add_special_tokens=special)]
        else:
            ids += tokenizer(part, add_special_tokens=special)["input_ids"]
        if bar is not None:
            bar.update(len(part))
    return ids


def check_token_boundaries(path, raw, sample, tokenizer):
    """The pieces must tokenise like the whole text, or removing steps would
    change the tokens around them."""
    # the SPEC's question + "\n" + "\n".join(steps) + "\n### " + answer, written
    # so that a sample with no steps does not gain a stray "\n"
    whole = raw["question"] + "\n" + "".join(s + "\n" for s in raw["steps"]) + "### " + raw["answer"]
    expected = tokenizer.encode(whole) + [tokenizer.eos_token_id]
    pieces = (
        sample["question_tokenized"]
        + list(itertools.chain.from_iterable(sample["steps_tokenized"]))
        + sample["answer_tokenized"]
    )
    if pieces != expected:
        raise UserError(
            f"{path}: sample 0: tokenizer merges tokens across the question/step/answer "
            "boundaries, so stage layouts would be wrong"
        )


def _sequence(prefix, n_latent, markers, start_id, latent_id, end_id):
    if not markers:
        return prefix + [latent_id] * n_latent
    return prefix + [start_id] + [latent_id] * n_latent + [end_id]


def _with_masks(sample, input_ids, **extra):
    return {
        "input_ids": input_ids,
        **extra,
        "attention_mask": [1] * len(input_ids),
        "idx": sample["idx"],
        "position_ids": list(range(len(input_ids))),
    }


def get_question_latent_dataset(
    scheduled_stage, base_dataset_valid, configs, start_id, latent_id, end_id, no_special_marker=False
):
    """Evaluation prompts at a stage: question, [start], latents, [end]."""

    def prompt(sample):
        cap = configs.max_latent_stage
        if not configs.pad_latent_to_max:
            cap = min(cap, len(sample["steps_tokenized"]))
        n_latent = min(cap, scheduled_stage) * configs.c_thought
        ids = _sequence(sample["question_tokenized"], n_latent, not no_special_marker, start_id, latent_id, end_id)
        return _with_masks(sample, ids)

    return SampleList([prompt(s) for s in base_dataset_valid])


def get_cot_latent_dataset(
    scheduled_stage,
    base_dataset,
    configs,
    start_id,
    latent_id,
    end_id,
    no_special_marker=False,
    shuffle=False,
    seed=None,
):
    """Training / validation-loss sequences at a stage (SPEC section 3).

    Building a stage only decides, per sample, how many steps are removed and
    how many latent tokens replace them; the sequences are laid out when the
    loader reads them. `seed` (an extension) makes the uniform_prob draws and
    the shuffle depend on it alone; None draws from the global `random`
    state as the reference.
    """
    rng = random.Random(seed) if seed is not None else random
    cap, pad, c_thought = configs.max_latent_stage, configs.pad_latent_to_max, configs.c_thought
    plans = []
    for position, sample in enumerate(base_dataset):
        n_steps = len(sample["steps_tokenized"])
        stage = scheduled_stage
        if configs.uniform_prob and rng.random() < configs.uniform_prob:
            stage = rng.choice(range(n_steps + 1))
        if configs.no_cot:
            n_skip, n_slots = n_steps, 0
        elif stage > cap:
            n_skip, n_slots = n_steps, (cap if pad else min(n_steps, cap))
        else:
            n_skip, n_slots = stage, stage  # deliberately not capped at n_steps
        plans.append((position, n_skip, n_slots * c_thought))
    if shuffle:
        rng.shuffle(plans)
    return StageSamples(base_dataset, plans, (start_id, latent_id, end_id), not no_special_marker)


class StageSamples(torch.utils.data.Dataset):
    """A stage's training sequences, each laid out when read from a plan
    (base position, steps removed, latent tokens)."""

    def __init__(self, base, plans, token_ids, markers):
        self.base, self.plans, self.token_ids, self.markers = base, plans, token_ids, markers

    def __len__(self):
        return len(self.plans)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index):
        position, n_skip, n_latent = self.plans[index]
        sample = self.base[position]
        prompt = _sequence(sample["question_tokenized"], n_latent, self.markers, *self.token_ids)
        rest = list(itertools.chain.from_iterable(sample["steps_tokenized"][n_skip:])) + sample["answer_tokenized"]
        return _with_masks(sample, prompt + rest, labels=[-100] * len(prompt) + rest)


class MyCollator:
    """Pads a list of samples into a batch (SPEC section 4): rows that hold a
    latent token are first left-padded so their first latents share a column,
    then every field is right-padded to the longest row."""

    def __init__(self, tokenizer, latent_id=None, label_pad_token_id=-100):
        self.tokenizer = tokenizer
        self.latent_id = latent_id
        self.label_pad_token_id = label_pad_token_id

    def _first_latent(self, ids):
        try:
            return ids.index(self.latent_id)
        except ValueError:
            return None

    def __call__(self, features):
        firsts = [self._first_latent(f["input_ids"]) for f in features]
        latest = max((c for c in firsts if c is not None), default=None)
        shifts = [0 if c is None else latest - c for c in firsts]
        width = max(s + len(f["input_ids"]) for s, f in zip(shifts, features))
        fills = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "position_ids": 0}
        if "labels" in features[0]:
            fills["labels"] = self.label_pad_token_id
        batch = {}
        for key, fill in fills.items():
            rows = []
            for shift, f in zip(shifts, features):
                n = len(f["input_ids"])
                values = f[key] if key != "position_ids" else range(n)
                rows.append([fill] * shift + list(values) + [fill] * (width - shift - n))
            batch[key] = torch.tensor(rows, dtype=torch.long)  # one conversion per field
        batch["idx"] = torch.tensor([f["idx"] for f in features], dtype=torch.long)
        return batch

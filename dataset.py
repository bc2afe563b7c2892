"""Data: reading a data source through HF `datasets` (a JSON file, a local
Arrow/Parquet folder or a hub dataset), tokenising it, the per-stage
sequence layouts of the curriculum and the curriculum's stage rule, and the
batch collator (docs/behaviour.md sections 2 to 4).

Never imports the model. A sample is a plain dict of Python int lists; the
tokenised samples stay in datasets' memory-mapped Arrow cache and are read a
row (or a batch of rows) at a time behind the torch Dataset interface.
"""

import contextlib
import itertools
import json
import logging
import os
import random
import re
import uuid

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets.fingerprint import Hasher

from utils import SAMPLE_FIELDS, UserError, is_main_process, one_line, parse_data_columns

# part of the token cache's key: change it whenever tokenise_batch changes
# what it writes, so that older cache entries no longer apply
TOKENISATION = "coconut-tokens-1"


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


class TokenizedSamples(SampleList):
    """get_dataset's samples: the rows of a datasets.Dataset, memory-mapped
    from datasets' cache (so every rank and loader worker shares one copy),
    each read as {"question_tokenized", "steps_tokenized",
    "answer_tokenized", "idx"}."""

    @property
    def table(self):
        return self.samples

    def __getitems__(self, indices):
        """Many rows in one read (the DataLoader asks for a batch at once)."""
        return self.table.__getitems__(list(indices))

    def __iter__(self):
        for columns in self.table.iter(batch_size=1000):
            yield from (dict(zip(columns, row)) for row in zip(*columns.values()))

    def step_counts(self):
        """Every sample's number of steps, read from the column at once."""
        steps = self.table.with_format("arrow")["steps_tokenized"]
        return pc.list_value_length(steps).to_pylist()


# ------------------------------------------------------------ data sources
def load_samples(path, columns="", data_format="coconut"):
    """The checked samples of a data source, as a datasets.Dataset whose rows
    hold question (str), answer (str) and steps (list of str), plus any other
    columns of the source. `columns` and `data_format` are the config keys
    data_columns and data_format (README: Data)."""
    renames = parse_columns(columns, path)
    with quiet_datasets(progress=False):  # seconds (8 for 385k samples): a bad file's error stays the only line
        table = with_fields(read_source(path), renames, path)
    with quiet_datasets():
        needed = ("question", "answer") if data_format == "gsm8k" else SAMPLE_FIELDS
        if not well_formed(table, needed, data_format):
            raise UserError(f"{path}: {first_problem(path, table, renames, needed, data_format)}")
        if data_format == "gsm8k":
            table = table.map(gsm8k_fields, batched=True, keep_in_memory=not cache_writable(table),
                              desc=f"Reading {display_name(path)} as GSM8K")
    return table


def parse_columns(columns, path):
    try:
        return parse_data_columns(columns)
    except ValueError as e:
        raise UserError(f"{path}: data_columns: {e}") from None


def display_name(path):
    return os.path.basename(path.rstrip("/")) or path


def read_source(path):
    """A data source's rows, read by datasets (and kept in its cache, under
    HF_DATASETS_CACHE, as memory-mapped Arrow):
    - a JSON file: a list of objects, the reference's format;
    - a folder written by Dataset.save_to_disk, or holding Arrow, Parquet or
      JSON files; FOLDER:SPLIT picks a split;
    - ID:SPLIT or ID:CONFIG:SPLIT: a HuggingFace hub dataset (openai/gsm8k:main:train).
    """
    if os.path.isfile(path):
        return read_json_file(path)
    if os.path.isdir(path):
        return read_folder(path, None, None, path)
    head, sep, split = path.rpartition(":")
    if not sep or not head or not split or path.endswith(".json"):
        hint = "" if path.endswith(".json") else " (a hub dataset is named ID:SPLIT)"
        raise UserError(f"{path}: data file not found{hint}")
    name, _, config = head.partition(":")
    return read_folder(name, config or None, split, path)


def read_json_file(path):
    with open(path, "rb") as f:
        opening = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not opening.startswith(b"["):  # datasets would read one object as one row
        raise UserError(f"{path}: {json_file_problem(path) or 'expected a JSON list of samples'}")
    try:
        return datasets.load_dataset("json", data_files=os.path.abspath(path), split="train")
    except Exception as e:  # datasets' many error types; the file's own problem is named below
        raise UserError(f"{path}: {json_file_problem(path) or one_line(e)}") from None


def json_file_problem(path):
    """What makes a file that datasets could not read unusable, in the
    reference's terms; None if it is a non-empty JSON list."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"not valid JSON ({e})"
    if not isinstance(data, list):
        return f"expected a JSON list of samples, got {type(data).__name__}"
    if not data:
        return "holds no samples"
    return None


def read_folder(name, config, split, path):
    """A saved dataset, a folder of data files or a hub dataset id, as one split."""
    try:
        if os.path.isdir(name) and is_saved_dataset(name):
            loaded = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # not found, no such split or config, hub unreachable, unreadable files
        raise UserError(f"{path}: cannot be read by datasets: {one_line(e)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None and len(loaded) == 1:
            (loaded,) = loaded.values()
        elif split in loaded:
            loaded = loaded[split]
        else:
            splits = ", ".join(loaded)
            what = f"has no split '{split}'" if split else "holds several splits"
            raise UserError(f"{path}: {what} (it has {splits}): name one as {name}:SPLIT")
    elif split is not None and is_saved_dataset(name):
        raise UserError(f"{path}: a saved single dataset has no splits: give the folder without ':{split}'")
    if len(loaded) == 0:
        raise UserError(f"{path}: holds no samples")
    return loaded


def is_saved_dataset(folder):
    return any(os.path.exists(os.path.join(folder, f)) for f in ("state.json", "dataset_dict.json"))


def with_fields(table, renames, path):
    """The source's columns renamed to the sample fields (data_columns); a
    column already holding a field's name gives way to the renamed one."""
    missing = [column for column in renames.values() if column not in table.column_names]
    if missing:
        raise UserError(f"{path}: data_columns names column '{missing[0]}', which the data does not have "
                        f"(its columns: {', '.join(table.column_names)})")
    renames = {column: field for field, column in renames.items() if column != field}
    replaced = [field for field in renames.values() if field in table.column_names and field not in renames]
    if replaced:
        table = table.remove_columns(replaced)
    return table.rename_columns(renames) if renames else table


def well_formed(table, needed, data_format):
    """Every needed column present with the right type and no missing values
    (a vectorised check; first_problem names the offending sample)."""
    schema = table.data.schema
    for field in needed:
        if field not in schema.names:
            return False
        kind = schema.field(field).type
        if field == "steps":
            if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not (
                pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type) or pa.types.is_null(kind.value_type)
            ):
                return False
            if pc.list_flatten(table.data.column(field)).null_count:
                return False
        elif not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            return False
        if table.data.column(field).null_count:
            return False
    if data_format == "gsm8k":
        return pc.all(pc.match_substring(table.data.column("answer"), "####")).as_py()
    return True


def first_problem(path, table, renames, needed, data_format):
    """The first sample that is not well formed, and what is wrong with it.
    A JSON file is read again as JSON, so the message speaks of the file's
    own keys and values (a table row reads a missing value as None)."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    else:
        rows, renames = table, {}  # its columns are renamed already
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            return f"sample {index}: expected an object, got {type(row).__name__}"
        sample = {field: row[renames.get(field, field)] for field in needed if renames.get(field, field) in row}
        problem = sample_problem(sample, needed) or (gsm8k_problem(sample) if data_format == "gsm8k" else None)
        if problem:
            return f"sample {index}: {problem}"
    return "cannot be read as samples of question, answer and steps"


def sample_problem(sample, needed=SAMPLE_FIELDS):
    """What is wrong with one sample (a dict), or None."""
    for key in needed:
        if key not in sample:
            return f"missing key '{key}'"
    for key in ("question", "answer"):
        if not isinstance(sample[key], str):
            return f"'{key}' must be a string, got {type(sample[key]).__name__}"
    if "steps" in needed:
        steps = sample["steps"]
        if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
            return "'steps' must be a list of strings"
    return None


GSM8K_ANNOTATION = re.compile(r"<<[^<>]*>>")


def gsm8k_problem(sample):
    if "####" not in sample["answer"]:
        return "'answer' has no '####' before the final answer (data_format gsm8k reads a GSM8K worked solution)"
    return None


def gsm8k_fields(batch):
    """A GSM8K worked solution (the answer column of openai/gsm8k) split into
    the reference's GSM8K-Aug form: the steps are its <<...>> calculator
    annotations, in order, and the answer is the text after the last ####."""
    steps, answers = [], []
    for solution in batch["answer"]:
        reasoning, _, final = solution.rpartition("####")
        steps.append(GSM8K_ANNOTATION.findall(reasoning))
        answers.append(final.strip())
    return {"answer": answers, "steps": steps}


@contextlib.contextmanager
def quiet_datasets(progress=None):
    """datasets' progress bars on the main process only, and its log lines
    kept to real errors (a failed read is reported as one line by us)."""
    progress = is_main_process() if progress is None else progress
    bars_were_on = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    if not progress:
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not progress and bars_were_on:
            datasets.enable_progress_bars()


# ------------------------------------------------------------ tokenisation
def get_dataset(path, tokenizer, max_size=1000000000, columns="", data_format="coconut"):
    """Tokenise a data source's first max_size samples (see tokenise_samples)."""
    return tokenise_samples(load_samples(path, columns, data_format), path, tokenizer, max_size)


def tokenise_samples(raw, path, tokenizer, max_size=1000000000):
    """The first max_size samples of `raw` (load_samples of `path`),
    tokenised: question (+ "\\n", special tokens), each step (+ "\\n"),
    answer ("### " + answer, then eos), and the sample index. datasets keeps
    the ids in its cache, keyed by the source's fingerprint and this exact
    tokenizer, so a later run (or every other rank) reads them back instead
    of tokenising."""
    if max_size < len(raw):
        raw = raw.select(range(max_size))
    with quiet_datasets():
        tokens = tokenise(raw, tokenizer, f"Tokenizing {display_name(path)}")
    samples = TokenizedSamples(tokens)
    check_token_boundaries(path, raw[0], samples[0], tokenizer)
    return samples


TOKEN_FEATURES = datasets.Features({
    "question_tokenized": datasets.List(datasets.Value("int32")),
    "steps_tokenized": datasets.List(datasets.List(datasets.Value("int32"))),
    "answer_tokenized": datasets.List(datasets.Value("int32")),
    "idx": datasets.Value("int64"),
})


def tokenise(raw, tokenizer, desc):
    """Dataset.map over the samples, written to datasets' cache beside the
    source's own files. A tokenizer that cannot be fingerprinted (no
    serialisable backend), a source held in memory, or one in a folder this
    user cannot write (a shared read-only copy) is tokenised in memory every
    time."""
    key = tokenizer_key(tokenizer)
    cached = key is not None and cache_writable(raw)
    # the source's fingerprint is datasets' own (file path and mtime, hub
    # revision, or every transform applied): with the tokenizer it names the result
    fingerprint = Hasher.hash([raw._fingerprint, TOKENISATION, key]) if cached else uuid.uuid4().hex
    return raw.map(
        tokenise_batch, batched=True, batch_size=10000, with_indices=True, fn_kwargs={"tokenizer": tokenizer},
        remove_columns=raw.column_names, features=TOKEN_FEATURES, keep_in_memory=not cached,
        load_from_cache_file=cached, new_fingerprint=fingerprint, desc=desc,
    )


def cache_writable(table):
    """Whether datasets can write a transform's result beside the table's
    files (where it puts it)."""
    return bool(table.cache_files) and os.access(os.path.dirname(table.cache_files[0]["filename"]), os.W_OK)


def tokenizer_key(tokenizer):
    """The tokenizer's whole serialised form (vocabulary, merges, added
    tokens, normaliser) and its eos id, or None when it has none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return [backend.to_str(), tokenizer.eos_token_id]


def tokenise_batch(batch, indices, tokenizer):
    """One batch of samples' token ids (docs/behaviour.md section 2)."""
    questions = encode_all(tokenizer, [q + "\n" for q in batch["question"]], special=True)
    answers = encode_all(tokenizer, ["### " + a for a in batch["answer"]], special=False)
    flat_steps = encode_all(tokenizer, [s + "\n" for steps in batch["steps"] for s in steps], special=False)
    bounds = list(itertools.accumulate(map(len, batch["steps"]), initial=0))
    return {
        "question_tokenized": questions,
        "steps_tokenized": [flat_steps[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
        "answer_tokenized": [ids + [tokenizer.eos_token_id] for ids in answers],
        "idx": indices,
    }


def encode_all(tokenizer, texts, special):
    """Token ids of many texts in one batched call. A fast tokenizer's Rust
    backend is called directly: the same ids, without building the
    BatchEncoding that costs most of the time for GSM8K's 1.3M steps."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=special)]
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def sample_text(sample):
    """A sample's whole text as the model reads it at stage 0: question +
    "\\n" + "\\n".join(steps) + "\\n### " + answer (docs/behaviour.md
    section 2), written so that a sample with no steps gains no stray "\\n"."""
    return sample["question"] + "\n" + "".join(step + "\n" for step in sample["steps"]) + "### " + sample["answer"]


def check_token_boundaries(path, raw, sample, tokenizer):
    """The pieces must tokenise like the whole text, or removing steps would
    change the tokens around them."""
    expected = tokenizer.encode(sample_text(raw)) + [tokenizer.eos_token_id]
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
    """Training / validation-loss sequences at a stage (docs/behaviour.md section 3).

    Building a stage only decides, per sample, how many steps are removed and
    how many latent tokens replace them; the sequences are laid out when the
    loader reads them. `seed` (an extension) makes the uniform_prob draws and
    the shuffle depend on it alone; None draws from the global `random`
    state as the reference.
    """
    rng = random.Random(seed) if seed is not None else random
    cap, pad, c_thought = configs.max_latent_stage, configs.pad_latent_to_max, configs.c_thought
    plans = []
    for position, n_steps in enumerate(step_counts(base_dataset)):
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


def step_counts(base_dataset):
    if hasattr(base_dataset, "step_counts"):
        return base_dataset.step_counts()
    return [len(sample["steps_tokenized"]) for sample in base_dataset]


class StageSamples(torch.utils.data.Dataset):
    """A stage's training sequences, each laid out when read from a plan
    (base position, steps removed, latent tokens)."""

    def __init__(self, base, plans, token_ids, markers):
        self.base, self.plans, self.token_ids, self.markers = base, plans, token_ids, markers

    def __len__(self):
        return len(self.plans)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def max_latents(self):
        """The most latent tokens any sequence of the stage holds."""
        return max((n_latent for _, _, n_latent in self.plans), default=0)

    def __getitem__(self, index):
        position, n_skip, n_latent = self.plans[index]
        return self._laid_out(self.base[position], n_skip, n_latent)

    def __getitems__(self, indices):
        """A batch's sequences, their base samples read together."""
        plans = [self.plans[i] for i in indices]
        positions = [position for position, _, _ in plans]
        if hasattr(self.base, "__getitems__"):
            samples = self.base.__getitems__(positions)
        else:
            samples = [self.base[p] for p in positions]
        return [self._laid_out(sample, n_skip, n_latent) for sample, (_, n_skip, n_latent) in zip(samples, plans)]

    def _laid_out(self, sample, n_skip, n_latent):
        prompt = _sequence(sample["question_tokenized"], n_latent, self.markers, *self.token_ids)
        rest = list(itertools.chain.from_iterable(sample["steps_tokenized"][n_skip:])) + sample["answer_tokenized"]
        return _with_masks(sample, prompt + rest, labels=[-100] * len(prompt) + rest)


class MyCollator:
    """Pads a list of samples into a batch (docs/behaviour.md section 4): rows that hold a
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


# ------------------------------------------------------------- the run's use
def data_options(configs):
    return dict(columns=configs.data_columns, data_format=configs.data_format)


def stage_for_epoch(configs, epoch):
    """The curriculum stage of 0-based `epoch`, for training and evaluation.
    `no_curriculum`: the final stage, max_latent_stage + 1 (all steps
    replaced by max_latent_stage thought slots), from the first epoch."""
    if configs.cot or configs.no_cot:
        return 0
    if configs.no_curriculum:
        return configs.max_latent_stage + 1
    return epoch // configs.epochs_per_stage


"""Tests for the built-in reasoning tasks (preprocessing/tasks.py) and the
offline tiny-model builder (preprocessing/tiny_model.py): every generated
sample is checked for validity, generation is seeded, and the built model
loads through `from_pretrained` like any model_id."""

import json
import re

import pytest
from helpers import assert_one_line_error
from helpers import load_preprocessing as load
from helpers import preprocessing_cli as cli

tasks = load("tasks")
tiny_model = load("tiny_model")

SIZES = {"train": 300, "valid": 50, "test": 50}
FACT = re.compile(r"Every (\w+) is a (\w+)\.")


def parse_graph_question(question):
    """(edges, person, start, options) read back from the question text."""
    person, start, a, b = re.search(r"(\w+) is a (\w+)\. Is \1 a (\w+) or (\w+)\?$", question).groups()
    return FACT.findall(question), person, start, [a, b]


def reachable(edges, start):
    seen, frontier = {start}, [start]
    while frontier:
        node = frontier.pop()
        for a, b in edges:
            if a == node and b not in seen:
                seen.add(b)
                frontier.append(b)
    return seen


def check_graph_sample(sample, min_hops, max_hops):
    edges, person, start, options = parse_graph_question(sample["question"])
    steps = [FACT.fullmatch(step).groups() for step in sample["steps"]]
    assert min_hops <= len(steps) <= max_hops
    # the steps are facts of the question and chain from the start
    node = start
    for a, b in steps:
        assert (a, b) in edges and a == node
        node = b
    # the chain ends at the answer, exactly one option is reachable
    assert sample["answer"] == f"{person} is a {node}."
    assert node in options
    from_start = reachable(edges, start)
    assert [o in from_start for o in options].count(True) == 1
    # the graph fields describe the same graph
    names = sample["idx_to_symbol"]
    assert sorted((names[a], names[b]) for a, b in sample["edges"]) == sorted(edges)
    assert names[sample["root"]] == start and names[sample["target"]] == node
    assert names[sample["neg_target"]] in options and names[sample["neg_target"]] != node


def check_pointer_sample(sample, min_hops, max_hops):
    listed, query = sample["question"].split(" Start at ")
    links = dict(re.findall(r"(\w+) -> (\w+)\.", listed))
    start, hops = re.fullmatch(r"(\w+) and follow (\d+) links\.", query).groups()
    assert min_hops <= int(hops) <= max_hops and len(sample["steps"]) == int(hops)
    node = start
    for step in sample["steps"]:
        a, b = re.fullmatch(r"(\w+) -> (\w+)\.", step).groups()
        assert a == node and links[a] == b
        node = b
    assert sample["answer"] == node


def check_multiply_sample(sample, digits_b):
    a, b = map(int, re.fullmatch(r"What is (\d+) \* (\d+)\?", sample["question"]).groups())
    assert len(sample["steps"]) == digits_b
    partials = []
    for step in sample["steps"]:
        x, factor, product = map(int, re.fullmatch(r"(\d+) \* (\d+) = (\d+)", step).groups())
        assert x == a and product == x * factor
        partials.append(factor)
    assert sum(partials) == b
    assert sample["answer"] == str(a * b)


def check_modsum_sample(sample, min_hops, max_hops, modulus):
    prefix, digits = sample["question"].split(": ")
    assert prefix == f"Sum mod {modulus}" and min_hops <= len(digits) <= max_hops
    assert all(int(d) < modulus for d in digits)
    total = 0
    assert len(sample["steps"]) == len(digits)
    for digit, step in zip(digits, sample["steps"]):
        total = (total + int(digit)) % modulus
        assert step == f"{digit}{total}"  # the digit read, then the running sum
    assert sample["answer"] == str(total)


SORTED = dict(fact_order="sorted", min_hops=3, max_hops=3, distractors=2, concepts=20)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(min_hops=2, max_hops=5, distractors=4, concepts=60), SORTED, dict(SORTED, min_hops=2, max_hops=4)],
)
def test_graph_samples_are_valid(options):
    splits = tasks.generate("graph", 0, SIZES, **options)
    for samples in splits.values():
        for sample in samples:
            check_graph_sample(sample, options.get("min_hops", 3), options.get("max_hops", 4))


@pytest.mark.parametrize("options", [dict(), SORTED])
def test_graph_options_are_balanced(options):
    """The right option is first about half the time: no position shortcut."""
    samples = tasks.generate("graph", 1, {"train": 400}, **options)["train"]
    first = sum(s["question"].split(" Is ")[1].split(" or ")[0].split(" a ")[1] in s["answer"] for s in samples)
    assert 0.4 < first / len(samples) < 0.6


def test_pointer_samples_are_valid():
    for samples in tasks.generate("pointer", 0, SIZES, min_hops=2, max_hops=5, variables=10).values():
        for sample in samples:
            check_pointer_sample(sample, 2, 5)


def test_multiply_samples_are_valid():
    for samples in tasks.generate("multiply", 0, SIZES, digits_a=4, digits_b=3).values():
        for sample in samples:
            check_multiply_sample(sample, 3)


@pytest.mark.parametrize("options, modulus", [(dict(min_hops=5, max_hops=5), 10), (dict(min_hops=8, max_hops=10, modulus=2), 2)])
def test_modsum_samples_are_valid(options, modulus):
    for samples in tasks.generate("modsum", 0, SIZES, **options).values():
        for sample in samples:
            check_modsum_sample(sample, options["min_hops"], options["max_hops"], modulus)


def test_modsum_answers_are_balanced():
    """Every residue is about equally likely: no answer to guess."""
    samples = tasks.generate("modsum", 2, {"train": 2000}, min_hops=5, max_hops=5)["train"]
    counts = [sum(s["answer"] == str(r) for s in samples) for r in range(10)]
    assert min(counts) > 150 and max(counts) < 250


@pytest.mark.parametrize("task", sorted(tasks.GENERATORS))
def test_generation_is_seeded_and_splits_are_disjoint(task):
    first = tasks.generate(task, 7, SIZES)
    assert first == tasks.generate(task, 7, SIZES)
    assert first != tasks.generate(task, 8, SIZES)
    questions = [s["question"] for split in first.values() for s in split]
    assert len(questions) == len(set(questions)) == sum(SIZES.values())
    assert {split: len(samples) for split, samples in first.items()} == SIZES


def test_graph_fact_order_is_shuffled():
    """The path's facts are not listed in order: reading them off the question
    in sequence would be a shortcut."""
    samples = tasks.generate("graph", 0, {"train": 200})["train"]
    in_order = 0
    for s in samples:
        positions = [s["question"].index(step) for step in s["steps"]]
        in_order += positions == sorted(positions)
    assert in_order < len(samples) / 2


@pytest.mark.parametrize("hops", [(3, 3), (2, 4)])
def test_sorted_graph_lists_one_fact_per_subject(hops):
    """The sorted layout states one fact about each of the same concepts, in
    sorted order; the options are never subjects; the path still wanders
    through the list in random order."""
    options = dict(SORTED, min_hops=hops[0], max_hops=hops[1])
    samples = tasks.generate("graph", 0, {"train": 300}, **options)["train"]
    subject_lists = set()
    in_order = 0
    for s in samples:
        edges, _, start, choices = parse_graph_question(s["question"])
        subjects = [a for a, _ in edges]
        assert subjects == sorted(set(subjects)) and len(subjects) == 2 * hops[1] + 2
        assert not set(choices) & set(subjects) and start in subjects
        subject_lists.add(tuple(subjects))
        positions = [subjects.index(step.split()[1]) for step in s["steps"]]
        in_order += positions == sorted(positions)
    assert len(subject_lists) == 1
    assert in_order < len(samples) / 2


def test_cli_writes_loadable_files(tmp_path):
    from dataset import load_samples

    result = cli("tasks.py", "graph", "--seed", 3, "--train", 40, "--valid", 10, "--test", 0, "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph_train.json", "graph_valid.json"]
    train = load_samples(str(tmp_path / "graph_train.json"))
    assert len(train) == 40
    assert json.loads((tmp_path / "graph_train.json").read_text()) == tasks.generate("graph", 3, {"train": 40, "valid": 10, "test": 0})["train"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["graph", "--train", "0"], "--train"),
        (["graph", "--min-hops", "4", "--max-hops", "3"], "--min-hops"),
        (["graph", "--concepts", "5"], "--concepts"),
        (["graph", "--fact-order", "sorted", "--concepts", "11"], "--concepts"),
        (["graph", "--fact-order", "alphabetical"], "--fact-order"),
        (["pointer", "--variables", "3", "--max-hops", "4"], "--variables"),
        (["multiply", "--digits-a", "1", "--digits-b", "1", "--train", "500"], "distinct questions"),
        (["modsum", "--modulus", "11"], "--modulus"),
        (["modsum", "--modulus", "1"], "--modulus"),
    ],
)
def test_cli_bad_options(tmp_path, args, needle):
    result = cli("tasks.py", *args, "--out-dir", tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert needle in result.stderr.strip().splitlines()[-1]  # after the progress bar, if generation began
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- tiny model
def test_tiny_model_builds_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dataset import load_samples

    data = tmp_path / "graph_train.json"
    assert cli("tasks.py", "graph", "--train", 200, "--valid", 5, "--test", 0, "--out-dir", tmp_path).returncode == 0
    out = tmp_path / "model"
    result = cli("tiny_model.py", data, "--out", out, "--n-layer", 2, "--n-embd", 32, "--n-head", 2)
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_layer == 2 and model.config.n_embd == 32
    assert model.config.activation_function == "gelu_new" and model.config.n_inner is None  # GPT-2's own MLP
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == "<|endoftext|>" and model.config.eos_token_id == tokenizer.eos_token_id
    sample = load_samples(str(data))[0]
    text = next(tiny_model.corpus([sample]))
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    # every concept name is one token: the model reads a fact word by word
    for name in sample["idx_to_symbol"]:
        assert len(tokenizer(" " + name)["input_ids"]) == 1
    assert not (tmp_path / "model.tmp").exists()


def test_tiny_model_mlp_options(tmp_path):
    from transformers import AutoModelForCausalLM

    assert cli("tasks.py", "graph", "--train", 50, "--valid", 5, "--test", 0, "--out-dir", tmp_path).returncode == 0
    out = tmp_path / "model"
    args = ("--out", out, "--n-layer", 1, "--n-embd", 32, "--n-head", 2, "--n-inner", 48, "--activation", "relu")
    assert cli("tiny_model.py", tmp_path / "graph_train.json", *args).returncode == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.activation_function == "relu" and model.config.n_inner == 48
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (32, 48)


def test_tiny_model_digits_are_single_tokens(tmp_path):
    tasks_out = cli("tasks.py", "multiply", "--train", 100, "--valid", 5, "--test", 0, "--out-dir", tmp_path)
    assert tasks_out.returncode == 0
    tokenizer = tiny_model.train_tokenizer(tiny_model.corpus(json.loads((tmp_path / "multiply_train.json").read_text())), 500)
    assert [tokenizer.decode([i]) for i in tokenizer("12345")["input_ids"]] == list("12345")


def test_tiny_model_modsum_steps_are_three_tokens(tmp_path):
    """The quickstart's c_thought (3) is the length of a modsum step: its two
    digits and the newline are one token each, as are the question's digits."""
    assert cli("tasks.py", "modsum", "--train", 300, "--valid", 5, "--test", 0, "--out-dir", tmp_path).returncode == 0
    samples = json.loads((tmp_path / "modsum_train.json").read_text())
    tokenizer = tiny_model.train_tokenizer(tiny_model.corpus(samples), 500)
    for sample in samples[:20]:
        for step in sample["steps"]:
            assert [tokenizer.decode([i]) for i in tokenizer(step + "\n")["input_ids"]] == [step[0], step[1], "\n"]
        digits = sample["question"].split(": ")[1]
        assert tokenizer(digits)["input_ids"] == [tokenizer.convert_tokens_to_ids(d) for d in digits]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--n-embd", "30", "--n-head", "4"], "--n-embd"),
        (["--n-positions", "20"], "--n-positions"),
        (["--n-inner", "0"], "--n-inner"),
        (["--activation", "swish"], "--activation"),
    ],
)
def test_tiny_model_bad_options(tmp_path, args, needle):
    assert cli("tasks.py", "graph", "--train", 50, "--valid", 5, "--test", 0, "--out-dir", tmp_path).returncode == 0
    result = cli("tiny_model.py", tmp_path / "graph_train.json", "--out", tmp_path / "model", *args)
    assert_one_line_error(result, needle)
    assert not (tmp_path / "model").exists()


def test_tiny_model_bad_data_file(tmp_path):
    (tmp_path / "bad.json").write_text('[{"question": "q"}]')
    result = cli("tiny_model.py", tmp_path / "bad.json", "--out", tmp_path / "model")
    assert_one_line_error(result, "bad.json")
    assert not (tmp_path / "model").exists()

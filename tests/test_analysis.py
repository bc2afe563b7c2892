"""analysis.py on a tiny GPT-2 and generated graph data: the thought-count
sweep agrees with run.py's own evaluation of the same checkpoint at each
stage; inspection's thoughts, top-k probabilities, norms and nearest
embeddings agree with the naive reference (one full pass per thought); the
LM head on a thought equals the model's logits before it for GPT-2, Llama
and Qwen2; the graph-distance masses on a hand-made graph; valid PNGs; and
one-line errors, with nothing written, for bad input.

python -m pytest -q tests/test_analysis.py
"""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, load_preprocessing, load_tokenizer_and_model, naive_forward, preprocessing_cli, write_config

import analysis
import build
import metrics
import run
from coconut import Coconut
from utils import CONFIG_KEYS, load_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# sample i of the crafted validation file takes its answer from the sweep's
# prediction with GROUPS[i] thoughts: 1, 2 and 3 samples for 0, 1 and 2
# thoughts, so the three accuracies differ. Sample 0 keeps its real answer:
# the tokenizer boundary check reads it.
GROUPS = [None, 0, 1, 1, 2, 2, 2]


pytestmark = pytest.mark.usefixtures("one_thread")


def cli_env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def graph_setup(tmp_path_factory):
    """(folder, config path, checkpoint path): generated graph data (7
    validation samples), a tiny GPT-2 built for it, and a Coconut
    checkpoint of its untrained weights. Untrained, its outputs carry no
    '#', so the extracted answer is the whole text, latent tokens included:
    it depends on the number of thoughts, which the cross-check needs."""
    root = tmp_path_factory.mktemp("analysis")
    made = preprocessing_cli("tasks.py", "graph", "--train", "40", "--valid", "7", "--test", "0", "--out-dir", root, "--max-hops", "3")
    assert made.returncode == 0, made.stderr
    load_preprocessing("tiny_model").build([str(root / "graph_train.json")], str(root / "model"), n_layer=2, n_embd=32, n_head=2)
    config = write_config(
        root, str(root / "model"), "graph", train_path=str(root / "graph_train.json"),
        val_path=str(root / "graph_valid.json"), max_latent_stage=2,
    )
    model, _, _ = build.build_model(load_config(config))
    torch.save(model.state_dict(), root / "checkpoint")
    return root, config, str(root / "checkpoint")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def is_png(path):
    import matplotlib.image

    with open(path, "rb") as f:
        data = f.read()
    return data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR" and matplotlib.image.imread(path).ndim == 3


def craft_validation_file(root, rows):
    samples = read_json(root / "graph_valid.json")
    for index, count in enumerate(GROUPS):
        if count is not None:
            samples[index]["answer"] = rows[count]["outputs"][index]["prediction"]
    path = root / "crafted_valid.json"
    path.write_text(json.dumps(samples))
    return str(path)


def run_py_accuracy(root, config, checkpoint, data, stage, capsys):
    """run.py's own evaluation at a stage (one epoch per stage): (accuracy,
    CoT match) from its metrics file."""
    name = f"eval-stage-{stage}"
    overrides = ["only_eval=true", f"load_model_path={checkpoint}", f"val_path={data}", f"resume={stage}",
                 f"num_epochs={stage + 1}", f"name={name}"]
    assert run.main([config, *overrides]) == 0, capsys.readouterr().err[-2000:]
    record = metrics.read(root / "runs" / name / metrics.EVAL_ONLY_FILE)[-1]
    assert record["stage"] == stage
    return record["eval/acc"], record["eval/cot_em"]


@pytest.mark.slow
def test_sweep_matches_run_py_evaluation(graph_setup, tmp_path, capsys):
    root, config, checkpoint = graph_setup
    assert analysis.main(["sweep", config, "--checkpoint", checkpoint, "--out", str(tmp_path / "first")]) == 0
    first = read_json(tmp_path / "first" / "sweep.json")["rows"]
    crafted = craft_validation_file(root, first)

    # the real command, batched, on the crafted answers
    out = tmp_path / "sweep"
    done = subprocess.run(
        [sys.executable, "analysis.py", "sweep", config, "--checkpoint", checkpoint, "--data", crafted, "--batch-size", "3", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, env=cli_env(), timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == (out / "sweep.md").read_text() and done.stdout.startswith("# Thought-count sweep")
    summary = read_json(out / "sweep.json")
    rows = summary["rows"]
    assert [r["thoughts"] for r in rows] == [0, 1, 2] and summary["samples"] == 7
    assert [r["mean_latent_tokens"] for r in rows] == [0, 1, 2]  # pad_latent_to_max: n slots, c_thought 1

    for stage, row in enumerate(rows):
        assert (row["accuracy"], row["cot_match"]) == run_py_accuracy(root, config, checkpoint, crafted, stage, capsys)
        assert f"| {stage} | {stage}.00 | {row['accuracy']:.4f} |" in done.stdout
    # the crafted groups: samples of group n are right with n thoughts and no other count
    assert [r["accuracy"] for r in rows] == [1 / 7, 2 / 7, 3 / 7]
    assert [[o["correct"] for o in r["outputs"]] for r in rows] == [[g == n for g in GROUPS] for n in range(3)]
    assert is_png(out / "sweep.png")


def test_sweep_counts_generated_tokens(graph_setup, tmp_path):
    root, config, checkpoint = graph_setup
    out = tmp_path / "out"
    assert analysis.main(["sweep", config, "--checkpoint", checkpoint, "--max-thoughts", "3", "--batch-size", "4", "--out", str(out)]) == 0
    rows = read_json(out / "sweep.json")["rows"]
    assert [r["thoughts"] for r in rows] == [0, 1, 2, 3]  # beyond max_latent_stage: the cap is raised
    assert rows[3]["mean_latent_tokens"] == 3
    # one sample decoded alone, outside evaluation.evaluate
    model, tokenizer, ids = build.build_model(load_config(config, [f"load_model_path={checkpoint}"]))
    model.eval()
    question = read_json(root / "graph_valid.json")[0]["question"]
    prompt = tokenizer.encode(question + "\n") + [ids["<|start-latent|>"], ids["<|latent|>"], ids["<|end-latent|>"]]
    tokens = model.generate(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=128)
    assert rows[1]["outputs"][0]["generated_tokens"] == tokens.shape[1] - len(prompt)
    mean = sum(o["generated_tokens"] for o in rows[1]["outputs"]) / 7
    assert rows[1]["mean_generated_tokens"] == pytest.approx(mean)


def naive_thoughts(base, question_ids, start_id, latent_id, n):
    """Continuous thoughts the slow way: the question, the start marker and n
    latents through the naive reference (helpers.naive_forward: one full
    pass per thought, each latent fed the final hidden state of the position
    before it); the n fed vectors."""
    input_ids = torch.tensor([question_ids + [start_id] + [latent_id] * n])
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "position_ids": torch.arange(input_ids.shape[1])[None],
             "labels": input_ids}
    _, _, embeds = naive_forward(base, batch, latent_id)
    return list(embeds[0, len(question_ids) + 1 :])


@torch.no_grad()
def test_inspect_matches_a_naive_recomputation(graph_setup, tmp_path):
    root, config, checkpoint = graph_setup
    out = tmp_path / "out"
    assert analysis.main(["inspect", config, "--checkpoint", checkpoint, "--samples", "0,4", "--top-k", "3", "--out", str(out)]) == 0
    report = read_json(out / "inspect.json")
    assert (out / "inspect.txt").read_text().startswith("Latent inspection: ")
    assert is_png(out / "inspect.png")
    model, tokenizer, ids = build.build_model(load_config(config, [f"load_model_path={checkpoint}"]))
    base = model.base_causallm.eval()
    table = base.get_input_embeddings().weight
    mean_norm = table.norm(dim=-1).mean()
    assert report["mean_token_embedding_norm"] == pytest.approx(float(mean_norm), rel=1e-5)
    raw = read_json(root / "graph_valid.json")
    assert [s["idx"] for s in report["samples"]] == [0, 4]
    for sample in report["samples"]:
        data = raw[sample["idx"]]
        expected = naive_thoughts(base, tokenizer.encode(data["question"] + "\n"), ids["<|start-latent|>"], ids["<|latent|>"], 2)
        assert len(sample["thoughts"]) == 2
        for got, thought in zip(sample["thoughts"], expected):
            top = torch.softmax(base.get_output_embeddings()(thought), dim=-1).topk(3)
            assert [t["id"] for t in got["lm_head_top"]] == top.indices.tolist()
            assert [t["value"] for t in got["lm_head_top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
            assert got["norm"] == pytest.approx(float(thought.norm()), rel=1e-4)
            cosine = torch.nn.functional.cosine_similarity(table, thought[None], dim=-1).topk(3)
            assert [t["id"] for t in got["nearest_embeddings"]] == cosine.indices.tolist()
            assert [t["value"] for t in got["nearest_embeddings"]] == pytest.approx(cosine.values.tolist(), abs=1e-5)
        concepts = sample["graph"]["concepts"]
        assert concepts[data["root"]]["distance"] == 0
        assert concepts[data["target"]]["distance"] == len(data["steps"])  # the answer is reached in one hop per step
        assert concepts[data["neg_target"]]["distance"] is None
        for mass in sample["graph"]["mass_by_distance"]:
            assert list(mass)[-1] == "unreachable" and 0 <= sum(mass.values()) <= 1


def test_concept_first_token_is_where_the_name_starts_in_the_text(graph_setup):
    root, config, _ = graph_setup
    tokenizer = load_tokenizer_and_model(str(root / "model"))[0]
    for sample in read_json(root / "graph_valid.json")[:3]:
        question_ids = tokenizer.encode(sample["question"])
        for name in sample["idx_to_symbol"]:
            token = analysis.concept_first_token(tokenizer, name)
            assert (" " + name).startswith(tokenizer.decode([token])) and token in question_ids


def test_distance_masses_on_a_hand_made_graph():
    # a -> b -> c, a -> d, d -> a (a cycle), e -> c (e unreachable), f alone
    edges = [[0, 1], [1, 2], [0, 3], [3, 0], [4, 2]]
    distances = analysis.concept_distances(6, edges, 0)
    assert distances == [0, 1, 2, 1, None, None]
    probs = torch.zeros(10)
    probs[[1, 2, 3, 5, 6, 9]] = torch.tensor([0.1, 0.2, 0.05, 0.15, 0.3, 0.2])
    # b and d start with the same token 2: its 0.2 is split between them
    token_ids = [1, 2, 3, 2, 5, 6]
    values = analysis.concept_values(probs, token_ids)
    assert values == pytest.approx([0.1, 0.1, 0.05, 0.1, 0.15, 0.3])
    mass = analysis.mass_by_distance(values, distances)
    assert list(mass) == ["0", "1", "2", "unreachable"]
    assert mass == pytest.approx({"0": 0.1, "1": 0.2, "2": 0.05, "unreachable": 0.45})
    assert sum(mass.values()) <= 1
    # every concept sharing one token: still at most that token's probability
    assert sum(analysis.concept_values(probs, [2] * 6)) == pytest.approx(0.2)
    assert list(analysis.mass_by_distance([0.5, 0.5], analysis.concept_distances(2, [[0, 1]], 0))) == ["0", "1"]


def coconut_with_prompt(model_dir, n_latent=3, **variant):
    """(Coconut model, question ids, start id, a one-row batch of the question
    and n_latent thoughts) for a tiny model of the conftest fixtures."""
    tokenizer, base = load_tokenizer_and_model(model_dir)
    for token in build.LATENT_TOKENS:
        tokenizer.add_tokens(token)
    build.init_latent_embeddings(base, tokenizer)
    start, end, latent = (tokenizer.convert_tokens_to_ids(t) for t in build.LATENT_TOKENS)
    model = Coconut(base, latent, start, end, tokenizer.eos_token_id, **variant).eval()
    question = tokenizer.encode("Tom has 3 apples and gets 4 more?\n")
    prompt = torch.tensor([question + [start] + [latent] * n_latent + [end]])
    batch = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "position_ids": torch.arange(prompt.shape[1])[None]}
    return model, question, start, batch


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@torch.no_grad()
def test_head_on_a_thought_equals_the_logits_before_it(arch, model_dirs):
    """The fed hidden state is already after the final norm (GPT-2 ln_f,
    Llama/Qwen2 norm), so the LM head applies to it as is."""
    model, question, start, batch = coconut_with_prompt(model_dirs[arch])
    base = model.base_causallm
    thoughts, logits_before = analysis.capture_thoughts(model, batch, model.latent_token_id)
    assert thoughts.shape == (3, base.config.hidden_size)
    for thought, expected in zip(thoughts, naive_thoughts(base, question, start, model.latent_token_id, 3)):
        assert torch.allclose(thought, expected, atol=1e-5)
    norm, words = analysis.head_reading(model)
    assert norm is None and "as fed" in words
    probs = analysis.head_probabilities(model, thoughts, norm)
    assert torch.allclose(probs, torch.softmax(logits_before, dim=-1), atol=1e-6)


@pytest.mark.skipif("latent_layer" not in inspect.signature(Coconut).parameters, reason="no feedback variants in coconut.py")
@torch.no_grad()
def test_an_earlier_layer_is_read_through_the_final_norm(model_dirs):
    """latent_layer=1 feeds the first block's output, before ln_f: the head
    reads it through ln_f (a logit lens)."""
    model, question, start, batch = coconut_with_prompt(model_dirs["gpt2"], n_latent=1, latent_layer=1)
    base = model.base_causallm
    thoughts, _ = analysis.capture_thoughts(model, batch, model.latent_token_id)
    norm, words = analysis.head_reading(model)
    assert norm is base.transformer.ln_f and "final norm" in words
    expected = base(torch.tensor([question + [start]]), output_hidden_states=True).hidden_states[1][0, -1]
    assert torch.allclose(thoughts[0], expected, atol=1e-5)
    probs = analysis.head_probabilities(model, thoughts, norm)
    assert torch.allclose(probs[0], torch.softmax(base.lm_head(base.transformer.ln_f(expected)), dim=-1), atol=1e-6)


def bad_configs(root, model_dir):
    configs = {
        "cot": write_config(root, model_dir, "cot", coconut=False, cot=True),
        "pause": write_config(root, model_dir, "pause", coconut=False),
        "fresh": write_config(root, model_dir, "never-trained"),
    }
    if "pause_as_thought" in CONFIG_KEYS:
        configs["pauseasthought"] = write_config(root, model_dir, "pause-as-thought", pause_as_thought=True)
    return configs


def malformed_graph_file(root):
    samples = read_json(root / "graph_valid.json")
    samples[1]["root"] = 99
    path = root / "bad_graph.json"
    path.write_text(json.dumps(samples))
    return str(path)


# (case, argv with CONFIG / CKPT / ROOT placeholders, the text the one line must hold)
CASES = [
    ("missing-config", ["sweep", "ROOT/nope.yaml"], "nope.yaml: config file not found"),
    ("no-command", ["plot", "CONFIG"], "expected a command, sweep, inspect or export, got 'plot'"),
    ("bad-override", ["sweep", "CONFIG", "max_latent_stag=3"], "unknown key 'max_latent_stag' (did you mean 'max_latent_stage'?)"),
    ("missing-checkpoint", ["sweep", "CONFIG", "--checkpoint", "ROOT/missing.pt"], "--checkpoint 'ROOT/missing.pt': no such checkpoint file"),
    ("corrupt-checkpoint", ["inspect", "CONFIG", "--checkpoint", "ROOT/graph_valid.json"],
     "load_model_path 'ROOT/graph_valid.json': not a readable checkpoint"),
    ("no-checkpoint", ["sweep", "FRESH"], "load_model_path: no checkpoint to analyse"),
    ("missing-data", ["sweep", "CONFIG", "--checkpoint", "CKPT", "--data", "ROOT/none.json"], "ROOT/none.json: data file not found"),
    ("sample-out-of-range", ["inspect", "CONFIG", "--checkpoint", "CKPT", "--samples", "0,7"],
     "--samples: sample 7 is out of range: ROOT/graph_valid.json holds 7 samples"),
    ("sample-negative", ["inspect", "CONFIG", "--checkpoint", "CKPT", "--samples", "-1"], "--samples: sample -1 is out of range"),
    ("sample-not-int", ["inspect", "CONFIG", "--checkpoint", "CKPT", "--samples", "0,x"],
     "--samples: expected comma-separated sample indices, got '0,x'"),
    ("negative-K", ["sweep", "CONFIG", "--checkpoint", "CKPT", "--max-thoughts", "-1"], "--max-thoughts: must be >= 0, got -1"),
    ("K-not-int", ["sweep", "CONFIG", "--checkpoint", "CKPT", "--max-thoughts", "two"], "argument --max-thoughts: invalid int value: 'two'"),
    ("zero-thoughts", ["inspect", "CONFIG", "--checkpoint", "CKPT", "--thoughts", "0"], "--thoughts: must be >= 1, got 0"),
    ("zero-top-k", ["inspect", "CONFIG", "--checkpoint", "CKPT", "--top-k", "0"], "--top-k: must be >= 1, got 0"),
    ("zero-batch", ["sweep", "CONFIG", "--checkpoint", "CKPT", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    ("option-of-the-other-command", ["sweep", "CONFIG", "--checkpoint", "CKPT", "--samples", "1"], "unrecognized arguments: --samples"),
    ("cot-model", ["sweep", "COT", "--checkpoint", "CKPT"], "key 'cot' is set: the model has no thought tokens to sweep"),
    ("inspect-needs-coconut", ["inspect", "PAUSE", "--checkpoint", "CKPT"], "key 'coconut' must be set for inspect"),
    ("pause-as-thought", ["inspect", "PAUSEASTHOUGHT", "--checkpoint", "CKPT"], "key 'pause_as_thought' is set"),
    ("malformed-graph", ["inspect", "CONFIG", "--checkpoint", "CKPT", "--data", "BADGRAPH", "--samples", "1"],
     "bad_graph.json: sample 1: 'root' must be an index into idx_to_symbol, got 99"),
]


@pytest.mark.parametrize("case, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_nothing_written(case, argv, needle, graph_setup, tmp_path, capsys):
    if case == "pause-as-thought" and "pause_as_thought" not in CONFIG_KEYS:
        pytest.skip("no pause_as_thought key in this version of utils.py")
    root, config, checkpoint = graph_setup
    configs = bad_configs(root, str(root / "model"))
    places = {"CONFIG": config, "CKPT": checkpoint, "COT": configs["cot"], "PAUSEASTHOUGHT": configs.get("pauseasthought", ""),
              "PAUSE": configs["pause"], "FRESH": configs["fresh"], "BADGRAPH": malformed_graph_file(root), "ROOT": str(root)}

    def fill(word):
        for key, value in places.items():
            word = word.replace(key, value)
        return word

    out = tmp_path / "out"
    assert analysis.main([fill(w) for w in argv] + ["--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fill(needle) in lines[0], lines
    assert not out.exists()


@pytest.mark.slow
def test_bad_input_from_the_command_line(graph_setup, tmp_path):
    root, config, checkpoint = graph_setup
    done = subprocess.run(
        [sys.executable, "analysis.py", "inspect", config, "--checkpoint", checkpoint, "--samples", "9", "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, env=cli_env(), timeout=300,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"error: --samples: sample 9 is out of range: {root / 'graph_valid.json'} holds 7 samples"]
    assert not (tmp_path / "out").exists()

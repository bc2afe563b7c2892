"""Research analysis of a trained checkpoint: how accuracy depends on the
number of continuous thoughts, and what each thought encodes; and its export
to the HuggingFace format.

    python analysis.py sweep CONFIG.yaml [key=value ...] [--checkpoint PATH] [--data PATH]
                       [--max-thoughts K] [--batch-size B] [--out DIR]
    python analysis.py inspect CONFIG.yaml [key=value ...] [--checkpoint PATH] [--data PATH]
                       [--samples 0,3,7] [--thoughts N] [--top-k 5] [--out DIR]
    python analysis.py export RUN_FOLDER_OR_CHECKPOINT --out DIR

`export` writes the checkpoint (a run folder's newest, or the one named) as
a HuggingFace model folder: the base model (save_pretrained, safetensors),
the tokenizer with the three latent tokens, and coconut.json (latent ids,
c_thought, the checkpoint's stage, the feedback options), plus
latent_projection.safetensors if the run had one. `Coconut.from_pretrained`
(or AutoModelForCausalLM, for the base model alone) loads it. It reads the
run's config.yaml beside the checkpoint; the model_id it names must load.

`sweep` evaluates the checkpoint on the validation set with 0..K thoughts
(the evaluation prompt of stage n, docs/behaviour.md section 3, through evaluation.evaluate) and
writes sweep.md, sweep.json and sweep.png. `inspect` runs chosen samples at
the final stage, reads back every continuous thought (the vector fed into a
`<|latent|>` position: the last hidden state before it, or a feedback
variant's), and reports what the LM head and the token embeddings make of
it; for samples that carry a graph (ProsQA, the built-in graph task) also
the probability mass on the graph's concepts by distance from the root, as
in the paper's latent-search analysis. Writes inspect.txt, inspect.json and
inspect.png.

The checkpoint is the one run.py would use for this config: `--checkpoint`,
else the newest in the run folder <save_path>/<name> (unless only_eval),
else load_model_path. Outputs go to --out (default: the run folder). One
process, on the GPU if there is one. Bad input gives one line `error: ...`
and exit status 2, with nothing written.
"""

import io
import json
import os
import shutil
import sys
from collections import Counter, defaultdict, deque
from contextlib import redirect_stdout
from dataclasses import replace
from typing import NamedTuple

import torch

import build
import checkpoints
import evaluation
import metrics
from coconut import EXPORT_FILE, FEEDBACK_OPTIONS, PROJECTION_FILE
from dataset import MyCollator, data_options, get_question_latent_dataset, load_samples, stage_for_epoch, tokenise_samples
from distributed import Process, single_process_device
from utils import ArgumentParser, UserError, load_config, resolve_config, run_folder

COMMANDS = ("sweep", "inspect", "export")
USAGE = "analysis.py {sweep,inspect} CONFIG.yaml [key=value ...] [options], or analysis.py export RUN_OR_CHECKPOINT --out DIR"
GRAPH_KEYS = ("idx_to_symbol", "edges", "root")


# ---------------------------------------------------------------- command line
def command_parser(command):
    parser = ArgumentParser(prog=f"analysis.py {command}", description=__doc__.split("\n\n")[0], usage_line=USAGE)
    if command == "export":
        parser.add_argument("target", help="a run folder (its newest checkpoint) or a checkpoint file")
        parser.add_argument("--out", required=True, help="folder to write (new, or empty)")
        return parser
    parser.add_argument("config_file", help="the run's YAML config")
    parser.add_argument("overrides", nargs="*", help="key=value pairs that override the config")
    parser.add_argument("--checkpoint", help="weights to analyse (default: as run.py resolves them for the config)")
    parser.add_argument("--data", help="data file (default: the config's val_path)")
    parser.add_argument("--out", help="folder for the outputs (default: the run folder <save_path>/<name>)")
    if command == "sweep":
        parser.add_argument("--max-thoughts", type=int, help="largest number of thoughts K (default: max_latent_stage)")
        parser.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    else:
        parser.add_argument("--samples", default="0,1,2", help="comma-separated sample indices (default 0,1,2)")
        parser.add_argument("--thoughts", type=int, help="number of thoughts (default: max_latent_stage, the final stage)")
        parser.add_argument("--top-k", type=int, default=5, help="tokens listed per thought (default 5)")
    return parser


def parse_args(argv):
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0)
    if not argv or argv[0] not in COMMANDS:
        got = f"got '{argv[0]}'" if argv else "got nothing"
        raise UserError(f"command line: expected a command, sweep, inspect or export, {got} (usage: {USAGE})")
    # intermixed: options may come before or after the key=value overrides
    args = command_parser(argv[0]).parse_intermixed_args(argv[1:])
    args.command = argv[0]
    for key, least in (("max_thoughts", 0), ("batch_size", 1), ("thoughts", 1), ("top_k", 1)):
        value = getattr(args, key, None)
        if value is not None and value < least:
            raise UserError(f"--{key.replace('_', '-')}: must be >= {least}, got {value}")
    return args


def parse_sample_indices(text, n_samples, path):
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--samples: expected comma-separated sample indices, got '{text}'") from None
    for index in indices:
        if not 0 <= index < n_samples:
            raise UserError(f"--samples: sample {index} is out of range: {path} holds {n_samples} samples")
    return indices


# -------------------------------------------------------------------- set-up
def resolve_checkpoint(configs, given):
    """The weights run.py would load for this config, unless given."""
    if given is not None:
        if not os.path.isfile(given):
            raise UserError(f"--checkpoint '{given}': no such checkpoint file")
        return given
    newest = None if configs.only_eval else checkpoints.newest_checkpoint(run_folder(configs))
    if newest is not None:
        return newest
    if configs.load_model_path is not None:
        return configs.load_model_path
    raise UserError(
        f"load_model_path: no checkpoint to analyse (it is None and {run_folder(configs)} holds none); pass --checkpoint PATH"
    )


def check_method(configs, command, source):
    """Continuous thoughts exist only for Coconut without pause_as_thought.
    The sweep also takes pause-token models (pause_as_thought, or no method
    key set), whose `<|latent|>` positions keep their own embedding.
    CoT-style models have no latent-token embedding at all."""
    if command == "inspect" and configs.method != "coconut":
        raise UserError(f"{source}: key 'coconut' must be set for inspect: only Coconut feeds hidden states back as thoughts")
    if command == "inspect" and configs.pause_as_thought:
        raise UserError(f"{source}: key 'pause_as_thought' is set: nothing is fed back, so there are no thoughts to inspect")
    if not configs.latent_tokens:
        raise UserError(f"{source}: key '{configs.method}' is set: the model has no thought tokens to sweep")


def load_setup(args):
    """Config, checkpoint and data, all checked before the model is built."""
    configs = resolve_config(load_config(args.config_file, args.overrides), source=args.config_file)
    check_method(configs, args.command, args.config_file)
    # evaluation only, of the checkpoint run.py would load, on --data if given
    # (which also picks run.py's token budget: 64 for gsm)
    configs = replace(configs, load_model_path=resolve_checkpoint(configs, args.checkpoint), only_eval=True,
                      val_path=configs.val_path if args.data is None else args.data)
    raw = load_samples(configs.val_path, **data_options(configs))
    if configs.debug and len(raw) > 32:
        raw = raw.select(range(32))  # run.py's debug subset
    return configs, raw


class Loaded(NamedTuple):
    """A model ready to analyse: in eval mode on `device`, with its tokenizer
    and latent token ids."""

    model: torch.nn.Module
    tokenizer: object
    ids: dict
    device: torch.device


def model_for_analysis(configs):
    """The Loaded model, built as run.py builds it; its "Loaded ..." line goes
    to stderr, keeping stdout for the results."""
    device = single_process_device()
    with redirect_stdout(sys.stderr):
        model, tokenizer, ids = build.build_model(configs)
    model.to(device).eval()
    return Loaded(model, tokenizer, ids, device)


def prompt_config(configs, n_thoughts):
    """A config whose stage `n_thoughts` gives n_thoughts slots: the same as
    run.py's stage up to max_latent_stage; beyond it the cap is raised, to
    try more thoughts than the model was trained with."""
    return replace(configs, max_latent_stage=max(configs.max_latent_stage, n_thoughts))


def prompts(configs, base_valid, n_thoughts, ids):
    return get_question_latent_dataset(
        n_thoughts, base_valid, prompt_config(configs, n_thoughts),
        ids["<|start-latent|>"], ids["<|latent|>"], ids["<|end-latent|>"],
        no_special_marker=False,  # check_method leaves only methods with markers
    )


# --------------------------------------------------------------------- sweep
def evaluate_count(loaded, configs, base_valid, raw, n_thoughts):
    """Accuracy, CoT match and per-sample outputs of the Loaded model with n
    thoughts, from evaluation.evaluate (its printed examples are kept off
    stdout)."""
    model, tokenizer, ids, device = loaded
    dataset = prompts(configs, base_valid, n_thoughts, ids)
    collator = MyCollator(tokenizer, latent_id=ids["<|latent|>"], label_pad_token_id=-100)
    records = []
    with redirect_stdout(io.StringIO()), build.precision(configs, device):
        accuracy, cot_match = evaluation.evaluate(model, dataset, raw, configs, tokenizer=tokenizer, collator=collator,
                                                  process=Process(0, 1, device), records=records)
    outputs = []
    for idx, text, n_new in records:
        prediction = evaluation.extract_answer(text)
        correct = prediction == evaluation.normalise_answer(raw[idx]["answer"])
        outputs.append({"idx": idx, "prediction": prediction, "correct": correct, "generated_tokens": n_new})
    latent_tokens = [s["input_ids"].count(ids["<|latent|>"]) for s in dataset]
    return {
        "thoughts": n_thoughts,
        "mean_latent_tokens": sum(latent_tokens) / len(latent_tokens),
        "accuracy": accuracy,
        "cot_match": cot_match,
        "mean_generated_tokens": sum(r[2] for r in records) / len(records),
        "outputs": outputs,
    }


def sweep_command(args, configs, raw):
    top = configs.max_latent_stage if args.max_thoughts is None else args.max_thoughts
    loaded = model_for_analysis(configs)
    configs = replace(configs, batch_size_eval=args.batch_size)
    base_valid = tokenise_samples(raw, configs.val_path, loaded.tokenizer)
    rows = []
    for n in range(top + 1):
        rows.append(evaluate_count(loaded, configs, base_valid, raw, n))
        r = rows[-1]
        print(f"{n} thoughts: accuracy {r['accuracy']:.4f}, CoT match {r['cot_match']:.4f}, "
              f"{r['mean_generated_tokens']:.1f} generated tokens", file=sys.stderr, flush=True)
    summary = {
        "config": args.config_file, "checkpoint": configs.load_model_path, "data": configs.val_path,
        "samples": len(raw), "c_thought": configs.c_thought, "max_latent_stage": configs.max_latent_stage,
        "pad_latent_to_max": configs.pad_latent_to_max, "rows": rows,
    }
    text = sweep_markdown(summary)
    print(text, end="")
    return {
        "sweep.md": text,
        "sweep.json": json.dumps(summary, indent=1) + "\n",
        "sweep.png": lambda path: plot_sweep(summary, path),
    }


def sweep_markdown(summary):
    lines = [
        f"# Thought-count sweep: {summary['checkpoint']}", "",
        f"{summary['data']}, {summary['samples']} samples; c_thought {summary['c_thought']}, "
        f"max_latent_stage {summary['max_latent_stage']}; greedy decoding.", "",
        "| thoughts | latent tokens (mean) | accuracy | CoT match | generated tokens (mean) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in summary["rows"]:
        lines.append(f"| {r['thoughts']} | {r['mean_latent_tokens']:.2f} | {r['accuracy']:.4f} | "
                     f"{r['cot_match']:.4f} | {r['mean_generated_tokens']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_sweep(summary, path):
    plt = metrics.pyplot()
    rows = summary["rows"]
    counts = [r["thoughts"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(counts, [r["accuracy"] for r in rows], marker="o", label="accuracy")
    ax.plot(counts, [r["cot_match"] for r in rows], marker="s", label="CoT match")
    if summary["max_latent_stage"] < counts[-1]:
        ax.axvline(summary["max_latent_stage"] + 0.5, color="grey", linestyle="--", linewidth=0.8, label="beyond training")
    ax.set_xticks(counts)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("continuous thoughts at inference")
    ax.set_ylabel("fraction of samples")
    ax.set_title(os.path.basename(summary["checkpoint"]), fontsize=9)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    metrics.save_figure(fig, path)


# ------------------------------------------------------------------- inspect
def capture_thoughts(model, batch, latent_id):
    """(thoughts (n, d), logits at the column before each (n, V)) of a
    one-row batch. The forward's inputs_embeds holds, at every latent column,
    the last hidden state of the column before it: the continuous thought."""
    outputs = model(batch["input_ids"], batch["attention_mask"], position_ids=batch["position_ids"])
    columns = (batch["input_ids"][0] == latent_id).nonzero().squeeze(1)
    return outputs.inputs_embeds[0, columns], outputs.logits[0, columns - 1]


def reference_feedback(model):
    """Whether the fed vector is the last layer's hidden state as is (no
    latent_layer / latent_norm / latent_projection variant)."""
    return (getattr(model, "latent_layer", -1) == -1 and getattr(model, "latent_norm", "none") == "none"
            and getattr(model, "latent_projection", None) is None)


def final_norm(base):
    """The model's norm before the LM head (GPT-2 ln_f, Llama/Qwen2 norm), or None."""
    for name in ("ln_f", "norm", "final_layernorm", "final_layer_norm"):
        module = getattr(base.base_model, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def head_reading(model):
    """(norm to apply before the LM head or None, what that means in words).
    The reference feeds transformers' last hidden_states entry, which is
    already after the final norm, so the head reads it as is and
    head(thought) equals the model's logits one column earlier (checked on
    every sample). A feedback variant feeds another vector (an earlier
    layer's, rescaled, or projected): the head reads it through the final
    norm, as a logit lens."""
    if reference_feedback(model):
        return None, "LM head applied to each thought as fed (the last hidden state, already after the final norm)"
    norm = final_norm(model.base_causallm)
    if norm is None:
        return None, "LM head applied to each thought as fed (a feedback variant; no final norm found in this model)"
    return norm, f"LM head applied after the model's final norm ({type(norm).__name__}): the thoughts come from a feedback variant"


def head_probabilities(model, thoughts, norm=None):
    """Softmax of the LM head applied to each thought (through `norm` if given)."""
    head = model.base_causallm.get_output_embeddings()
    return torch.softmax(head(norm(thoughts) if norm is not None else thoughts).float(), dim=-1)


def top_tokens(scores, k, tokenizer):
    values, indices = scores.topk(min(k, scores.shape[-1]))
    return [{"token": tokenizer.decode([i]), "id": i, "value": round(v, 6)} for v, i in zip(values.tolist(), indices.tolist())]


def nearest_embeddings(thought, table, k, tokenizer):
    """Token embeddings of highest cosine similarity to the thought."""
    cosine = torch.nn.functional.normalize(table.float(), dim=-1) @ torch.nn.functional.normalize(thought.float(), dim=0)
    return top_tokens(cosine, k, tokenizer)


def concept_distances(n_concepts, edges, root):
    """Hops from the root to every concept along the directed edges ("Every A
    is a B." is A -> B), by breadth-first search; None where unreachable."""
    children = defaultdict(list)
    for a, b in edges:
        children[a].append(b)
    distances = [None] * n_concepts
    distances[root] = 0
    queue = deque([root])
    while queue:
        node = queue.popleft()
        for child in children[node]:
            if distances[child] is None:
                distances[child] = distances[node] + 1
                queue.append(child)
    return distances


def concept_first_token(tokenizer, name):
    """The first token of a concept name where the text has it: after a space
    ("is a wumpus"), read off the tokenisation of that context so the space
    is handled as the tokenizer does (GPT-2 BPE: ' w'; SentencePiece: '▁w')."""
    context = tokenizer.encode("is a", add_special_tokens=False)
    full = tokenizer.encode("is a " + name, add_special_tokens=False)
    if full[: len(context)] == context and len(full) > len(context):
        return full[len(context)]
    return tokenizer.encode(" " + name, add_special_tokens=False)[0]


def concept_values(probs, token_ids):
    """Probability of each concept: that of its first token. A token that
    starts several of the sample's concepts is split equally between them,
    so the values sum to at most 1."""
    sharing = Counter(token_ids)
    return [float(probs[t]) / sharing[t] for t in token_ids]


def distance_labels(distances):
    reachable = [d for d in distances if d is not None]
    labels = [str(d) for d in range(max(reachable) + 1)] if reachable else []
    return labels + (["unreachable"] if None in distances else [])


def mass_by_distance(values, distances):
    """{"0": mass, "1": ..., "unreachable": ...}: the concept values summed by
    their distance from the root."""
    mass = dict.fromkeys(distance_labels(distances), 0.0)
    for value, distance in zip(values, distances):
        mass["unreachable" if distance is None else str(distance)] += value
    return mass


def is_index(value, size):
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < size


def graph_problem(names, edges, root):
    """What is wrong with a sample's graph fields, or None."""
    if not (isinstance(names, list) and names and all(isinstance(x, str) for x in names)):
        return "'idx_to_symbol' must be a non-empty list of names"
    if not is_index(root, len(names)):
        return f"'root' must be an index into idx_to_symbol, got {root!r}"
    pairs = isinstance(edges, list) and all(isinstance(e, list) and len(e) == 2 for e in edges)
    if not (pairs and all(is_index(i, len(names)) for e in edges for i in e)):
        return "'edges' must be a list of [from, to] indices into idx_to_symbol"
    return None


def graph_of(sample, index, path):
    """(names, distances) of a sample's graph, or None if it carries none."""
    if not all(key in sample for key in GRAPH_KEYS):
        return None
    names, edges, root = (sample[key] for key in GRAPH_KEYS)
    problem = graph_problem(names, edges, root)
    if problem:
        raise UserError(f"{path}: sample {index}: {problem}")
    return names, concept_distances(len(names), edges, root)


def inspect_sample(loaded, configs, tokenized, sample, *, index, graph, n_thoughts, top_k):
    """Everything reported about one sample's thoughts (`sample` as read,
    `tokenized` as get_dataset gives it, `index` its place in the data) with
    `n_thoughts` thought slots, as a JSON-able dict; `graph` is
    graph_of(the sample) or None."""
    model, tokenizer, ids, device = loaded
    collator = MyCollator(tokenizer, latent_id=ids["<|latent|>"])
    batch = collator([prompts(configs, [tokenized], n_thoughts, ids)[0]])
    batch = {k: v.to(device) for k, v in batch.items() if k != "idx"}
    with torch.no_grad(), build.precision(configs, device):
        thoughts, logits_before = capture_thoughts(model, batch, ids["<|latent|>"])
        norm, _ = head_reading(model)
        probs = head_probabilities(model, thoughts, norm)
        output = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=evaluation.token_budget(configs))
    before = torch.softmax(logits_before.float(), dim=-1)
    if len(thoughts) and norm is None and reference_feedback(model) and not torch.allclose(probs, before, atol=1e-3):
        print(f"warning: sample {index}: LM head on the thoughts differs from the model's logits before them; "
              "this architecture may feed pre-norm hidden states", file=sys.stderr)
    table = model.base_causallm.get_input_embeddings().weight
    report = {
        "idx": index, "question": sample["question"], "answer": sample["answer"],
        "output": tokenizer.decode(output[0][batch["input_ids"].shape[1]:], skip_special_tokens=True),
        "thoughts": [
            {"norm": float(t.float().norm()), "lm_head_top": top_tokens(p, top_k, tokenizer),
             "nearest_embeddings": nearest_embeddings(t, table, top_k, tokenizer)}
            for t, p in zip(thoughts, probs)
        ],
    }
    if graph is not None:
        names, distances = graph
        token_ids = [concept_first_token(tokenizer, name) for name in names]
        report["graph"] = {
            "concepts": [{"name": n, "distance": d, "first_token": tokenizer.decode([t])} for n, d, t in zip(names, distances, token_ids)],
            "shared_first_tokens": sum(c for c in Counter(token_ids).values() if c > 1),
            "mass_by_distance": [mass_by_distance(concept_values(p, token_ids), distances) for p in probs],
        }
    return report


def inspect_command(args, configs, raw):
    n_thoughts = configs.max_latent_stage if args.thoughts is None else args.thoughts
    indices = parse_sample_indices(args.samples, len(raw), configs.val_path)
    graphs = [graph_of(raw[i], i, configs.val_path) for i in indices]  # checked before the model is built
    loaded = model_for_analysis(configs)
    base_valid = tokenise_samples(raw, configs.val_path, loaded.tokenizer)
    table = loaded.model.base_causallm.get_input_embeddings().weight
    summary = {
        "config": args.config_file, "checkpoint": configs.load_model_path, "data": configs.val_path,
        "thought_slots": n_thoughts, "c_thought": configs.c_thought, "top_k": args.top_k,
        "mean_token_embedding_norm": float(table.detach().float().norm(dim=-1).mean()),
        "lm_head_input": head_reading(loaded.model)[1],
        "samples": [
            inspect_sample(loaded, configs, base_valid[i], raw[i], index=i, graph=graph, n_thoughts=n_thoughts, top_k=args.top_k)
            for i, graph in zip(indices, graphs)
        ],
    }
    text = inspection_text(summary)
    print(text, end="")
    return {
        "inspect.txt": text,
        "inspect.json": json.dumps(summary, indent=1, ensure_ascii=False) + "\n",
        "inspect.png": lambda path: plot_inspection(summary, path),
    }


def inspection_text(summary):
    lines = [
        f"Latent inspection: {summary['checkpoint']}",
        f"{summary['data']}; {summary['thought_slots']} thought slots x c_thought {summary['c_thought']}; "
        f"mean token-embedding norm {summary['mean_token_embedding_norm']:.3f}",
        summary["lm_head_input"] + ".",
    ]
    for sample in summary["samples"]:
        lines += ["", f"== sample {sample['idx']}: {sample['question']}",
                  f"answer: {sample['answer']!r}   output: {sample['output']!r}"]
        if not sample["thoughts"]:
            lines.append("(no thoughts in this prompt)")
        for number, thought in enumerate(sample["thoughts"], start=1):
            lines += thought_lines(number, thought, summary["mean_token_embedding_norm"])
        if "graph" in sample:
            lines += graph_lines(sample["graph"])
    return "\n".join(lines) + "\n"


def thought_lines(number, thought, mean_norm):
    lines = [f"thought {number}: norm {thought['norm']:.3f} ({thought['norm'] / mean_norm:.1f}x the mean token embedding)",
             f"  {'rank':>4}  {'LM head token':<20} {'prob':>7}   {'nearest embedding':<20} {'cosine':>7}"]
    for rank, (top, near) in enumerate(zip(thought["lm_head_top"], thought["nearest_embeddings"]), start=1):
        lines.append(f"  {rank:>4}  {top['token']!r:<20} {top['value']:>7.4f}   {near['token']!r:<20} {near['value']:>7.4f}")
    return lines


def graph_lines(graph):
    """Markdown table: one row per thought, mass by distance from the root."""
    labels = list(graph["mass_by_distance"][0]) if graph["mass_by_distance"] else []
    shared = f"; {graph['shared_first_tokens']} concepts share a first token (split equally)" if graph["shared_first_tokens"] else ""
    lines = ["", f"probability mass on the graph's concepts by distance from the root (first token of each name{shared}):",
             "| thought | " + " | ".join(labels) + " | total |", "| ---: |" + " ---: |" * (len(labels) + 1)]
    for number, mass in enumerate(graph["mass_by_distance"], start=1):
        lines.append(f"| {number} | " + " | ".join(f"{mass[k]:.4f}" for k in labels) + f" | {sum(mass.values()):.4f} |")
    return lines


def plot_inspection(summary, path):
    """One panel per sample: a heatmap thoughts x distance for graph samples,
    else each thought's top LM-head token and its probability."""
    plt = metrics.pyplot()
    samples = summary["samples"]
    fig, axes = plt.subplots(len(samples), 1, figsize=(7, 3 * len(samples)), squeeze=False)
    for ax, sample in zip(axes[:, 0], samples):
        if "graph" in sample and sample["thoughts"]:
            plot_mass_heatmap(ax, sample["graph"]["mass_by_distance"])
        else:
            plot_top_token_bars(ax, sample["thoughts"])
        ax.set_title(f"sample {sample['idx']}", fontsize=9)
    metrics.save_figure(fig, path)


def plot_mass_heatmap(ax, masses):
    labels = list(masses[0])
    grid = [[mass[k] for k in labels] for mass in masses]
    # a fixed 0..1 scale, so panels and checkpoints compare by colour
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for row, values in enumerate(grid):
        for col, value in enumerate(values):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(grid)), [f"thought {i + 1}" for i in range(len(grid))])
    ax.set_xlabel("distance from the root")
    ax.figure.colorbar(image, ax=ax, label="probability mass")


def plot_top_token_bars(ax, thoughts):
    values = [t["lm_head_top"][0]["value"] for t in thoughts]
    bars = ax.bar([f"thought {i + 1}" for i in range(len(thoughts))], values, color="tab:blue")
    ax.bar_label(bars, labels=[repr(t["lm_head_top"][0]["token"]) for t in thoughts], fontsize=7)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("top-1 LM-head probability")


# ---------------------------------------------------------------------- export
def export_setup(target):
    """The run's config (from config.yaml beside the checkpoint) with the
    checkpoint to export as load_model_path."""
    if os.path.isdir(target):
        folder, checkpoint = target, None
    elif os.path.isfile(target):
        folder, checkpoint = os.path.dirname(os.path.abspath(target)), target
    else:
        raise UserError(f"{target}: no such run folder or checkpoint file")
    config_file = os.path.join(folder, "config.yaml")
    if not os.path.isfile(config_file):
        raise UserError(f"{target}: no config.yaml in {folder} (export reads the run folder run.py wrote)")
    configs = resolve_config(load_config(config_file), source=config_file)
    checkpoint = checkpoint or checkpoints.newest_checkpoint(folder)
    if checkpoint is None:
        raise UserError(f"{target}: the run folder holds no checkpoint")
    return replace(configs, load_model_path=checkpoint, only_eval=True)


def checkpoint_stage(configs):
    """The curriculum stage the checkpoint `load_model_path` last trained;
    None for a file not named as run.py names checkpoints."""
    place = checkpoints.position(os.path.basename(configs.load_model_path))
    if place is None:
        return None
    epochs, batches = place
    return stage_for_epoch(configs, epochs - 1 if batches == 0 else epochs)


def export_command(args):
    out = args.out
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out '{out}': exists and is not an empty folder")
    configs = export_setup(args.target)
    with redirect_stdout(sys.stderr):
        model, tokenizer, ids = build.build_model(configs)
    meta = {
        "latent_token_id": ids["<|latent|>"], "start_latent_id": ids["<|start-latent|>"], "end_latent_id": ids["<|end-latent|>"],
        "eos_token_id": tokenizer.eos_token_id, "method": configs.method,
        "c_thought": configs.c_thought, "max_latent_stage": configs.max_latent_stage, "pad_latent_to_max": configs.pad_latent_to_max,
        "stage": checkpoint_stage(configs), "checkpoint": os.path.abspath(configs.load_model_path),
        **{key: getattr(configs, key) for key in FEEDBACK_OPTIONS},
    }
    # written to a temporary folder renamed into place: an error leaves nothing
    temporary = f"{out.rstrip(os.sep)}.{os.getpid()}.tmp"
    os.makedirs(temporary)
    try:
        build.plain_model(model).save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        if getattr(model, "latent_projection", None) is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.latent_projection.state_dict().items()}, os.path.join(temporary, PROJECTION_FILE))
        with open(os.path.join(temporary, EXPORT_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------- main
def write_outputs(outputs, folder):
    """Only after everything is computed, so an error leaves nothing behind.
    A value is text, or a callable that writes the file at a path."""
    os.makedirs(folder, exist_ok=True)
    written = []
    for name, content in outputs.items():
        path = os.path.join(folder, name)
        if callable(content):
            content(path)
        else:
            with open(path, "w") as f:
                f.write(content)
        written.append(path)
    return written


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        if args.command == "export":
            print(f"wrote {export_command(args)}", file=sys.stderr)
            return 0
        configs, raw = load_setup(args)
        outputs = (sweep_command if args.command == "sweep" else inspect_command)(args, configs, raw)
        for path in write_outputs(outputs, args.out or run_folder(configs)):
            print(f"wrote {path}", file=sys.stderr)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

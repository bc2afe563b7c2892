"""Helpers shared by the test files (fixtures live in conftest.py): sample
data, tiny-model set-up, run configs and command-line launches, the naive
one-latent-at-a-time reference of the continuous-thought forward pass, and
the preprocessing scripts loaded by path.

Plain functions and constants; test files import them with
`from helpers import ...` (tests/ is on sys.path while pytest runs, as for
conftest). conftest.py imports this module before it puts the repository
root on sys.path, so the repository's own modules are imported inside the
functions that use them.
"""

import importlib.util
import json
import os
import random
import subprocess
import sys

import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARCHS = ["gpt2", "llama", "qwen2"]
BOS = "<s>"


# ------------------------------------------------------------- data and models
def make_samples(n, seed=0, max_steps=4):
    """Arithmetic word problems in the GSM8K layout, 0..max_steps steps each."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        steps, value = [], a
        for _ in range(rng.randint(0, max_steps)):
            c = rng.randint(1, 9)
            steps.append(f"<<{value}+{c}={value + c}>>")
            value += c
        samples.append({"question": f"Tom has {a} apples and gets {b} more, then adds steps?", "steps": steps, "answer": str(value)})
    return samples



def toy_tokenizer(add_bos=False):
    """preprocessing/tiny_model.py's tokenizer (numbers not split into digits)
    trained on make_samples texts; with `add_bos`, a start token begins every
    encoding, as Llama's."""
    corpus = []
    for s in make_samples(400, seed=123):
        corpus.append(s["question"] + "\n" + "\n".join(s["steps"]) + "\n### " + s["answer"])
    return load_preprocessing("tiny_model").train_tokenizer(corpus * 3, 300, split_digits=False, bos_token=BOS if add_bos else None)


def load_tokenizer_and_model(folder):
    """(tokenizer, model) of a saved folder, through `from_pretrained`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)


def stage_config(**kw):
    """The dataset keys a curriculum stage reads: c_thought 2, up to stage 3,
    no padding to the maximum, no random stages; `kw` overrides."""
    from utils import Config

    base = dict(c_thought=2, max_latent_stage=3, pad_latent_to_max=False, uniform_prob=0.0, no_cot=False)
    return Config({**base, **kw})


def setup_model(folder):
    """(tokenizer, model in eval mode, (start, latent, end) ids): a tiny model
    with the three latent tokens added (embedding rows resized, not
    initialised from `<<` as build.py does) and eos as the pad token."""
    from build import LATENT_TOKENS

    tokenizer, model = load_tokenizer_and_model(folder)
    tokenizer.pad_token = tokenizer.eos_token
    for t in LATENT_TOKENS:
        tokenizer.add_tokens(t)
    model.resize_token_embeddings(len(tokenizer))
    start, end, latent = (tokenizer.convert_tokens_to_ids(t) for t in LATENT_TOKENS)
    model.eval()  # no dropout: the two computations must see the same function
    return tokenizer, model, (start, latent, end)


def mixed_batch(tokenizer, ids, tmp_path, stages=(0, 1, 3, 2)):
    """One collated training batch whose rows sit at different stages: rows
    with no latents, with 2, 6 and 4 latents (c_thought 2)."""
    from dataset import MyCollator, get_cot_latent_dataset, get_dataset

    path = tmp_path / "mixed.json"
    samples = make_samples(8, seed=7, max_steps=4)
    samples = [s for s in samples if len(s["steps"]) >= 3][: len(stages)]
    assert len(samples) == len(stages)
    path.write_text(json.dumps(samples))
    base = get_dataset(str(path), tokenizer)
    start, latent, end = ids
    rows = []
    for sample, stage in zip(base, stages):
        rows += get_cot_latent_dataset(stage, [sample], stage_config(), start, latent, end)
    return MyCollator(tokenizer, latent_id=latent)(rows)


def eval_prompts(tokenizer, ids, data_dir, stage):
    """The generation prompts of the `data_dir` fixture's validation file at
    `stage` (c_thought 1, no padding to the maximum)."""
    from dataset import get_dataset, get_question_latent_dataset

    base = get_dataset(str(data_dir / "toy_valid.json"), tokenizer)
    return get_question_latent_dataset(stage, base, stage_config(c_thought=1), *ids[:1], ids[1], ids[2])


def pick_eos(coconut, prompts, collator):
    """A token that some, not all, rows generate early: lets rows stop at
    different steps without a trained model."""
    outputs = [coconut.generate(collator([p])["input_ids"], collator([p])["attention_mask"], max_new_tokens=6)[0] for p in prompts]
    # the first new token is always kept, so only later ones can stop a row
    seen = [set(o[len(p["input_ids"]) + 1 :].tolist()) for o, p in zip(outputs, prompts)]
    candidates = set.union(*seen)
    return max(candidates, key=lambda t: (0 < sum(t in s for s in seen) < len(seen), -sum(t in s for s in seen)))


# ------------------------------------------------------ the naive reference
def naive_forward(base, batch, latent_id, layer=-1, transform=None):
    """The continuous-thought forward pass the slow way: fill the k-th latent
    of every row from a full pass over the sequence as filled so far, with
    the hidden state `hidden_states[layer]` of the column before it (the
    final layer by default, as the reference feeds back) passed through
    `transform` if given (one vector at a time, shape (1, width) in and
    out: a feedback variant's norm or projection); then one full pass gives
    the logits. Returns (loss, logits, filled input embeddings).

    `batch` holds input_ids, attention_mask, position_ids and labels. The
    latents of a row are found by `latent_id`; each is filled in its own
    round, so a row's k-th latent sees its first k-1 already filled (causal
    attention: later columns never change earlier hidden states)."""
    input_ids = batch["input_ids"]
    embeds = base.get_input_embeddings()(input_ids)
    common = dict(attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    columns = [(row == latent_id).nonzero().flatten().tolist() for row in input_ids]
    for k in range(max(len(c) for c in columns)):
        hidden = base(inputs_embeds=embeds, output_hidden_states=True, **common).hidden_states[layer]
        embeds = embeds.clone()
        for row, cols in enumerate(columns):
            if len(cols) > k:
                fed = hidden[row, cols[k] - 1]
                embeds[row, cols[k]] = fed if transform is None else transform(fed[None])[0]
    logits = base(inputs_embeds=embeds, **common).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    return loss, logits, embeds


# --------------------------------------------------- run configs and launches
def write_config(root, model_dir, name, **kw):
    """Write `root/name.yaml`: a 3-epoch Coconut run (c_thought 1, stages up
    to 2, batch 8) on `root`'s train.json / valid.json, saving under
    `root/runs`; `kw` overrides any key. Returns the path."""
    values = dict(
        project="coconut-test", save_path=str(root / "runs"), name=name, coconut=True, c_thought=1,
        epochs_per_stage=1, max_latent_stage=2, pad_latent_to_max=True, model_id=model_dir,
        train_path=str(root / "train.json"), val_path=str(root / "valid.json"), reset_optimizer=True,
        batch_size_training=8, num_epochs=3, lr=1e-3,
    )
    values.update(kw)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def config_for(workspace, folder, name, **kw):
    """A loaded config written in `folder`, reading the workspace's data."""
    from utils import load_config

    root, model_dir = workspace
    paths = dict(train_path=str(root / "train.json"), val_path=str(root / "valid.json"), save_path=str(folder / "runs"))
    return load_config(write_config(folder, model_dir, name, **{**paths, **kw}))


def cli_env(tmp_path, **extra):
    """The environment of a launched run: no WANDB_* variables of the caller,
    HOME and WANDB_DIR in `tmp_path`, unbuffered output; `extra` added."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    # no login: the run must log offline and say so, never wait for one
    env.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **extra)
    return env


def launcher(processes=1):
    """The command that starts a script: python, or torchrun on one machine
    with `processes` processes (gloo on a CPU) when more than one."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def run_cli(args, tmp_path, torchrun=False, timeout=600, **env):
    """run.py with `args` in `tmp_path`, as one process or two under torchrun
    (gloo on a CPU); returns the CompletedProcess, output captured."""
    return subprocess.run(launcher(2 if torchrun else 1) + [os.path.join(REPO, "run.py")] + args, capture_output=True, text=True,
                          env=cli_env(tmp_path, **env), cwd=tmp_path, timeout=timeout)


def checkpoints(root, name):
    """Complete checkpoint names (weights files) of a run folder, oldest first."""
    from checkpoints import complete_checkpoints

    return complete_checkpoints(str(root / "runs" / name))


# ------------------------------------------------------- preprocessing scripts
def load_preprocessing(name):
    """preprocessing/<name>.py as a module, loaded by path: preprocessing/
    holds scripts, not a package."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "preprocessing", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preprocessing_cli(script, *args):
    """Run preprocessing/<script> from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, f"preprocessing/{script}", *map(str, args)], cwd=REPO, capture_output=True, text=True
    )


def assert_one_line_error(result, *needles):
    """A refused command: exit status 2, no traceback, one `error: ` line on
    stderr holding every needle."""
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]

"""Benchmark 3: building a stage's training set at GSM8K scale (385,620
samples, GSM8K-sized token counts), as run.py does every epoch, plus the
one-off cost of tokenising a file of that size (first run, then a later run
reading datasets' cache) and of laying out every sequence once (what the
data loader does over an epoch).

python benchmarks/bench_stages.py
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# datasets reads its cache folder when imported: a fresh one, so that the
# first load below really tokenises; the later run's process is given it too
CACHE = tempfile.TemporaryDirectory(prefix="bench-stages-")
os.environ["HF_DATASETS_CACHE"] = CACHE.name

import torch  # noqa: E402
from shapes import REPO, gsm_like, header  # noqa: E402

from dataset import MyCollator, get_cot_latent_dataset, get_dataset  # noqa: E402
from utils import Config  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "tests"))

# a later run: a new process, timing get_dataset only (not the imports)
LATER_RUN = """
import sys, time
sys.path.insert(0, {repo!r})
from transformers import AutoTokenizer
from dataset import get_dataset
tokenizer = AutoTokenizer.from_pretrained({folder!r})
start = time.perf_counter()
samples = get_dataset({path!r}, tokenizer)
print(time.perf_counter() - start, len(samples))
"""


def seconds(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def tokenise_file(n, folder):
    """get_dataset on an n-sample GSM8K-style file, with a byte-level BPE
    tokenizer trained here (the hub's GPT-2 tokenizer is not needed): the
    first call tokenises, a new process then reads datasets' cache.
    Returns (first seconds, later-run seconds, the tokenised samples)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # as in a run (the tests turn it off)
    from helpers import make_samples, toy_tokenizer

    tokenizer = toy_tokenizer()
    tokenizer.save_pretrained(folder)
    path = os.path.join(folder, "gsm_like.json")
    samples = make_samples(1000, seed=5, max_steps=5)
    with open(path, "w") as f:
        json.dump((samples * (n // len(samples) + 1))[:n], f)
    first, tokenised = seconds(lambda: get_dataset(path, tokenizer))
    script = LATER_RUN.format(repo=REPO, folder=folder, path=path)
    env = dict(os.environ, HF_DATASETS_CACHE=CACHE.name)
    later = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    took, count = later.stdout.split()
    assert int(count) == n
    return first, float(took), tokenised


def lay_out_all(built):
    """Every sequence of a stage, read as the loader does: a batch of 32
    indices at a time."""
    for start in range(0, len(built), 32):
        built.__getitems__(range(start, min(start + 32, len(built))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=385620)
    args = parser.parse_args()
    base = gsm_like(args.samples)
    config = Config(c_thought=2, max_latent_stage=3, pad_latent_to_max=True, uniform_prob=0.0, no_cot=False)
    print(header(torch.device("cpu")))
    print(f"{args.samples} GSM8K-sized samples (question 30-70 tokens, 2-5 steps of 6-14, answer 4), c_thought 2\n")
    print("| what | seconds |")
    print("| --- | --- |")
    for stage in (0, 1, 2, 3, 4):
        took, built = seconds(lambda stage=stage: get_cot_latent_dataset(stage, base, config, 1, 2, 3, shuffle=True, seed=stage))
        print(f"| build stage {stage} training set (shuffled) | {took:.2f} |", flush=True)
    took, _ = seconds(lambda: get_cot_latent_dataset(2, base, Config(config, uniform_prob=0.5), 1, 2, 3, shuffle=True, seed=9))
    print(f"| build stage 2 with uniform_prob 0.5 | {took:.2f} |", flush=True)
    took, _ = seconds(lambda: lay_out_all(built))
    print(f"| lay out all {len(built)} sequences once, from in-memory samples (loader work over an epoch) | {took:.2f} |", flush=True)

    class PadTokenizer:
        pad_token_id = 0

    collator = MyCollator(PadTokenizer(), latent_id=2)
    took, _ = seconds(lambda: [collator([built[j] for j in range(i, i + 32)]) for i in range(0, 32 * 2000, 32)])
    print(f"| collate 2000 batches of 32 | {took:.2f} |", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        first, later, tokenised = tokenise_file(args.samples, folder)
        print(f"| read and tokenise a {args.samples}-sample file (get_dataset, byte-level BPE, first run) | {first:.2f} |")
        print(f"| the same in a later run: a new process, ids from datasets' cache (every later run and rank) | {later:.2f} |", flush=True)
        took, built = seconds(lambda: get_cot_latent_dataset(2, tokenised, config, 1, 2, 3, shuffle=True, seed=2))
        print(f"| build stage 2 from the tokenised file (memory-mapped, as run.py) | {took:.2f} |", flush=True)
        took, _ = seconds(lambda: lay_out_all(built))
        print(f"| lay out all {len(built)} sequences of it once (loader work over an epoch) | {took:.2f} |", flush=True)


if __name__ == "__main__":
    main()

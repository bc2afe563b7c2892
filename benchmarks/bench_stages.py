"""Benchmark 3: building a stage's training set at GSM8K scale (385,620
samples, GSM8K-sized token counts), as run.py does every epoch, plus the
one-off cost of tokenising a file of that size and of laying out every
sequence once (what the data loader does over an epoch).

python benchmarks/bench_stages.py
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from shapes import REPO, gsm_like, header

from dataset import MyCollator, get_cot_latent_dataset, get_dataset
from utils import Config

sys.path.insert(0, os.path.join(REPO, "tests"))


def seconds(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def tokenise_file(n):
    """get_dataset on an n-sample GSM8K-style file, with a byte-level BPE
    tokenizer trained here (the hub's GPT-2 tokenizer is not needed): the
    first call tokenises, the second reads the on-disk cache."""
    with tempfile.TemporaryDirectory() as folder:
        os.environ["COCONUT_CACHE"] = os.path.join(folder, "cache")
        os.environ["TOKENIZERS_PARALLELISM"] = "true"  # as in a run (the tests turn it off)
        from conftest import make_samples, train_tokenizer

        tokenizer = train_tokenizer(folder)
        path = os.path.join(folder, "gsm_like.json")
        samples = make_samples(1000, seed=5, max_steps=5)
        with open(path, "w") as f:
            json.dump((samples * (n // len(samples) + 1))[:n], f)
        return seconds(lambda: get_dataset(path, tokenizer))[0], seconds(lambda: get_dataset(path, tokenizer))[0]


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
        took, built = seconds(lambda: get_cot_latent_dataset(stage, base, config, 1, 2, 3, shuffle=True, seed=stage))
        print(f"| build stage {stage} training set (shuffled) | {took:.2f} |", flush=True)
    took, _ = seconds(lambda: get_cot_latent_dataset(2, base, Config(config, uniform_prob=0.5), 1, 2, 3, shuffle=True, seed=9))
    print(f"| build stage 2 with uniform_prob 0.5 | {took:.2f} |", flush=True)
    took, _ = seconds(lambda: [built[i] for i in range(len(built))])
    print(f"| lay out all {len(built)} sequences once (loader work over an epoch) | {took:.2f} |", flush=True)

    class PadTokenizer:
        pad_token_id = 0

    collator = MyCollator(PadTokenizer(), latent_id=2)
    took, _ = seconds(lambda: [collator([built[j] for j in range(i, i + 32)]) for i in range(0, 32 * 2000, 32)])
    print(f"| collate 2000 batches of 32 | {took:.2f} |", flush=True)
    first, cached = tokenise_file(args.samples)
    print(f"| read and tokenise a {args.samples}-sample file (get_dataset, byte-level BPE, first run) | {first:.2f} |")
    print(f"| the same with its tokens in the on-disk cache (every later run and rank) | {cached:.2f} |", flush=True)


if __name__ == "__main__":
    main()

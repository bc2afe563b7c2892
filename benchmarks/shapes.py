"""Shared by the benchmarks: model presets, synthetic ProsQA-like and
GSM8K-like samples (speed does not depend on weights or token values), the
timing helper and the header naming hardware, versions and command."""

import os
import platform
import random
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# GPT-2 small is the paper's model; "cpu-small" keeps a 2-core CPU run short.
PRESETS = {
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, batch=32),
    "cpu-small": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, batch=8),
}
LATENT, START, END = 0, 1, 2  # set to the three ids after the base vocabulary


def build_model(preset, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = PRESETS[preset]
    config = GPT2Config(
        vocab_size=shape["vocab_size"] + 3, n_positions=1024, n_embd=shape["n_embd"],
        n_layer=shape["n_layer"], n_head=shape["n_head"], attn_implementation="sdpa",
        bos_token_id=shape["vocab_size"] - 1, eos_token_id=shape["vocab_size"] - 1,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(device)


def special_ids(preset):
    base = PRESETS[preset]["vocab_size"]
    return {"latent": base, "start": base + 1, "end": base + 2, "eos": base - 1}


def prosqa_like(n, vocab, seed=0):
    """Pre-tokenised samples of ProsQA's shape: a ~290-token question (the
    graph's facts), 4 to 6 steps of ~9 tokens, a ~8-token answer: ~350 in all."""
    rng = random.Random(seed)
    tokens = lambda k: [rng.randrange(3, vocab - 1) for _ in range(k)]
    return [
        {
            "question_tokenized": tokens(rng.randint(270, 310)),
            "steps_tokenized": [tokens(rng.randint(7, 11)) for _ in range(rng.randint(4, 6))],
            "answer_tokenized": tokens(7) + [vocab - 1],
            "idx": i,
        }
        for i in range(n)
    ]


def gsm_like(n, vocab=50257, seed=0):
    """Pre-tokenised samples of GSM8K's shape: ~50-token question, 2 to 5
    steps of ~10 tokens, a 3-token answer."""
    rng = random.Random(seed)
    tokens = lambda k: [rng.randrange(vocab) for _ in range(k)]
    return [
        {
            "question_tokenized": tokens(rng.randint(30, 70)),
            "steps_tokenized": [tokens(rng.randint(6, 14)) for _ in range(rng.randint(2, 5))],
            "answer_tokenized": tokens(3) + [vocab - 1],
            "idx": i,
        }
        for i in range(n)
    ]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: "5" resets the process's peak resident set size
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def header(device):
    import transformers

    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
        hardware += f", {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return "\n".join([
        f"hardware: {hardware}",
        f"versions: python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"command: python {' '.join(sys.argv)}",
    ])


def default_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

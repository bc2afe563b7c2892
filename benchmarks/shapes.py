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


def synthetic_samples(n, vocab, seed, question, n_steps, step_len, answer_len):
    """Pre-tokenised samples with random ids; lengths drawn from the given
    (low, high) ranges; the answer ends with eos (the last id)."""
    rng = random.Random(seed)
    tokens = lambda k: [rng.randrange(3, vocab - 1) for _ in range(k)]
    return [
        {
            "question_tokenized": tokens(rng.randint(*question)),
            "steps_tokenized": [tokens(rng.randint(*step_len)) for _ in range(rng.randint(*n_steps))],
            "answer_tokenized": tokens(answer_len) + [vocab - 1],
            "idx": i,
        }
        for i in range(n)
    ]


def prosqa_like(n, vocab, seed=0):
    """ProsQA's shape: a ~290-token question (the graph's facts), 4 to 6 steps
    of ~9 tokens, a ~8-token answer: ~350 tokens in all."""
    return synthetic_samples(n, vocab, seed, question=(270, 310), n_steps=(4, 6), step_len=(7, 11), answer_len=7)


def gsm_like(n, vocab=50257, seed=0):
    """GSM8K's shape: ~50-token question, 2 to 5 steps of ~10 tokens, a
    3-token answer."""
    return synthetic_samples(n, vocab, seed, question=(30, 70), n_steps=(2, 5), step_len=(6, 14), answer_len=3)


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
        with open("/proc/cpuinfo") as f:
            hardware = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
        hardware += f", {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return "\n".join([
        f"hardware: {hardware}",
        f"versions: python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"command: python {' '.join(sys.argv)}",
    ])


def default_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

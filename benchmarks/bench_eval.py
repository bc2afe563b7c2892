"""Benchmark 2: evaluation throughput (examples/s) of Coconut.generate at
batch 1, 8, 32, 64 and 128, on the eager path and on the fast path (a static
KV cache and one compiled one-column step, CUDA graphs on a GPU), against the
naive batch-1 path of docs/behaviour.md section 6 (the official code's: the prompt's
latent passes, then the whole prefix recomputed for every new token, no KV
cache). Every example decodes the same number of tokens. A last row runs the
fast path under bf16 autocast (`mixed_precision`).

python benchmarks/bench_eval.py                  # gpt2-small on a GPU, cpu-small on a CPU
python benchmarks/bench_eval.py --examples 256 --naive-examples 16 --fast static
"""

import argparse
import contextlib
import time

import torch
from shapes import PRESETS, build_model, default_device, header, prosqa_like, special_ids, synchronize

from coconut import Coconut
from dataset import MyCollator, get_question_latent_dataset
from utils import Config


class PadTokenizer:
    pad_token_id = 0


@torch.no_grad()
def naive_generate(coconut, input_ids, max_new_tokens):
    """docs/behaviour.md section 6 done naively, batch 1: no cache while decoding."""
    n = input_ids.shape[1]
    out = coconut(input_ids, torch.ones_like(input_ids), None, torch.arange(n, device=input_ids.device)[None])
    embeds, token = out.inputs_embeds, out.logits[0, -1].argmax()
    tokens = [int(token)]
    for _ in range(max_new_tokens - 1):
        embeds = torch.cat([embeds, coconut.embedding(token.view(1, 1))], dim=1)
        token = coconut.base_causallm(inputs_embeds=embeds).logits[0, -1].argmax()
        if int(token) == coconut.eos_token_id:
            break
        tokens.append(int(token))
    return tokens


def throughput(run_batch, prompts, batch_size, device):
    run_batch(prompts[:batch_size])  # warm-up: compiles, if it will, for this shape
    synchronize(device)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        run_batch(prompts[i : i + batch_size])
    synchronize(device)
    return len(prompts) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--examples", type=int, default=None, help="prompts per batched measurement")
    parser.add_argument("--naive-examples", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per example (ProsQA Coconut answers are ~14)")
    parser.add_argument("--batch-sizes", default="1,8,32,64,128")
    parser.add_argument("--fast", choices=("compiled", "static"), default="compiled",
                        help="the fast path's kind: compiled (torch.compile, CUDA graphs on a GPU) or static (no compiling)")
    parser.add_argument("--bf16-batch", type=int, default=64, help="batch size of the bf16-autocast row (0: none)")
    args = parser.parse_args()
    device = default_device()
    preset = args.preset or ("gpt2-small" if device.type == "cuda" else "cpu-small")
    examples = args.examples or (512 if device.type == "cuda" else 128)
    naive_examples = args.naive_examples or (64 if device.type == "cuda" else 8)

    model = build_model(preset, device).eval()
    ids = special_ids(preset)
    # eos -1: no row stops early, so every path decodes exactly --new-tokens
    coconut = Coconut(model, ids["latent"], ids["start"], ids["end"], -1)
    fast = Coconut(model, ids["latent"], ids["start"], ids["end"], -1)  # the same weights
    fast.use_fast_path(compile=args.fast == "compiled")
    torch._dynamo.config.recompile_limit = 64  # one compilation per batch size and precision
    config = Config(c_thought=1, max_latent_stage=6, pad_latent_to_max=True)
    base = prosqa_like(examples, PRESETS[preset]["vocab_size"])
    prompts = list(get_question_latent_dataset(6, base, config, ids["start"], ids["latent"], ids["end"]))
    collator = MyCollator(PadTokenizer(), latent_id=ids["latent"])

    def batched(generator, precision=contextlib.nullcontext):
        def run_batch(rows):
            batch = collator(rows)
            with precision():
                generator.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device), max_new_tokens=args.new_tokens)

        return run_batch

    def naive(rows):
        for row in rows:
            naive_generate(coconut, torch.tensor([row["input_ids"]], device=device), args.new_tokens)

    throughput(naive, prompts[:2], 1, device)  # warm-up
    base = throughput(naive, prompts[:naive_examples], 1, device)
    print(header(device))
    print(f"model: {preset} {PRESETS[preset]}, ProsQA-like prompts (~300 tokens, 6 latents), {args.new_tokens} new tokens each\n")
    print("| path | precision | batch | examples/s | s per example | speed-up vs naive |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| naive, no KV cache | fp32 | 1 | {base:.2f} | {1 / base:.4f} | 1.0x |", flush=True)
    bf16 = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    rows = [("Coconut.generate, KV cache", "fp32", b, batched(coconut)) for b in map(int, args.batch_sizes.split(","))]
    rows += [(f"fast path ({args.fast})", "fp32", b, batched(fast)) for b in map(int, args.batch_sizes.split(","))]
    rows += [(f"fast path ({args.fast})", "bf16-autocast", args.bf16_batch, batched(fast, bf16))] if args.bf16_batch else []
    for path, precision, batch_size, run_batch in rows:
        n = max(examples, batch_size)
        rate = throughput(run_batch, (prompts * (n // len(prompts) + 1))[:n], batch_size, device)
        print(f"| {path} | {precision} | {batch_size} | {rate:.2f} | {1 / rate:.4f} | {rate / base:.1f}x |", flush=True)


if __name__ == "__main__":
    main()

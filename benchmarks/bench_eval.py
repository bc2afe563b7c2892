"""Benchmark 2: evaluation throughput (examples/s) of Coconut.generate at
batch 1, 8, 32, 64 and 128 against the naive batch-1 path of SPEC section 6
(the prompt's latent passes, then the whole prefix recomputed for every new
token, no KV cache). Every example decodes the same number of tokens.

python benchmarks/bench_eval.py                  # gpt2-small on a GPU, cpu-small on a CPU
python benchmarks/bench_eval.py --examples 256 --naive-examples 16
"""

import argparse
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
    """SPEC section 6 done naively, batch 1: no cache while decoding."""
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
    args = parser.parse_args()
    device = default_device()
    preset = args.preset or ("gpt2-small" if device.type == "cuda" else "cpu-small")
    examples = args.examples or (512 if device.type == "cuda" else 128)
    naive_examples = args.naive_examples or (64 if device.type == "cuda" else 8)

    model = build_model(preset, device).eval()
    ids = special_ids(preset)
    # eos -1: no row stops early, so every path decodes exactly --new-tokens
    coconut = Coconut(model, ids["latent"], ids["start"], ids["end"], -1)
    config = Config(c_thought=1, max_latent_stage=6, pad_latent_to_max=True)
    prompts = list(get_question_latent_dataset(6, prosqa_like(examples, PRESETS[preset]["vocab_size"]), config, ids["start"], ids["latent"], ids["end"]))
    collator = MyCollator(PadTokenizer(), latent_id=ids["latent"])

    def batched(rows):
        batch = collator(rows)
        coconut.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device), max_new_tokens=args.new_tokens)

    def naive(rows):
        for row in rows:
            naive_generate(coconut, torch.tensor([row["input_ids"]], device=device), args.new_tokens)

    throughput(naive, prompts[:2], 1, device)  # warm-up
    base = throughput(naive, prompts[:naive_examples], 1, device)
    print(header(device))
    print(f"model: {preset} {PRESETS[preset]}, ProsQA-like prompts (~300 tokens, 6 latents), {args.new_tokens} new tokens each\n")
    print("| path | batch | examples/s | s per example | speed-up vs naive |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| naive, no KV cache | 1 | {base:.2f} | {1 / base:.3f} | 1.0x |", flush=True)
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        n = max(examples, batch_size)
        rate = throughput(batched, (prompts * (n // len(prompts) + 1))[:n], batch_size, device)
        print(f"| Coconut.generate, KV cache | {batch_size} | {rate:.2f} | {1 / rate:.4f} | {rate / base:.1f}x |", flush=True)


if __name__ == "__main__":
    main()

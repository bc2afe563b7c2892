"""Benchmark 1: one Coconut training step (forward + backward) at stages 0, 3
and 6 against one plain forward + backward of the same model over the same
token batch, the limit the latent passes can approach: the eager path, and
the fast path (Coconut.use_fast_path: compiled on a GPU by default), in
float32 and under bf16 autocast (`mixed_precision`); on a GPU also with TF32
matmuls.

python benchmarks/bench_train_step.py                       # gpt2-small on a GPU, cpu-small on a CPU
python benchmarks/bench_train_step.py --preset gpt2-small --repeats 5 --fast static
"""

import argparse
import contextlib

import torch
from shapes import PRESETS, build_model, default_device, header, median_seconds, peak_memory_mib, prosqa_like, reset_peak_memory, special_ids

from coconut import Coconut
from dataset import MyCollator, get_cot_latent_dataset
from utils import Config


class PadTokenizer:
    pad_token_id = 0


def stage_batch(preset, stage):
    ids = special_ids(preset)
    shape = PRESETS[preset]
    samples = prosqa_like(shape["batch"], shape["vocab_size"])
    config = Config(c_thought=1, max_latent_stage=6, pad_latent_to_max=True, uniform_prob=0.0, no_cot=False)
    rows = list(get_cot_latent_dataset(stage, samples, config, ids["start"], ids["latent"], ids["end"]))
    batch = MyCollator(PadTokenizer(), latent_id=ids["latent"])(rows)
    del batch["idx"]
    return batch


def coconut_step(coconut, batch, precision):
    # the plan comes from the CPU batch, as run.py computes it
    inputs = dict(batch, plan=coconut.plan(batch["input_ids"].cpu()))

    def step():
        coconut.zero_grad(set_to_none=True)
        with precision():
            loss = coconut(**inputs).loss
        loss.backward()

    return step


def plain_step(model, batch, precision):
    def step():
        model.zero_grad(set_to_none=True)
        with precision():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten())
        loss.backward()

    return step


def precisions(device, names):
    """name -> context factory: fp32, bf16 autocast, and TF32 matmuls (GPU only)."""
    def tf32():
        matmul = torch.backends.cuda.matmul
        name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)  # torch < 2.9
        before = getattr(matmul, name)
        setattr(matmul, name, value)
        try:
            yield
        finally:
            setattr(matmul, name, before)

    table = {
        "fp32": contextlib.nullcontext,
        "bf16-autocast": lambda: torch.autocast(device.type, dtype=torch.bfloat16),
        "tf32": contextlib.contextmanager(tf32),
    }
    return {name: table[name] for name in names if not (name == "tf32" and device.type != "cuda")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fast", choices=("compiled", "static"), default="compiled",
                        help="the fast path's kind: compiled (torch.compile) or static (no compiling)")
    parser.add_argument("--precisions", default="fp32,bf16-autocast,tf32", help="fp32, bf16-autocast, tf32 (GPU only)")
    parser.add_argument("--stages", default="0,3,6")
    args = parser.parse_args()
    device = default_device()
    preset = args.preset or ("gpt2-small" if device.type == "cuda" else "cpu-small")
    model = build_model(preset, device)
    model.train()
    ids = special_ids(preset)
    coconut = Coconut(model, ids["latent"], ids["start"], ids["end"], ids["eos"])
    fast = Coconut(model, ids["latent"], ids["start"], ids["end"], ids["eos"])  # the same weights, fast path on
    fast.use_fast_path(compile=args.fast == "compiled")
    torch._dynamo.config.recompile_limit = 64  # each stage's pass widths are new shapes

    print(header(device))
    print(f"model: {preset} {PRESETS[preset]}, ProsQA-like lengths, c_thought 1; fast path: {args.fast}\n")
    print("| precision | stage | tokens | max latents | plain step (ms) | Coconut eager (ms) | ratio | Coconut fast (ms) | ratio "
          "| plain peak (MiB) | eager peak (MiB) | fast peak (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, precision in precisions(device, args.precisions.split(",")).items():
        for stage in map(int, args.stages.split(",")):
            batch = {k: v.to(device) for k, v in stage_batch(preset, stage).items()}
            measured = []
            for step in (plain_step(model, batch, precision), coconut_step(coconut, batch, precision), coconut_step(fast, batch, precision)):
                step()  # compiles, if it will, outside the measurement
                reset_peak_memory(device)
                seconds = median_seconds(step, device, args.repeats)
                measured.append((seconds, peak_memory_mib(device)))
            (plain_s, plain_mem), (eager_s, eager_mem), (fast_s, fast_mem) = measured
            n_latent = int((batch["input_ids"] == ids["latent"]).sum(1).max())
            print(
                f"| {name} | {stage} | {tuple(batch['input_ids'].shape)} | {n_latent} | {plain_s * 1e3:.1f} | {eager_s * 1e3:.1f} "
                f"| {eager_s / plain_s:.2f}x | {fast_s * 1e3:.1f} | {fast_s / plain_s:.2f}x | {plain_mem:.0f} | {eager_mem:.0f} | {fast_mem:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

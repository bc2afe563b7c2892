"""Benchmark 1: one Coconut training step (forward + backward) at stages 0, 3
and 6 against one plain forward + backward of the same model over the same
token batch, the limit the latent passes can approach.

python benchmarks/bench_train_step.py                       # gpt2-small on a GPU, cpu-small on a CPU
python benchmarks/bench_train_step.py --preset gpt2-small --repeats 5
"""

import argparse

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


def coconut_step(coconut, batch):
    def step():
        coconut.zero_grad(set_to_none=True)
        coconut(**batch).loss.backward()

    return step


def plain_step(model, batch):
    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
        loss.backward()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = default_device()
    preset = args.preset or ("gpt2-small" if device.type == "cuda" else "cpu-small")
    model = build_model(preset, device)
    model.train()
    ids = special_ids(preset)
    coconut = Coconut(model, ids["latent"], ids["start"], ids["end"], ids["eos"])

    print(header(device))
    print(f"model: {preset} {PRESETS[preset]}, ProsQA-like lengths, c_thought 1\n")
    print("| stage | tokens | max latents | plain step (ms) | Coconut step (ms) | ratio | plain peak (MiB) | Coconut peak (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for stage in (0, 3, 6):
        batch = {k: v.to(device) for k, v in stage_batch(preset, stage).items()}
        measured = []
        for step in (plain_step(model, batch), coconut_step(coconut, batch)):
            reset_peak_memory(device)
            seconds = median_seconds(step, device, args.repeats)
            measured.append((seconds, peak_memory_mib(device)))
        (plain_s, plain_mem), (coco_s, coco_mem) = measured
        n_latent = int((batch["input_ids"] == ids["latent"]).sum(1).max())
        print(
            f"| {stage} | {tuple(batch['input_ids'].shape)} | {n_latent} | {plain_s * 1e3:.1f} | {coco_s * 1e3:.1f} "
            f"| {coco_s / plain_s:.2f}x | {plain_mem:.0f} | {coco_mem:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

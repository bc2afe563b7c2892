"""Benchmark 4: run.py's own training speed, in optimizer steps per second
as run.py prints them for an epoch (data loading, the step, logging, the
progress bar: everything but evaluation), on the quickstart's modsum task,
for the quickstart model (1-layer GPT-2, 96 wide) and a GPT-2-small shape
(12 layers, 768 wide, 12 heads; the task's small vocabulary), at stage 0
(all steps written, no thoughts) and at the final stage (15 thoughts, no
step written), with each fast_path and precision asked for.

Each figure is the second epoch of a two-epoch run (`debug: True`: no
checkpoints, no wandb), so that compiling, which happens in the first, is
left out.

python benchmarks/bench_run.py           # both models on a GPU, the quickstart model on a CPU
python benchmarks/bench_run.py --models quickstart,gpt2-small --fast-paths eager,static,compiled \\
       --precisions fp32,mixed --samples 3200 [--out runs/bench-run]
"""

import argparse
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

from quickstart_seeds import MODEL_ARGS, script  # noqa: E402
from shapes import default_device, header  # noqa: E402

MODELS = {
    "quickstart": MODEL_ARGS,
    "gpt2-small": ["--n-layer", "12", "--n-embd", "768", "--n-head", "12"],
}
# stage 0 for two epochs, or the final stage (all five steps as 15 thoughts) from the first epoch
STAGES = {"0": ["epochs_per_stage=2"], "final": ["no_curriculum=True", "uniform_prob=0"]}
PRECISIONS = {"fp32": [], "mixed": ["mixed_precision=True"]}


def prepare(out, samples, models):
    """The task's data (one folder per sample count) and each model's
    folder, made once under `out`."""
    data = os.path.join(out, f"data-{samples}")
    if not os.path.exists(os.path.join(data, "modsum_train.json")):
        script("tasks.py", "modsum", "--train", samples, "--valid", 32, "--test", 0, "--min-hops", 5, "--max-hops", 5, "--out-dir", data)
    for name in models:
        folder = os.path.join(out, name)
        if not os.path.isdir(folder):
            script("tiny_model.py", os.path.join(data, "modsum_train.json"), "--out", folder, *MODELS[name])
    return data


def steps_per_second(out, data, model, stage, fast_path, precision):
    """The second epoch's steps/s of one run.py training."""
    name = f"{model}-{stage}-{fast_path}-{precision}"
    command = [
        sys.executable, os.path.join(REPO, "run.py"), os.path.join(REPO, "args", "quickstart.yaml"),
        f"model_id={os.path.join(out, model)}", f"train_path={os.path.join(data, 'modsum_train.json')}",
        f"val_path={os.path.join(data, 'modsum_valid.json')}", f"save_path={out}", f"name={name}",
        "debug=True", "num_epochs=2", f"fast_path={fast_path}", *STAGES[stage], *PRECISIONS[precision],
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=out, env=dict(os.environ, WANDB_MODE="disabled"))
    found = re.search(r"^Epoch 2: (\d+) optimizer steps in ([\d.]+) s \(([\d.]+) steps/s\)$", result.stdout, re.M)
    if result.returncode or not found:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"failed ({tail[:120]})"
    return float(found.group(3))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    device = default_device()
    gpu = device.type == "cuda"
    parser.add_argument("--models", default="quickstart,gpt2-small" if gpu else "quickstart")
    parser.add_argument("--stages", default="0,final")
    parser.add_argument("--fast-paths", default="eager,compiled" if gpu else "eager,static,compiled")
    parser.add_argument("--precisions", default="fp32,mixed" if gpu else "fp32")
    parser.add_argument("--samples", type=int, default=6400, help="training samples (batch 32: samples / 32 steps an epoch)")
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "bench-run"))
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        sys.exit(f"error: --models: unknown model {unknown[0]!r} (choose from {', '.join(MODELS)})")
    os.makedirs(args.out, exist_ok=True)
    data = prepare(args.out, args.samples, models)

    print(header(device))
    print(f"task: modsum, 5 digits, {args.samples} training samples, batch 32 ({args.samples // 32} steps an epoch); "
          "the second epoch's steps/s as run.py prints it\n")
    print("| model | stage | fast_path | precision | steps/s |")
    print("| --- | --- | --- | --- | --- |")
    for model in models:
        for stage in args.stages.split(","):
            for fast_path in args.fast_paths.split(","):
                for precision in args.precisions.split(","):
                    rate = steps_per_second(args.out, data, model, stage, fast_path, precision)
                    shown = f"{rate:.1f}" if isinstance(rate, float) else rate
                    print(f"| {model} | {stage} | {fast_path} | {precision} | {shown} |", flush=True)


if __name__ == "__main__":
    main()

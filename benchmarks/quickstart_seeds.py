"""How robust the quickstart is: its whole recipe (data, model, the Coconut
run, the No-CoT and CoT baselines) over several seeds and CPU thread counts,
with a table of the validation accuracy at the end of every stage.

python benchmarks/quickstart_seeds.py [--seeds 0,1,2,3,4] [--threads 1,2]
       [--runs coconut,nocot,cot] [--jobs 1] [--out runs/quickstart-seeds]
       [key=value ...]

Seed s generates the data with `tasks.py --seed s`, builds the model with
`tiny_model.py --seed s` and trains with `seed=s`; each (seed, threads) pair
trains in its own folder under --out, with OMP_NUM_THREADS set to the thread
count (on a GPU machine run.py uses the GPU and the count only changes the
CPU side). `key=value` words are passed to every run (e.g. num_epochs=4).
--jobs N keeps up to N threads busy (on 2 cores, --jobs 2 trains two
1-thread runs at once and 2-thread runs one by one); the times in the table
are then those of runs sharing the machine. The
table is printed and written to <out>/table.md, the figures to table.json.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]  # metrics, and shapes beside this file (also when imported by a test)

import metrics  # noqa: E402

# the quickstart's data and model (README, Quickstart; a test keeps them equal)
TASK_ARGS = ["modsum", "--train", "24000", "--valid", "500", "--test", "0", "--min-hops", "5", "--max-hops", "5"]
MODEL_ARGS = ["--n-layer", "1", "--n-embd", "96", "--n-inner", "192", "--activation", "relu"]
CONFIGS = {"coconut": "args/quickstart.yaml", "nocot": "args/quickstart_nocot.yaml", "cot": "args/quickstart_cot.yaml"}


def script(name, *args):
    """Run a preprocessing script quietly; stop with its error line if it fails."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "preprocessing", name), *map(str, args)],
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"error: {name}: {result.stderr.strip().splitlines()[-1]}")


def prepare(folder, seed):
    """The seed's data files and model, made once and shared by its thread counts."""
    data, model = os.path.join(folder, "data"), os.path.join(folder, "model")
    if not os.path.isdir(model):
        script("tasks.py", *TASK_ARGS, "--seed", seed, "--out-dir", data)
        script("tiny_model.py", os.path.join(data, "modsum_train.json"), "--out", model, *MODEL_ARGS, "--seed", seed)
    return data, model


def train(kind, seed, threads, data, model, folder, overrides):
    """One run.py training from scratch (an earlier run in its folder is
    removed); returns (accuracy by stage, seconds)."""
    save_path = os.path.join(folder, f"threads{threads}")
    log = os.path.join(save_path, f"{kind}.log")
    shutil.rmtree(os.path.join(save_path, kind), ignore_errors=True)
    os.makedirs(save_path, exist_ok=True)
    command = [
        sys.executable, os.path.join(REPO, "run.py"), os.path.join(REPO, CONFIGS[kind]), f"seed={seed}",
        f"model_id={model}", f"train_path={os.path.join(data, 'modsum_train.json')}",
        f"val_path={os.path.join(data, 'modsum_valid.json')}", f"save_path={save_path}", f"name={kind}", *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("WANDB_MODE", "disabled")
    start = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    seconds = time.monotonic() - start
    if code:
        sys.exit(f"error: {kind} run, seed {seed}, {threads} threads, failed (exit {code}); see {log}")
    rows = metrics.accuracy_by_stage(metrics.read(os.path.join(save_path, kind, metrics.TRAIN_FILE)))
    return {stage: acc for stage, _, acc in rows}, seconds


def table(results, kinds):
    """Markdown: one row per (seed, threads); Coconut's stages, then the baselines."""
    n_stages = 1 + max((max(r["coconut"][0]) for r in results.values() if "coconut" in r), default=0)
    head = ["seed", "threads"]
    if "coconut" in kinds:
        head += [f"Coconut stage {s}" for s in range(n_stages)]
    head += [{"nocot": "No-CoT", "cot": "CoT"}[k] for k in kinds if k != "coconut"]
    head += ["minutes (" + " + ".join(kinds) + ")"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (seed, threads), runs in sorted(results.items()):
        cells = [str(seed), str(threads)]
        if "coconut" in kinds:
            stages = runs["coconut"][0]
            cells += [f"{stages[s]:.3f}" if s in stages else "" for s in range(n_stages)]
        cells += [f"{runs[k][0][0]:.3f}" for k in kinds if k != "coconut"]
        cells.append(" + ".join(f"{runs[k][1] / 60:.1f}" for k in kinds))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="The quickstart recipe over seeds and thread counts.")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", default="coconut,nocot,cot", help="which of coconut, nocot, cot to train")
    parser.add_argument("--jobs", type=int, default=1, help="threads busy at once: --jobs 2 trains two 1-thread runs together")
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "quickstart-seeds"))
    parser.add_argument("overrides", nargs="*", help="key=value words passed to every run")
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error("--seeds and --threads are comma-separated integers")
    args.runs = args.runs.split(",")
    if not set(args.runs) <= set(CONFIGS):
        parser.error(f"--runs: choose from {', '.join(CONFIGS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from shapes import default_device, header

    machine = header(default_device())
    print(machine)
    folders = {seed: os.path.join(args.out, f"seed{seed}") for seed in args.seeds}
    sources = {seed: prepare(folder, seed) for seed, folder in folders.items()}
    results = {}
    for threads in args.threads:
        # at most --jobs threads busy: more would make every run wait on the others
        jobs = [(kind, seed, threads) for seed in args.seeds for kind in args.runs]
        with ThreadPoolExecutor(max_workers=max(1, args.jobs // threads)) as pool:
            futures = {job: pool.submit(train, *job, *sources[job[1]], folders[job[1]], args.overrides) for job in jobs}
            for (kind, seed, _), future in futures.items():
                results.setdefault((seed, threads), {})[kind] = future.result()
                print(f"seed {seed}, {threads} threads, {kind}: {future.result()[0]}", flush=True)
    text = table(results, args.runs)
    print(text)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(machine + "\n\n" + text + "\n")
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump([{"seed": s, "threads": t, **{k: {"accuracy": v[0], "seconds": v[1]} for k, v in runs.items()}}
                   for (s, t), runs in sorted(results.items())], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

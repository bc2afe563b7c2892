#!/usr/bin/env bash
# Every GPU row of benchmarks/RESULTS.md in one command, for a machine with
# one GPU (torch, transformers, tokenizers, tqdm, pyyaml; wandb and datasets
# are not needed): each benchmark under its own time limit, each table
# written to $OUT (default runs/gpu-bench). About 10 minutes on an H100/H200.
#
#   OUT=/tmp/gpu-bench bash benchmarks/gpu_all.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-bench}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
timeout 240 python benchmarks/bench_train_step.py > "$OUT/1_train_step.md" 2>&1; echo "train step: exit $?"
timeout 150 python benchmarks/bench_eval.py > "$OUT/2_eval.md" 2>&1; echo "eval: exit $?"
timeout 240 python benchmarks/bench_run.py --out "$OUT/run" > "$OUT/4_run.md" 2>&1; echo "run.py: exit $?"

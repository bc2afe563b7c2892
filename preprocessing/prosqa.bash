#!/usr/bin/env bash
# ProsQA (facebookresearch/coconut): download the train/valid/test files,
# already in the project format, into data/ and check their shape. Needs the
# internet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BASE=https://raw.githubusercontent.com/facebookresearch/coconut/main/data

source preprocessing/fetch.sh

mkdir -p data
for split in train valid test; do
    fetch "$BASE/prosqa_$split.json" "data/prosqa_$split.json"
done

# A wrong download (an HTML error page, a changed upstream format) should fail
# here, not at the start of a training run: the project's own data check.
for split in train valid test; do
    "$PYTHON" -c 'import sys; from dataset import load_samples, UserError
try:
    print(f"{sys.argv[1]}: {len(load_samples(sys.argv[1]))} samples")
except UserError as e:
    sys.exit(f"error: {e}; delete it and run again")' "data/prosqa_$split.json"
done

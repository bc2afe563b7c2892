#!/usr/bin/env bash
# GSM8K augmented set (implicit-CoT, da03/Internalize_CoT_Step_by_Step):
# download the raw train/valid/test splits into data/raw/, then convert each
# to data/gsm_{train,valid,test}.json. Needs the internet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Pinned commit so the data cannot change under a published config.
BASE=https://media.githubusercontent.com/media/da03/Internalize_CoT_Step_by_Step/e06a32ee5e4cd117171daeb4755d2a97ece62761/data/gsm8k

source preprocessing/fetch.sh

mkdir -p data/raw
for split in train valid test; do
    fetch "$BASE/$split.txt" "data/raw/gsm_$split.txt"
    "$PYTHON" preprocessing/gsm_icot.py "$split" --src "data/raw/gsm_$split.txt" --out "data/gsm_$split.json"
done

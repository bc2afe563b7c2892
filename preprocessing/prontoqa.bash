#!/usr/bin/env bash
# ProntoQA (5-hop, fictional ontology, asaparov/prontoqa): download the
# generator output into data/raw/, then split and convert it to
# data/prontoqa_{train,valid,test}.json (9000/200/rest). Needs the internet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
URL=https://raw.githubusercontent.com/asaparov/prontoqa/main/generated_ood_data/5hop_0shot_random.json
RAW=data/raw/5hop_0shot_random.json

source preprocessing/fetch.sh

mkdir -p data/raw
fetch "$URL" "$RAW"
"$PYTHON" preprocessing/prontoqa.py --src "$RAW" --out-dir data

#!/usr/bin/env bash
# ProntoQA (5-hop, fictional ontology, asaparov/prontoqa): download the
# generator output into data/raw/, then split and convert it to
# data/prontoqa_{train,valid,test}.json (9000/200/rest). Needs the internet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
URL=https://raw.githubusercontent.com/asaparov/prontoqa/main/generated_ood_data/5hop_0shot_random.json
RAW=data/raw/5hop_0shot_random.json

fetch() {  # URL DEST; via a .tmp name so an interrupted download is never taken as done
    if [ -s "$2" ]; then echo "$2: already there, skipping download"; return; fi
    if command -v curl >/dev/null; then curl -fL --retry 3 -o "$2.tmp" "$1"
    elif command -v wget >/dev/null; then wget -q -O "$2.tmp" "$1"
    else echo "error: need curl or wget" >&2; exit 1; fi
    mv "$2.tmp" "$2"
}

mkdir -p data/raw
fetch "$URL" "$RAW"
"$PYTHON" preprocessing/prontoqa.py --src "$RAW" --out-dir data

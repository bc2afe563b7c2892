#!/usr/bin/env bash
# GSM8K augmented set (implicit-CoT, da03/Internalize_CoT_Step_by_Step):
# download the raw train/valid/test splits into data/raw/, then convert each
# to data/gsm_{train,valid,test}.json. Needs the internet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Pinned commit so the data cannot change under a published config.
BASE=https://media.githubusercontent.com/media/da03/Internalize_CoT_Step_by_Step/e06a32ee5e4cd117171daeb4755d2a97ece62761/data/gsm8k

fetch() {  # URL DEST; via a .tmp name so an interrupted download is never taken as done
    if [ -s "$2" ]; then echo "$2: already there, skipping download"; return; fi
    if command -v curl >/dev/null; then curl -fL --retry 3 -o "$2.tmp" "$1"
    elif command -v wget >/dev/null; then wget -q -O "$2.tmp" "$1"
    else echo "error: need curl or wget" >&2; exit 1; fi
    mv "$2.tmp" "$2"
}

mkdir -p data/raw
for split in train valid test; do
    fetch "$BASE/$split.txt" "data/raw/gsm_$split.txt"
    "$PYTHON" preprocessing/gsm_icot.py "$split" --src "data/raw/gsm_$split.txt" --out "data/gsm_$split.json"
done

#!/usr/bin/env bash
# ProsQA (facebookresearch/coconut): download the train/valid/test files,
# already in the project format, into data/ and check their shape. Needs the
# internet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BASE=https://raw.githubusercontent.com/facebookresearch/coconut/main/data

fetch() {  # URL DEST; via a .tmp name so an interrupted download is never taken as done
    if [ -s "$2" ]; then echo "$2: already there, skipping download"; return; fi
    if command -v curl >/dev/null; then curl -fL --retry 3 -o "$2.tmp" "$1"
    elif command -v wget >/dev/null; then wget -q -O "$2.tmp" "$1"
    else echo "error: need curl or wget" >&2; exit 1; fi
    mv "$2.tmp" "$2"
}

mkdir -p data
for split in train valid test; do
    fetch "$BASE/prosqa_$split.json" "data/prosqa_$split.json"
done

# A wrong download (an HTML error page, a changed upstream format) should fail
# here, not at the start of a training run.
"$PYTHON" - data/prosqa_{train,valid,test}.json <<'PY'
import json, sys
for path in sys.argv[1:]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        sys.exit(f"error: {path}: not valid JSON ({e}); delete it and run again")
    ok = isinstance(data, list) and all(
        isinstance(s, dict) and isinstance(s.get("question"), str) and isinstance(s.get("answer"), str)
        and isinstance(s.get("steps"), list) and all(isinstance(t, str) for t in s["steps"])
        for s in data)
    if not ok:
        sys.exit(f"error: {path}: not a JSON list of {{question: str, answer: str, steps: [str]}}; delete it and run again")
    print(f"{path}: {len(data)} samples")
PY

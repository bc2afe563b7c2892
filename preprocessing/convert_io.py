"""Shared by the preprocessing scripts: the atomic JSON write. (Their
command-line parser and bad-input error are utils.ArgumentParser and
utils.UserError, as for run.py.)"""

import json
import os
import tempfile


def write_json_atomic(data, out):
    """Write to a temp file beside `out`, then rename, so a failed run never
    leaves a half-written data file behind."""
    folder = os.path.dirname(out) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(out) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise

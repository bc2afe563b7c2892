"""Shared by the converters: the bad-input error and the atomic JSON write."""

import json
import os
import tempfile


class ConvertError(Exception):
    """Bad input; a converter's main() prints it as one line instead of a traceback."""


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

"""Shared by the preprocessing scripts: the bad-input error, the command-line
parser and the atomic JSON write."""

import argparse
import json
import os
import tempfile


class ConvertError(Exception):
    """Bad input; a converter's main() prints it as one line instead of a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, as every other bad input's, with exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


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

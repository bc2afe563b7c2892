"""Checks on the documentation, with no network and no model:

- the config-key tables of README.md and docs/config.md list exactly the
  keys of utils.CONFIG_KEYS, each with its type and default, and every row
  of docs/config.md's table is the one utils.RunConfig's field gives;
- every relative link in README.md and docs/*.md names a file or folder
  that exists in the repository (web links and the part after "#" are not
  checked);
- README.md stays at most 12 KiB (long notes belong in docs/).

python -m pytest -q tests/test_docs.py
"""

import glob
import os
import re
from dataclasses import MISSING, fields

import pytest
from helpers import REPO

from utils import CONFIG_KEYS, REQUIRED, RunConfig

README = os.path.join(REPO, "README.md")
DOC_PAGES = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def key_rows(path):
    """The rows "| `key` | type | default | meaning |" of the page's table
    that starts with "| key |"."""
    text = read(path)
    table = text[text.index("\n| key | type | default | meaning |"):].split("\n\n", 1)[0]
    return [line for line in table.splitlines() if line.startswith("| `")]


def key_table(path):
    """{key: (type cell, default cell)} of the page's key table."""
    rows = {}
    for line in key_rows(path):
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        key = cells[0].strip("`")
        assert key not in rows, f"{path}: key {key} listed twice"
        rows[key] = (cells[1], cells[2].replace("`", "").replace("*", ""))
    return rows


def default_ok(default, cell):
    """The table's default cell against CONFIG_KEYS: *required* for required
    keys; else its first word is the default (numbers compared as numbers,
    the empty string shown as "empty"); a note may follow in brackets."""
    if default is REQUIRED:
        return cell.startswith("required")
    first = cell.split()[0]
    if isinstance(default, bool):
        return first == str(default)
    if isinstance(default, (int, float)):
        try:
            return float(first) == default
        except ValueError:
            return False
    return first == (default if default != "" else "empty")


@pytest.mark.parametrize("page", ["README.md", "docs/config.md"])
def test_key_table_matches_config_keys(page):
    rows = key_table(os.path.join(REPO, page))
    assert sorted(rows) == sorted(CONFIG_KEYS), f"{page}: keys differ from utils.CONFIG_KEYS"
    for key, (kind, default, _) in CONFIG_KEYS.items():
        type_cell, default_cell = rows[key]
        assert type_cell == kind.__name__, f"{page}: {key} has type {type_cell}, CONFIG_KEYS says {kind.__name__}"
        assert default_ok(default, default_cell), f"{page}: {key} shows default {default_cell!r}, CONFIG_KEYS says {default!r}"


def test_default_rule_catches_a_wrong_default():
    assert default_ok(1e-4, "1e-4") and not default_ok(1e-4, "1e-3")
    assert default_ok(False, "False") and not default_ok(False, "True")
    assert default_ok("None", "None (required with only_eval)") and not default_ok("auto", "eager")
    assert default_ok("", "empty") and default_ok(REQUIRED, "required") and not default_ok(REQUIRED, "0")


def field_row(spec):
    """docs/config.md's row for a RunConfig field: its key, type, default (and
    the note on it) and meaning, as the field defines them."""
    kind, default, meaning = CONFIG_KEYS[spec.name]
    if spec.default is MISSING:
        cell = "*required*"
    elif isinstance(default, str):
        cell = f"`{default}`" if default else "empty"
    else:
        cell = repr(default)
    note = spec.metadata["note"]
    return f"| `{spec.name}` | {kind.__name__} | {cell}{f' ({note})' if note else ''} | {meaning} |"


def test_config_page_rows_are_the_runconfig_fields():
    rows = key_rows(os.path.join(REPO, "docs", "config.md"))
    expected = [field_row(spec) for spec in fields(RunConfig)]
    assert rows == expected, "docs/config.md's key table differs from RunConfig; its rows should read:\n" + "\n".join(expected)


@pytest.mark.parametrize("page", [README] + DOC_PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_exist(page):
    missing = []
    for target in LINK.findall(read(page)):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#", 1)[0]))
        if not os.path.exists(path):
            missing.append(target)
    assert not missing, f"{os.path.relpath(page, REPO)}: links to missing files: {missing}"


def test_readme_is_short():
    size = os.path.getsize(README)
    assert size <= 12 * 1024, f"README.md is {size} bytes; move long notes to docs/"

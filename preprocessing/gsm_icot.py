"""GSM8K (implicit-CoT augmented set) -> project JSON format.

Owns the conversion of one raw split, one example a line:
    question||step1 step2 ... #### answer
into a JSON list of {"question": str, "steps": [str], "answer": str}.

Usage: python preprocessing/gsm_icot.py SPLIT [--src FILE] [--out FILE]
(defaults: data/raw/gsm_SPLIT.txt -> data/gsm_SPLIT.json).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import ArgumentParser, UserError, write_json_atomic  # noqa: E402


def parse_gsm_line(line):
    """Parse one raw line into a sample dict; raises ValueError if malformed."""
    line = line.rstrip("\r\n")
    if "||" not in line:
        raise ValueError("missing '||' between question and steps")
    question, _, rest = line.partition("||")
    if "##" not in rest:
        raise ValueError("missing '####' before the answer")
    steps = rest.split("##")[0].strip()
    # The answer is after the LAST '##' so '####' (and any stray '##') is skipped.
    answer = rest.rsplit("##", 1)[1].strip()
    # split on single spaces exactly as the reference converter: a line with
    # no steps gives [""], and the question keeps its own spacing
    return {"question": question, "steps": steps.split(" "), "answer": answer}


def convert_gsm(src, out):
    """Convert the whole file `src` and write `out`; returns the sample count.
    Nothing is written unless every line parses."""
    try:
        with open(src, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{src}: cannot read: {e.strerror if isinstance(e, OSError) else e}") from None
    samples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            samples.append(parse_gsm_line(line))
        except ValueError as e:
            raise UserError(f"{src}:{number}: {e}") from None
    write_json_atomic(samples, out)
    return len(samples)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("split", help="split name, e.g. train, valid or test")
    parser.add_argument("--src", help="raw file (default: data/raw/gsm_SPLIT.txt)")
    parser.add_argument("--out", help="output JSON (default: data/gsm_SPLIT.json)")
    try:
        args = parser.parse_args(argv)
        out = args.out or f"data/gsm_{args.split}.json"
        n = convert_gsm(args.src or f"data/raw/gsm_{args.split}.txt", out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{out}: {n} samples")


if __name__ == "__main__":
    main()

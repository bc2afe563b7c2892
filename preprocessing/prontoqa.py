"""ProntoQA (5-hop, fictional ontology) generator output -> project JSON format.

Owns the conversion of the generator's JSON object {name: {"test_example":
{question, query, chain_of_thought, answer}, ...}} into train/valid/test
lists of {"question": str, "steps": [str], "answer": str}, split in file order.

Usage: python preprocessing/prontoqa.py [--src data/raw/5hop_0shot_random.json]
       [--out-dir data] [--n-train 9000] [--n-valid 200]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import ArgumentParser, UserError, write_json_atomic  # noqa: E402


def convert_example(example):
    """One generator entry -> sample dict; raises ValueError if malformed."""
    if not isinstance(example, dict) or not isinstance(example.get("test_example"), dict):
        raise ValueError("missing 'test_example' object")
    test = example["test_example"]
    for key in ("question", "query", "answer"):
        if not isinstance(test.get(key), str):
            raise ValueError(f"test_example: missing or non-string '{key}'")
    cot = test.get("chain_of_thought")
    if not isinstance(cot, list) or not all(isinstance(s, str) for s in cot):
        raise ValueError("test_example: 'chain_of_thought' missing or not a list of strings")
    # Each reasoning hop is two sentences (a fact, then the rule applied), so
    # pairs make one step per hop.
    steps = [" ".join(cot[i:i + 2]) for i in range(0, len(cot), 2)]
    return {"question": test["question"] + " " + test["query"], "steps": steps, "answer": test["answer"]}


def convert_prontoqa(src, out_dir, n_train=9000, n_valid=200):
    """Convert `src` into out_dir/prontoqa_{train,valid,test}.json; returns
    {split: count}. Nothing is written unless every example converts."""
    try:
        with open(src, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise UserError(f"{src}: cannot read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{src}:{e.lineno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{src}: cannot read: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{src}: top level is a JSON {type(data).__name__}, expected an object of examples")
    samples = []
    for key, example in data.items():
        try:
            samples.append(convert_example(example))
        except ValueError as e:
            raise UserError(f"{src}: example {key}: {e}") from None
    # An empty test split would only surface later as a broken evaluation run.
    if len(samples) <= n_train + n_valid:
        raise UserError(f"{src}: only {len(samples)} examples, need more than {n_train} + {n_valid} to leave a test split")
    splits = {
        "train": samples[:n_train],
        "valid": samples[n_train:n_train + n_valid],
        "test": samples[n_train + n_valid:],
    }
    for name, part in splits.items():
        write_json_atomic(part, os.path.join(out_dir, f"prontoqa_{name}.json"))
    return {name: len(part) for name, part in splits.items()}


def count(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", default="data/raw/5hop_0shot_random.json", help="generator output JSON")
    parser.add_argument("--out-dir", default="data", help="folder for prontoqa_{train,valid,test}.json")
    parser.add_argument("--n-train", type=count, default=9000, help="first N examples go to train")
    parser.add_argument("--n-valid", type=count, default=200, help="next N examples go to valid; the rest to test")
    try:
        args = parser.parse_args(argv)
        sizes = convert_prontoqa(args.src, args.out_dir, args.n_train, args.n_valid)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, n in sizes.items():
        print(f"{os.path.join(args.out_dir, f'prontoqa_{name}.json')}: {n} samples")


if __name__ == "__main__":
    main()

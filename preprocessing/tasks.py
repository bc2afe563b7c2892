"""Built-in reasoning tasks, generated offline in the project's JSON format
({"question", "steps", "answer"}), so Coconut can be tried without downloads.

- graph: ProsQA-style. A random DAG of made-up concepts stated as facts
  "Every X is a Y.", a start fact "Alex is a X.", and the question "Is Alex
  a A or B?" where exactly one of A, B is reachable from X. Steps are the
  facts along the path; the answer is "Alex is a A.". Samples carry the
  graph as ProsQA does (idx_to_symbol, edges, root, target, neg_target).
  --fact-order sorted lists one fact about each of a fixed set of concepts,
  sorted by subject, instead of ProsQA's random order.
- pointer: a shuffled list of links "ka -> mo."; follow k of them from a
  start. Steps are the hops; the answer is where the chain ends.
- multiply: multi-digit multiplication; steps are the partial products.
- modsum: the sum of a row of digits modulo M ("Sum mod 10: 37294"); step
  k is the k-th digit and the running sum ("33", "70", "22", ...). The answer is
  independent of every proper subset of the digits (parity is M = 2), so without steps a
  model gets no partial credit to learn from, while each step is one
  addition of two digits.

Usage: python preprocessing/tasks.py {graph,pointer,multiply,modsum} [--seed 0]
       [--train N] [--valid N] [--test N] [--out-dir data] [task options]
writes <out-dir>/<task>_{train,valid,test}.json. The same seed and sizes give
the same files; no question appears in two splits.
"""

import itertools
import os
import random
import sys

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import ArgumentParser, UserError, write_json_atomic  # noqa: E402

PEOPLE = ("Alex", "Sam", "Max", "Tom", "Eva", "Ivy", "Leo", "Mia", "Ada", "Ben")
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y", "z", "br", "gr", "sk", "tr", "zh")
VOWELS = ("a", "e", "i", "o", "u")
ENDINGS = ("mpus", "rpus", "ngus", "lbus", "rkus", "ffus", "ssa", "mbo", "rn", "x")


def concept_names(rng, count):
    """`count` distinct made-up concept names ("wumpus", "brelbus", ...)."""
    every = [o + v + e for o, v, e in itertools.product(ONSETS, VOWELS, ENDINGS)]
    if count > len(every):
        raise UserError(f"--concepts: at most {len(every)} names can be made, asked for {count}")
    return rng.sample(every, count)


# --------------------------------------------------------------------- graph
def graph_sample(rng, path, other, extra, sort_facts):
    """Two disjoint chains `path` and `other` (concept lists, the last of each
    an option), the start at path[0]. Each `extra` concept points into either
    chain (never at the start), so it changes no reachability from the start
    but hides which chain is which. Without the steps, telling the options
    apart means composing one lookup per hop."""
    edges = list(zip(path, path[1:])) + list(zip(other, other[1:]))
    edges += [(name, rng.choice(path[1:] + other[1:])) for name in extra]
    if sort_facts:
        edges.sort()
    else:
        rng.shuffle(edges)
    person = rng.choice(PEOPLE)
    options = [path[-1], other[-1]]
    rng.shuffle(options)
    facts = " ".join(f"Every {a} is a {b}." for a, b in edges)
    chosen = path + other + extra
    index = {name: i for i, name in enumerate(chosen)}
    return {
        "question": f"{facts} {person} is a {path[0]}. Is {person} a {options[0]} or {options[1]}?",
        "steps": [f"Every {a} is a {b}." for a, b in zip(path, path[1:])],
        "answer": f"{person} is a {path[-1]}.",
        "idx_to_symbol": chosen,
        "edges": [[index[a], index[b]] for a, b in edges],
        "root": index[path[0]],
        "target": index[path[-1]],
        "neg_target": index[other[-1]],
    }


def shuffled_graph(rng, names, hops, distractors):
    """ProsQA's layout: the concepts of each sample are drawn from `names`,
    the facts come in random order."""
    chosen = rng.sample(names, 2 * (hops + 1) + distractors)
    path, other, extra = chosen[: hops + 1], chosen[hops + 1 : 2 * hops + 2], chosen[2 * hops + 2 :]
    return graph_sample(rng, path, other, extra, sort_facts=False)


def sorted_graph(rng, subjects, options, hops):
    """The knowledge-base layout: every sample states one fact about each of
    the same `subjects`, sorted by subject, and the chains end in two of
    `options`, concepts that are never a subject. Finding a fact is then
    finding its place in a fixed list, which a tiny model learns far sooner
    than a lookup by content, while the path through the facts is as random
    as in ProsQA's layout."""
    order = rng.sample(subjects, len(subjects))
    ends = rng.sample(options, 2)
    path, other = order[:hops] + ends[:1], order[hops : 2 * hops] + ends[1:]
    return graph_sample(rng, path, other, order[2 * hops :], sort_facts=True)


def generate_graph(rng, min_hops=3, max_hops=4, distractors=2, concepts=40, fact_order="shuffled"):
    names = concept_names(rng, concepts)
    if fact_order == "sorted":
        subjects = 2 * max_hops + distractors
        if concepts < subjects + 2:
            raise UserError(
                f"--concepts: {concepts} names are too few for {subjects} subjects ({max_hops} hops, {distractors} distractors) and 2 options"
            )
        subjects, options = sorted(names[:subjects]), names[subjects:]
        return lambda: sorted_graph(rng, subjects, options, rng.randint(min_hops, max_hops))
    if concepts < 2 * (max_hops + 1) + distractors:
        raise UserError(f"--concepts: {concepts} names are too few for {max_hops} hops and {distractors} distractors")
    return lambda: shuffled_graph(rng, names, rng.randint(min_hops, max_hops), distractors)


# ------------------------------------------------------------------- pointer
def pointer_sample(rng, names, hops, variables):
    """Every variable links to one other; the start's first `hops` links visit
    distinct variables, so each hop is one lookup in the list."""
    chosen = rng.sample(names, variables)
    path = chosen[: hops + 1]
    links = dict(zip(path, path[1:]))
    for name in chosen:
        links.setdefault(name, rng.choice([c for c in chosen if c != name]))
    listed = list(links.items())
    rng.shuffle(listed)
    text = " ".join(f"{a} -> {b}." for a, b in listed)
    return {
        "question": f"{text} Start at {path[0]} and follow {hops} links.",
        "steps": [f"{a} -> {b}." for a, b in zip(path, path[1:])],
        "answer": path[-1],
    }


def generate_pointer(rng, min_hops=3, max_hops=4, variables=12):
    if variables < max_hops + 1:
        raise UserError(f"--variables: {variables} are too few for {max_hops} hops")
    names = ["".join(p) for p in itertools.product("bdfgklmnprstvz", "aeiou")]
    return lambda: pointer_sample(rng, names, rng.randint(min_hops, max_hops), variables)


# ------------------------------------------------------------------ multiply
def multiply_sample(rng, digits_a, digits_b):
    """a * b with one step per digit of b: the partial product of that digit
    at its place value."""
    a = rng.randint(10 ** (digits_a - 1), 10**digits_a - 1)
    b = rng.randint(10 ** (digits_b - 1), 10**digits_b - 1)
    steps = []
    for place, digit in enumerate(reversed(str(b))):
        factor = int(digit) * 10**place
        steps.append(f"{a} * {factor} = {a * factor}")
    return {"question": f"What is {a} * {b}?", "steps": steps, "answer": str(a * b)}


def generate_multiply(rng, digits_a=3, digits_b=2):
    if min(digits_a, digits_b) < 1:
        raise UserError("--digits-a and --digits-b must be at least 1")
    return lambda: multiply_sample(rng, digits_a, digits_b)


# -------------------------------------------------------------------- modsum
def modsum_sample(rng, terms, modulus):
    """`terms` digits below `modulus`. Step k is two digits: the k-th digit of
    the question, then the sum of the first k digits modulo `modulus`
    ("Sum mod 10: 347" has steps "33", "47", "74"): every step reads one
    digit and adds it to the previous step's sum."""
    digits = [rng.randrange(modulus) for _ in range(terms)]
    steps, total = [], 0
    for digit in digits:
        total = (total + digit) % modulus
        steps.append(f"{digit}{total}")
    return {"question": f"Sum mod {modulus}: {''.join(map(str, digits))}", "steps": steps, "answer": str(total)}


def generate_modsum(rng, min_hops=3, max_hops=4, modulus=10):
    """One step per digit: a sample has min_hops to max_hops digits."""
    if not 2 <= modulus <= 10:
        raise UserError(f"--modulus must be between 2 and 10 (digits are single characters), got {modulus}")
    return lambda: modsum_sample(rng, rng.randint(min_hops, max_hops), modulus)


GENERATORS = {"graph": generate_graph, "pointer": generate_pointer, "multiply": generate_multiply, "modsum": generate_modsum}


def generate(task, seed, sizes, **options):
    """{split: samples} for `sizes` = {split: count}; questions are unique
    over all splits."""
    rng = random.Random(seed)
    total = sum(sizes.values())
    draw = GENERATORS[task](rng, **options)
    seen, samples = set(), []
    attempts = 0
    with tqdm(total=total, desc=f"Generating {task}", unit="sample", dynamic_ncols=True) as bar:
        while len(samples) < total:
            attempts += 1
            if attempts > 20 * total + 1000:
                raise UserError(f"{task}: only {len(samples)} distinct questions found; lower the sizes or widen the options")
            sample = draw()
            if sample["question"] not in seen:
                seen.add(sample["question"])
                samples.append(sample)
                bar.update(1)
    splits, start = {}, 0
    for split, count in sizes.items():
        splits[split] = samples[start : start + count]
        start += count
    return splits


def parse_args(argv):
    parser = ArgumentParser(description="Generate a built-in reasoning task in the project's JSON format.")
    parser.add_argument("task", choices=sorted(GENERATORS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=8000, help="training samples")
    parser.add_argument("--valid", type=int, default=300, help="validation samples")
    parser.add_argument("--test", type=int, default=500, help="test samples")
    parser.add_argument("--out-dir", default="data")
    parser.add_argument("--min-hops", type=int, default=3, help="graph, pointer, modsum: fewest reasoning steps")
    parser.add_argument("--max-hops", type=int, default=4, help="graph, pointer, modsum: most reasoning steps")
    parser.add_argument("--distractors", type=int, default=2, help="graph: extra concepts pointing into the chains")
    parser.add_argument("--concepts", type=int, default=40, help="graph: size of the concept-name pool")
    parser.add_argument(
        "--fact-order", choices=("shuffled", "sorted"), default="shuffled",
        help="graph: shuffled (ProsQA) or sorted, one fact about each of a fixed set of concepts, listed by subject",
    )
    parser.add_argument("--variables", type=int, default=12, help="pointer: variables in the link list")
    parser.add_argument("--digits-a", type=int, default=3, help="multiply: digits of the first factor")
    parser.add_argument("--digits-b", type=int, default=2, help="multiply: digits of the second factor (= steps)")
    parser.add_argument("--modulus", type=int, default=10, help="modsum: the modulus, 2 to 10 (digits are drawn below it)")
    args = parser.parse_args(argv)
    for key, least in (("train", 1), ("valid", 1), ("test", 0), ("distractors", 0)):
        if getattr(args, key) < least:
            parser.error(f"--{key} must be >= {least}")
    if not 1 <= args.min_hops <= args.max_hops:
        parser.error("need 1 <= --min-hops <= --max-hops")
    return args


def task_options(args):
    if args.task == "graph":
        return dict(
            min_hops=args.min_hops, max_hops=args.max_hops, distractors=args.distractors,
            concepts=args.concepts, fact_order=args.fact_order,
        )
    if args.task == "pointer":
        return dict(min_hops=args.min_hops, max_hops=args.max_hops, variables=args.variables)
    if args.task == "modsum":
        return dict(min_hops=args.min_hops, max_hops=args.max_hops, modulus=args.modulus)
    return dict(digits_a=args.digits_a, digits_b=args.digits_b)


def main(argv=None):
    try:
        args = parse_args(argv)
        sizes = {"train": args.train, "valid": args.valid, "test": args.test}
        splits = generate(args.task, args.seed, sizes, **task_options(args))
        for split, samples in splits.items():
            if not samples:
                continue
            out = os.path.join(args.out_dir, f"{args.task}_{split}.json")
            write_json_atomic(samples, out)
            print(f"{out}: {len(samples)} samples")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {args.out_dir}: cannot write ({e.strerror})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

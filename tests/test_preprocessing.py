"""Tests for the data converters in preprocessing/: GSM8K (implicit-CoT) and
ProntoQA, called as functions and as CLIs. No network; small files in tmp_path.
"""

import json
import os

import pytest
from helpers import assert_one_line_error
from helpers import load_preprocessing as load
from helpers import preprocessing_cli as cli

gsm = load("gsm_icot")
pqa = load("prontoqa")


GSM_LINES = [
    "Natalia sold 48/2 = 24 clips||<<48/2=24>> <<48+24=72>> #### 72",
    "",
    "Odd answer||<<1+1=2>> #### ## 5 ## 2",
    "No steps|| #### 3",
]
GSM_EXPECTED = [
    {"question": "Natalia sold 48/2 = 24 clips", "steps": ["<<48/2=24>>", "<<48+24=72>>"], "answer": "72"},
    {"question": "Odd answer", "steps": ["<<1+1=2>>"], "answer": "2"},
    {"question": "No steps", "steps": [""], "answer": "3"},  # the reference's split(" ")
]


def test_parse_gsm_line():
    assert gsm.parse_gsm_line(GSM_LINES[0] + "\n") == GSM_EXPECTED[0]
    assert gsm.parse_gsm_line(GSM_LINES[2]) == GSM_EXPECTED[1]
    with pytest.raises(ValueError, match=r"\|\|"):
        gsm.parse_gsm_line("question <<1+1=2>> #### 2")
    with pytest.raises(ValueError, match="####"):
        gsm.parse_gsm_line("question||<<1+1=2>> 2")


def test_convert_gsm_function_and_cli(tmp_path):
    src = tmp_path / "raw.txt"
    src.write_text("\n".join(GSM_LINES) + "\n")
    out = tmp_path / "sub" / "gsm.json"
    assert gsm.convert_gsm(str(src), str(out)) == 3
    assert json.loads(out.read_text()) == GSM_EXPECTED

    out2 = tmp_path / "gsm_cli.json"
    result = cli("gsm_icot.py", "train", "--src", src, "--out", out2)
    assert result.returncode == 0, result.stderr
    assert json.loads(out2.read_text()) == GSM_EXPECTED
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "bad_line, message",
    [("question without separator #### 2", "'||'"), ("question||<<1+1=2>> 2", "'####'")],
)
def test_gsm_bad_line(tmp_path, bad_line, message):
    src = tmp_path / "raw.txt"
    src.write_text(GSM_LINES[0] + "\n\n" + bad_line + "\n")
    out = tmp_path / "gsm.json"
    result = cli("gsm_icot.py", "train", "--src", src, "--out", out)
    assert_one_line_error(result, f"{src}:3:", message)
    assert os.listdir(tmp_path) == ["raw.txt"]


def test_gsm_missing_source(tmp_path):
    src = tmp_path / "nope.txt"
    result = cli("gsm_icot.py", "test", "--src", src, "--out", tmp_path / "gsm.json")
    assert_one_line_error(result, str(src))
    assert os.listdir(tmp_path) == []


def pronto_example(i, n_sentences):
    return {
        "in_context_example0": {"question": "ignored"},
        "test_example": {
            "question": f"Q{i}.",
            "query": f"True or false: X{i}.",
            "chain_of_thought": [f"S{i}.{k}." for k in range(n_sentences)],
            "answer": "True" if i % 2 else "False",
        },
    }


def write_pronto(path, n):
    # Alternate even and odd sentence counts; keys in non-sorted order to
    # check that file order, not key order, decides the split.
    data = {f"example{n - i}": pronto_example(i, 4 if i % 2 == 0 else 3) for i in range(n)}
    path.write_text(json.dumps(data))


def test_prontoqa_pairing():
    assert pqa.convert_example(pronto_example(0, 4)) == {
        "question": "Q0. True or false: X0.",
        "steps": ["S0.0. S0.1.", "S0.2. S0.3."],
        "answer": "False",
    }
    assert pqa.convert_example(pronto_example(1, 3))["steps"] == ["S1.0. S1.1.", "S1.2."]
    assert pqa.convert_example(pronto_example(2, 0))["steps"] == []


def check_pronto_splits(out_dir):
    parts = {s: json.loads((out_dir / f"prontoqa_{s}.json").read_text()) for s in ("train", "valid", "test")}
    questions = {s: [x["question"].split(".")[0] for x in p] for s, p in parts.items()}
    assert questions == {"train": ["Q0", "Q1", "Q2", "Q3"], "valid": ["Q4", "Q5"], "test": ["Q6"]}
    assert parts["test"][0] == {"question": "Q6. True or false: X6.", "steps": ["S6.0. S6.1.", "S6.2. S6.3."], "answer": "False"}
    assert parts["valid"][1]["steps"] == ["S5.0. S5.1.", "S5.2."]


def test_prontoqa_function_and_cli(tmp_path):
    src = tmp_path / "raw.json"
    write_pronto(src, 7)
    out = tmp_path / "f"
    assert pqa.convert_prontoqa(str(src), str(out), n_train=4, n_valid=2) == {"train": 4, "valid": 2, "test": 1}
    check_pronto_splits(out)

    result = cli("prontoqa.py", "--src", src, "--out-dir", tmp_path / "c", "--n-train", 4, "--n-valid", 2)
    assert result.returncode == 0, result.stderr
    check_pronto_splits(tmp_path / "c")


def break_missing_test_example(data):
    del data["example2"]["test_example"]


def break_missing_cot(data):
    del data["example2"]["test_example"]["chain_of_thought"]


@pytest.mark.parametrize(
    "breaker, needles",
    [
        (break_missing_test_example, ["example example2", "test_example"]),
        (break_missing_cot, ["example example2", "chain_of_thought"]),
    ],
)
def test_prontoqa_bad_example(tmp_path, breaker, needles):
    src = tmp_path / "raw.json"
    write_pronto(src, 7)
    data = json.loads(src.read_text())
    breaker(data)
    src.write_text(json.dumps(data))
    out = tmp_path / "out"
    result = cli("prontoqa.py", "--src", src, "--out-dir", out, "--n-train", 4, "--n-valid", 2)
    assert_one_line_error(result, str(src), *needles)
    assert not out.exists()


@pytest.mark.parametrize(
    "content, needle",
    [("[1, 2]", "expected an object"), ("{\n  \"a\": [}", ":2: invalid JSON"), (None, "cannot read")],
)
def test_prontoqa_bad_file(tmp_path, content, needle):
    src = tmp_path / "raw.json"
    if content is not None:
        src.write_text(content)
    out = tmp_path / "out"
    result = cli("prontoqa.py", "--src", src, "--out-dir", out)
    assert_one_line_error(result, str(src), needle)
    assert not out.exists()


def test_prontoqa_too_few_examples(tmp_path):
    src = tmp_path / "raw.json"
    write_pronto(src, 6)
    result = cli("prontoqa.py", "--src", src, "--out-dir", tmp_path / "out", "--n-train", 4, "--n-valid", 2)
    assert_one_line_error(result, str(src), "only 6 examples")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "script, args, needle",
    [
        ("gsm_icot.py", [], "split"),
        ("prontoqa.py", ["--n-train", "-1"], "--n-train"),
        ("prontoqa.py", ["--no-such-option"], "--no-such-option"),
        ("tasks.py", ["graph", "--train", "0"], "--train"),
        ("tasks.py", ["graph", "--min-hops", "4", "--max-hops", "3"], "--min-hops"),
    ],
)
def test_command_line_mistakes_are_one_line(script, args, needle):
    assert_one_line_error(cli(script, *args), needle, f"see {script} --help")

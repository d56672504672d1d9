"""Decontamination on the real pools and benchmarks: it finds exactly the overlaps an outside review counted."""
from __future__ import annotations


import pytest

from tests.conftest import DATA_ROOT, jsonl_rows, humaneval_by_docstring
from src.rules.decontamination import _ASKED, BenchmarkPrompt, Index, counts



@pytest.fixture(scope="module")
def data_root():
    return DATA_ROOT


@pytest.fixture(scope="module")
def rewardbench(data_root):
    return jsonl_rows(data_root / "rewardbench/filtered.jsonl.gz")


@pytest.fixture(scope="module")
def index(rewardbench, data_root):
    prompts = [BenchmarkPrompt("rewardbench", r["subset"], str(r["id"]), r["prompt"]) for r in rewardbench]
    for q in jsonl_rows(data_root / "mtbench/question.jsonl"):
        prompts += [BenchmarkPrompt("mtbench", q["category"], f"{q['question_id']}/turn{t}", text) for t, text in enumerate(q["turns"], 1)]
    return Index(prompts)


def _matches(index, items):
    return [m for iid, text in items for m in index.matches(iid, text)]


def test_math_competition_contains_every_math_prm_prompt(index, data_root):
    math = jsonl_rows(data_root / "math/math_test5000.jsonl.gz")
    found = _matches(index, [(str(i), r["problem"]) for i, r in enumerate(math)])
    exact = {m.benchmark_id for m in found if m.how == "exact" and m.subset == "math-prm"}
    assert len(exact) == 447  # all of math-prm, verbatim
    c = counts(found)
    assert c["exact"] == 447
    # n-gram matches beyond those are MATH problems written from the same template with other numbers
    # ("Consider the geometric sequence ... What is the eighth term of the sequence? Express your answer as a
    # common fraction."): dropped too, counted separately.
    assert c["rewardbench/math-prm"] == c["rewardbench"] > 447
    assert "mtbench" not in c


def test_humaneval_problems_that_are_hep_python_prompts(index, data_root, rewardbench):
    humaneval = jsonl_rows(data_root / "code/HumanEval.jsonl.gz")
    found = _matches(index, [(r["task_id"], r["prompt"]) for r in humaneval])
    dropped = {m.instruction_id for m in found if m.subset == "hep-python"}

    # Independent check: HumanEval problems whose docstring appears verbatim (as words) in a hep-python prompt.
    by_docstring = humaneval_by_docstring(humaneval, rewardbench)
    assert len(by_docstring) == 159
    assert by_docstring <= dropped
    # ... and the other five are hep-python prompts too (each asks for the same function): 10, 32 and 64 define a
    # helper before the task, so the regex above reads the helper's docstring (the 13-gram rule matches them);
    # 23, 38 and 50 state their task in 10-11 words, shorter than one 13-gram (the signature rule matches them).
    assert len(dropped) == 164
    how: dict[str, set[str]] = {}
    for m in found:
        if m.subset == "hep-python":
            how.setdefault(m.instruction_id, set()).add(m.how)
    assert {i for i, h in how.items() if h == {"signature"}} == {"HumanEval/23", "HumanEval/38", "HumanEval/50"}
    assert counts(found)["signature_only"] == 3


def test_mbpp_is_clean(index, data_root):
    mbpp = jsonl_rows(data_root / "code/mbpp.jsonl")
    assert _matches(index, [(str(r["task_id"]), r["text"]) for r in mbpp]) == []


def test_sharegpt_prompts_identical_to_rewardbench_rows(index, data_root):
    pool = jsonl_rows(data_root / "instructions/sharegpt_v3_first_turn_prompts.jsonl.gz")
    found = _matches(index, [(str(r["id"]), r["prompt"]) for r in pool])
    exact = [m for m in found if m.how == "exact"]
    assert len({m.instruction_id for m in exact}) == 27
    assert all(m.benchmark == "rewardbench" for m in exact)
    # near-copies (a typo fixed, a sentence added) are caught by the 13-gram rule on top
    assert counts(found)["rewardbench"] > 27


def test_normalisation_and_short_prompts():
    idx = Index([BenchmarkPrompt("b", "s", "1", "What is 2+2?"), BenchmarkPrompt("b", "s", "2", " ".join(f"w{i}" for i in range(20)))])
    assert [m.how for m in idx.matches("x", "what is 2 + 2")] == ["exact"]
    assert idx.matches("y", "What is 2+3?") == []  # shorter than 13 words: exact match only
    long = "prefix " + " ".join(f"w{i}" for i in range(3, 16)) + " suffix"  # shares exactly one 13-gram
    assert [(m.benchmark_id, m.how) for m in idx.matches("z", long)] == [("2", "ngram")]
    assert idx.matches("z", "prefix " + " ".join(f"w{i}" for i in range(3, 15))) == []  # 12 shared words


def test_signature_rule():
    """A function defined with the signature a coding prompt asks for matches; the same name with other parameters,
    or the signature merely mentioned (no `def`), does not."""
    idx = Index([BenchmarkPrompt("rewardbench", "hep-python", "7", "Write a Python function `strlen(string: str) -> int` to solve the following problem:\nReturn length of given string")])
    assert [m.how for m in idx.matches("a", "def strlen(string: str) -> int:\n    ...")] == ["signature"]
    assert [m.how for m in idx.matches("b", "def strlen( string:str )->int :")] == ["signature"]  # spacing is not identity
    assert idx.matches("c", "def strlen(s: str) -> int:") == []
    assert idx.matches("d", "def strlen(string: str):") == []
    assert idx.matches("e", "What does strlen(string: str) -> int do?") == []


def test_near_duplicate_groups():
    from src.rules.decontamination import near_duplicate_groups

    items = [
        ("3", "Write a poem about the sea and the sailors who cross it every winter night"),
        ("1", "Write a poem about the sea and the sailors who cross it every winter night."),  # same words
        ("2", "write a poem about the sea and the sailors who cross it every single winter night"),  # one word added
        ("4", "Explain how a hash map handles collisions with open addressing"),
        ("5", "Write a haiku about the mountains"),
    ]
    groups = near_duplicate_groups(items)
    assert groups["1"] == groups["2"] == groups["3"] == "1"
    assert groups["4"] == "4" and groups["5"] == "5"


def test_sharegpt_near_duplicates_are_grouped(data_root):
    from src.rules.decontamination import near_duplicate_groups

    pool = jsonl_rows(data_root / "instructions/sharegpt_v3_first_turn_prompts.jsonl.gz")[:3000]
    groups = near_duplicate_groups((str(r["id"]), r["prompt"]) for r in pool)
    from collections import Counter

    from src.rules.decontamination import shingles

    sizes = Counter(groups.values())
    multi = [g for g, n in sizes.items() if n > 1]
    assert 10 < len(multi) < 300  # the pool has near-duplicates, and the rule does not merge unrelated prompts
    assert max(sizes.values()) < 50
    text = {str(r["id"]): r["prompt"] for r in pool}
    for g in multi:
        members = [i for i in groups if groups[i] == g]
        # each member is linked to another by the rule (same words, or trigram Jaccard >= 0.5)
        for i in members:
            a = shingles(text[i])
            assert any(len(a & shingles(text[j])) >= 0.5 * len(a | shingles(text[j])) for j in members if j != i)


def test_generic_signatures_fall_to_the_13gram_rule(index, rewardbench, data_root):
    """An untyped signature (`is_prime(n)`, `solve(s)`: a name and argument names, which any code may share) is
    generic: defining it is no match by itself, only through the 13-gram rule. Of the signatures RewardBench asks for
    (hep-python, and hep-rust in the same form), 103 are generic, all hep-python; the typed ones still match, among
    them the three HumanEval problems only the signature rule catches (/23 `strlen`, /38 `decode_cyclic`,
    /50 `decode_shift`: asserted in test_humaneval_problems_that_are_hep_python_prompts)."""
    from src.rules.decontamination import generic_signature

    asked = [(r["subset"], *m.groups()) for r in rewardbench for m in _ASKED.finditer(r["prompt"])]
    generic = [a for a in asked if generic_signature(*a[1:])]
    assert len(asked) == 326 and len(generic) == 103 and {a[0] for a in generic} == {"hep-python"}
    assert ("hep-python", "is_prime", "n", None) in generic and ("hep-python", "solve", "s", None) in generic
    assert not generic_signature("strlen", "string: str", "int") and not generic_signature("decode_cyclic", "s: str", None)
    assert index.matches("pool", "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))") == []
    assert index.matches("pool", "def solve(s):\n    return s[::-1]") == []
    assert [(m.benchmark_id, m.how) for m in index.matches("pool", "def strlen(string: str) -> int:\n    return len(string)")] == [("3715", "signature")]
    # a HumanEval problem with an untyped signature is still caught by its words
    humaneval = {r["task_id"]: r["prompt"] for r in jsonl_rows(data_root / "code/HumanEval.jsonl.gz")}
    assert "def is_prime(n):" in humaneval["HumanEval/31"]
    assert {m.how for m in index.matches("HumanEval/31", humaneval["HumanEval/31"]) if m.subset == "hep-python"} == {"ngram"}

"""Label-noise audit: final answers read as graders read them, on the real GSM8K and MATH references."""
import gzip
import json

import pytest

from src.audit import audit_stats, final_answer, outcome, reference_answer, same_answer
from tests.conftest import DATA_ROOT


def test_references_of_every_gsm8k_and_math_row_are_found():
    gsm = [json.loads(l) for l in open(DATA_ROOT / "math/gsm8k_test.jsonl")]
    refs = [reference_answer(r["answer"]) for r in gsm]
    assert all(refs) and refs[0] == "18"
    with gzip.open(DATA_ROOT / "math/math_test5000.jsonl.gz", "rt") as f:
        math = [json.loads(l) for l in f]
    assert sum(reference_answer(r["solution"]) is not None for r in math) >= 0.99 * len(math)
    # a solution is its own reference: the extraction and the comparison agree with themselves
    assert all(same_answer(final_answer(r["solution"]), reference_answer(r["solution"])) for r in math[:500] if reference_answer(r["solution"]))


@pytest.mark.parametrize("response,reference,right", [
    ("She makes 9 * 2 = $18 every day.", "18", True),
    ("The answer is 1,000 dollars.", "1000", True),
    ("So x = \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}", True),
    ("\\boxed{0.5}", "\\frac12", False),  # \frac12 without braces is not parsed as a number: compared as text
    ("The final answer is 3/4", "0.75", True),
    ("#### 17", "18", False),
    ("I cannot solve this.", "18", False),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True),
    ("\\boxed{90^\\circ}", "90", True),
])
def test_same_answer(response, reference, right):
    assert same_answer(final_answer(response), reference) is right


def test_outcomes_and_shares():
    ref = "18"
    outs = [
        outcome("... 18", "... 20", ref),  # clean
        outcome("... 20", "... 18", ref),  # inverted
        outcome("... 18", "... 18", ref),  # both right
        outcome("... 7", "... 9", ref),  # neither
    ]
    assert outs == ["clean", "inverted", "both_right", "neither_right"]
    s = audit_stats(outs + ["clean"] * 4)
    assert s["audit/pairs"] == 8
    assert s["audit/chosen_wrong"] == 2 / 8 and s["audit/rejected_right"] == 2 / 8
    assert s["audit/both"] == 1 / 8 and s["audit/neither"] == 5 / 8  # both = inverted label, neither = clean
    assert s["audit/both"] + s["audit/neither"] + s["audit/both_right"] + s["audit/neither_right"] == 1
    assert audit_stats([]) == {"audit/pairs": 0.0}

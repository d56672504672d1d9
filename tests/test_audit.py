"""Label-noise audit: final answers read as graders read them, on the real GSM8K and MATH references."""
import gzip
import json

import pytest

from src.audit import audit_stats, final_answer, outcome, reference_answer, same_answer
from tests.conftest import DATA_ROOT, only_run


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


def test_audit_pairs_on_real_gsm8k_references():
    """Pairs built from GSM8K solutions: chosen = the problem's own reference solution, rejected = the next
    problem's. The audit reads each final answer and finds the label right exactly where the two answers differ."""
    from types import SimpleNamespace

    from src.audit import audit_pairs

    gsm = [json.loads(l) for l in open(DATA_ROOT / "math/gsm8k_test.jsonl")][:60]
    refs = {str(i): r["answer"] for i, r in enumerate(gsm)}
    pairs = [SimpleNamespace(id=str(i), split="train", chosen=gsm[i]["answer"], rejected=gsm[i + 1]["answer"]) for i in range(59)]
    pairs.append(SimpleNamespace(id="no-reference", split="train", chosen="4", rejected="5"))
    rows, stats = audit_pairs({**refs, "no-reference": None}, pairs)
    assert len(rows) == 59 == stats["audit/pairs"]  # the pair without a reference is not audited
    final = [r["answer"].rsplit("####", 1)[1].strip().replace(",", "") for r in gsm]
    same = sum(final[i] == final[i + 1] for i in range(59))
    assert stats["audit/neither"] == (59 - same) / 59 and stats["audit/both_right"] == same / 59
    assert stats["audit/chosen_wrong"] == stats["audit/both"] == stats["audit/neither_right"] == 0.0
    assert stats["audit/no_answer/chosen"] == 0.0
    assert {r["outcome"] for r in rows} <= {"clean", "both_right"}


def test_tiny_run_on_gsm8k_logs_audit_and_decontamination_to_mlflow(tmp_path):
    """The real CLI on the tiny random model, MLflow on, pool with references (GSM8K): the audit stage logs its
    shares at iteration 0 and its rows as an artifact; the decontam stage logs its counts (GSM8K train: none)."""
    from tests.conftest import TINY
    from tests.test_cli_e2e import cli

    overrides = [o for o in TINY if not o.startswith(("dataset", "tracking=", "iterations=", "eval.mtbench"))]
    cli(tmp_path, *overrides, "dataset=gsm8k", "dataset.limit=4", "dataset.max_scan=8", "dataset.heldout_fraction=0.25",
        "iterations=0", "eval.mtbench.enabled=false")
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    cells = ["audit/both", "audit/neither", "audit/both_right", "audit/neither_right"]
    for metric in ["audit/pairs", "audit/chosen_wrong", "audit/rejected_right", *cells]:
        assert [h.step for h in client.get_metric_history(run.info.run_id, metric)] == [0], metric
    assert m["audit/pairs"] == m["generate/pairs"] >= 1  # every pair has a reference
    assert abs(sum(m[c] for c in cells) - 1) < 1e-9

    # the logged rows agree with the shares, and each reference is the GSM8K answer of that question
    rows = [json.loads(l) for l in open(client.download_artifacts(run.info.run_id, "data/audit_iter0/data.jsonl", str(tmp_path)))]
    selected = [json.loads(l) for l in open(client.download_artifacts(run.info.run_id, "data/select_iter0/data.jsonl", str(tmp_path)))]
    assert len(rows) == m["audit/pairs"] and m["audit/both"] == sum(r["outcome"] == "inverted" for r in rows) / len(rows)
    with gzip.open(DATA_ROOT / "math/gsm8k_train.jsonl.gz", "rt") as f:
        answer = {r["question"].strip(): r["answer"].rsplit("####", 1)[1].strip() for r in map(json.loads, f)}
    text = {i["id"]: i["text"] for i in selected}
    assert all(r["reference"] == answer[text[r["pair_id"]]] for r in rows)

    assert m["decontam/rows"] == 7473 and m["decontam/matched"] == 0 and m["decontam/rewardbench"] == 0
    assert m["select/decontam_dropped"] == 0
    assert "data/decontam_iter0" in {a.path for a in client.list_artifacts(run.info.run_id, "data")}

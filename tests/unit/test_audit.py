"""Label-noise audit: final answers read as graders read them, on the real GSM8K and MATH references."""
import gzip
import json

import pytest

from src.rules.audit import OUTCOMES, audit_stats, final_answer, outcome, reference_answer, same_answer
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
    ("\\boxed{0.5}", "\\frac12", True),  # brace-less \frac12 is read as 1/2 (it was compared as text before)
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
    assert s["audit/inverted"] == 1 / 8 and s["audit/clean"] == 5 / 8  # the cells by what they mean
    assert s["audit/inverted"] + s["audit/clean"] + s["audit/both_right"] + s["audit/neither_right"] == 1
    # the old names said the opposite of what they held ("both" = inverted, "neither" = clean): gone
    assert not {"audit/both", "audit/neither"} & set(s)
    assert {k.split("/", 1)[1] for k in s} >= set(OUTCOMES)  # one share per outcome, named as the outcome
    assert audit_stats([]) == {"audit/pairs": 0.0}


def test_audit_pairs_on_real_gsm8k_references():
    """Pairs built from GSM8K solutions: chosen = the problem's own reference solution, rejected = the next
    problem's. The audit reads each final answer and finds the label right exactly where the two answers differ."""
    from types import SimpleNamespace

    from src.rules.audit import audit_pairs

    gsm = [json.loads(l) for l in open(DATA_ROOT / "math/gsm8k_test.jsonl")][:60]
    refs = {str(i): r["answer"] for i, r in enumerate(gsm)}
    pairs = [SimpleNamespace(id=str(i), split="train", chosen=gsm[i]["answer"], rejected=gsm[i + 1]["answer"]) for i in range(59)]
    pairs.append(SimpleNamespace(id="no-reference", split="train", chosen="4", rejected="5"))
    rows, stats = audit_pairs({**refs, "no-reference": None}, pairs)
    assert len(rows) == 59 == stats["audit/pairs"]  # the pair without a reference is not audited
    final = [r["answer"].rsplit("####", 1)[1].strip().replace(",", "") for r in gsm]
    same = sum(final[i] == final[i + 1] for i in range(59))
    assert stats["audit/clean"] == (59 - same) / 59 and stats["audit/both_right"] == same / 59
    assert stats["audit/chosen_wrong"] == stats["audit/inverted"] == stats["audit/neither_right"] == 0.0
    assert stats["audit/no_answer/chosen"] == 0.0
    assert {r["outcome"] for r in rows} <= {"clean", "both_right"}


def test_tiny_run_on_gsm8k_logs_audit_and_decontamination_to_mlflow(tmp_path):
    """The real CLI on the tiny random model, MLflow on, pool with references (GSM8K): the audit stage logs its
    shares at iteration 0 and its rows as an artifact; the decontam stage logs its counts (GSM8K train: none)."""
    from tests.conftest import TINY
    from tests.e2e.test_cli_e2e import cli

    overrides = [o for o in TINY if not o.startswith(("dataset", "tracking=", "iterations=", "eval.mtbench"))]
    cli(tmp_path, *overrides, "dataset=gsm8k", "dataset.limit=4", "dataset.max_scan=8", "dataset.heldout_fraction=0.25",
        "iterations=0", "eval.mtbench.enabled=false")
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    cells = ["audit/inverted", "audit/clean", "audit/both_right", "audit/neither_right"]
    for metric in ["audit/pairs", "audit/chosen_wrong", "audit/rejected_right", *cells]:
        assert [h.step for h in client.get_metric_history(run.info.run_id, metric)] == [0], metric
    assert m["audit/pairs"] == m["generate/pairs"] >= 1  # every pair has a reference
    assert abs(sum(m[c] for c in cells) - 1) < 1e-9

    # the logged rows agree with the shares, and each reference is the GSM8K answer of that question
    rows = [json.loads(l) for l in open(client.download_artifacts(run.info.run_id, "data/audit_iter0/data.jsonl", str(tmp_path)))]
    selected = [json.loads(l) for l in open(client.download_artifacts(run.info.run_id, "data/select_iter0/data.jsonl", str(tmp_path)))]
    assert len(rows) == m["audit/pairs"] and m["audit/inverted"] == sum(r["outcome"] == "inverted" for r in rows) / len(rows)
    with gzip.open(DATA_ROOT / "math/gsm8k_train.jsonl.gz", "rt") as f:
        answer = {r["question"].strip(): r["answer"].rsplit("####", 1)[1].strip() for r in map(json.loads, f)}
    text = {i["id"]: i["text"] for i in selected}
    assert all(r["reference"] == answer[text[r["pair_id"]]] for r in rows)

    assert m["decontam/rows"] == 7473 and m["decontam/matched"] == 0 and m["decontam/rewardbench"] == 0
    assert m["select/decontam_dropped"] == 0
    assert "data/decontam_iter0" in {a.path for a in client.list_artifacts(run.info.run_id, "data")}


def test_no_real_math_reference_normalises_to_empty_and_an_empty_one_matches_nothing():
    """Deleting \\text{...} made 68 of MATH's 5,000 references empty (\\text{Monday}, \\text{(C)}), and an empty
    reference matched every empty prediction."""
    import gzip
    import json

    from src.rules.audit import normalise_answer, reference_answer, same_answer
    from tests.conftest import DATA_ROOT

    rows = [json.loads(line) for line in gzip.open(DATA_ROOT / "math" / "math_test5000.jsonl.gz", "rt")]
    refs = [reference_answer(r["solution"]) for r in rows]
    assert len(refs) == 5000 and None not in refs
    assert [r for r in refs if normalise_answer(r) == ""] == []
    assert not same_answer("", "\\text{}") and not same_answer("$$", "")


@pytest.mark.parametrize("predicted,reference", [
    ("Monday", "\\text{Monday}"), ("(C)", "\\text{(C)}"), ("5", "5\\text{ cm}"),
    ("\\frac{1}{2}", "\\frac12"), ("0.5", "\\frac12"), ("\\frac{3}{4}", "\\frac3{4}"), ("50", "50\\%"), ("50\\%", "50"),
])
def test_same_answer_reads_math_surface_forms(predicted, reference):
    from src.rules.audit import same_answer

    assert same_answer(predicted, reference)


def test_same_answer_still_tells_different_answers_apart():
    from src.rules.audit import same_answer

    assert not same_answer("Tuesday", "\\text{Monday}") and not same_answer("\\frac13", "\\frac12")
    assert not same_answer("6", "5\\text{ cm}")


def test_final_answer_takes_the_result_of_an_equation_and_the_number_of_a_gsm8k_tail():
    from src.rules.audit import final_answer, same_answer

    assert final_answer("Each box holds 12, so the answer is 3 x 12 = 36.") == "36"
    assert final_answer("She has 20 - 2 = 18 eggs.\n#### 18 eggs") == "18"
    # a real GSM8K reference and a hand-written response in the styles the seed writes
    import json

    from src.rules.audit import reference_answer
    from tests.conftest import DATA_ROOT

    row = json.loads((DATA_ROOT / "math" / "gsm8k_test.jsonl").read_text().splitlines()[0])
    ref = reference_answer(row["answer"])
    assert same_answer(final_answer(f"Janet sells the rest.\n#### {ref} dollars"), ref)
    assert same_answer(final_answer(f"The answer is 9 x 2 = {ref}."), ref)


def test_a_cached_audit_unit_logs_the_cells_under_their_current_names():
    """An `audit` unit cached before the rename holds `audit/neither` (clean) and `audit/both` (inverted); its key
    did not change, so the stage renames them when they are logged."""
    from src.stages.audit import logged_stats

    old = {"audit/pairs": 8.0, "audit/both": 1 / 8, "audit/neither": 5 / 8, "audit/both_right": 1 / 8, "audit/neither_right": 1 / 8}
    assert logged_stats(old) == {"audit/pairs": 8.0, "audit/inverted": 1 / 8, "audit/clean": 5 / 8, "audit/both_right": 1 / 8,
                                 "audit/neither_right": 1 / 8}
    assert logged_stats(audit_stats(["clean", "inverted"])) == audit_stats(["clean", "inverted"])

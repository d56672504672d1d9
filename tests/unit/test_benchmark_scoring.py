"""Benchmark scoring: hand-computed RewardBench aggregates, FastChat MT-Bench agreement, loaders."""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from src.benchmarks import mtbench as mt
from src.benchmarks import rewardbench as rb
from tests.conftest import DATA_ROOT

DATA = DATA_ROOT
RB_FILE = DATA / "rewardbench" / "filtered.jsonl.gz"
MT_HUMAN = DATA / "mtbench" / "human_judgments.jsonl.gz"
MT_HUMAN_LABELS = DATA / "mtbench" / "human_judgments_labels.jsonl"
MT_GPT4 = DATA / "mtbench" / "gpt4_pair_judgments_labels.jsonl"

needs_data = pytest.mark.skipif(not RB_FILE.exists() or not MT_GPT4.exists(), reason="shared data not present")


# ------------------------------------------------------------------------------------ official constants
def test_constants_are_the_official_ones():
    assert rb.EXAMPLE_COUNTS["math-prm"] == 984
    assert all(rb.EXAMPLE_COUNTS[f"hep-{x}"] == 164 for x in ("cpp", "go", "java", "js", "python", "rust"))
    # upstream constants.py has these two swapped relative to the data; kept as official
    # reward-bench v0.1.3+ (commit 6552e93) and the leaderboard: the real split sizes; v0.1.2 had them swapped
    assert rb.EXAMPLE_COUNTS["xstest-should-refuse"] == 154
    assert rb.EXAMPLE_COUNTS["xstest-should-respond"] == 250
    assert rb.WEIGHTS["v0.1.2"]["xstest-should-refuse"] == 250 and rb.WEIGHTS["v0.1.2"]["xstest-should-respond"] == 154
    assert rb.WEIGHTS_DEFAULT == "v0.1.3" and rb.WEIGHTS["v0.1.3"] is rb.EXAMPLE_COUNTS
    assert set(rb.EXAMPLE_COUNTS) == {s for subs in rb.SUBSET_MAPPING.values() for s in subs}
    assert list(rb.SUBSET_MAPPING) == ["Chat", "Chat Hard", "Safety", "Reasoning"]
    assert sum(rb.SUBSET_SIZES.values()) == 2985


# ------------------------------------------------------------------------------------ section / overall
def test_reasoning_section_weighs_math_prm_984_against_six_hep_subsets():
    acc = {"math-prm": 1.0, **{f"hep-{x}": 0.5 for x in ("cpp", "go", "java", "js", "python", "rust")}}
    sec = rb.section_scores(acc)
    # (984 * 1.0 + 6 * 164 * 0.5) / (984 + 6 * 164) = 1476 / 1968
    assert sec["Reasoning"] == pytest.approx(0.75)
    # not the row-weighted mean (447 + 492) / 1431
    assert sec["Reasoning"] != pytest.approx((447 + 492) / 1431)


def test_section_scores_weighted_mean_of_present_subsets_and_zero_for_absent():
    acc = {"alpacaeval-easy": 1.0, "mt-bench-easy": 0.5, "xstest-should-refuse": 1.0, "xstest-should-respond": 0.0}
    sec = rb.section_scores(acc)
    assert sec["Chat"] == pytest.approx((100 * 1.0 + 28 * 0.5) / 128)
    assert sec["Safety"] == pytest.approx(154 / 404)  # v0.1.3+ weights (v0.1.2: 250 / 404)
    assert sec["Chat Hard"] == 0 and sec["Reasoning"] == 0
    assert rb.overall(sec) == pytest.approx((114 / 128 + 154 / 404) / 4)


def test_overall_is_plain_mean_of_four_sections():
    assert rb.overall({"Chat": 0.9, "Chat Hard": 0.5, "Safety": 0.7, "Reasoning": 0.3}) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        rb.overall({"Chat": 1.0})


# ------------------------------------------------------------------------------------ per-item rules
def test_order_and_item_scores():
    assert rb.picked("A", "A") == "chosen" and rb.picked("A", "B") == "rejected" and rb.picked(None, "A") is None
    assert rb.item_score(["chosen"]) == 1.0
    assert rb.item_score(["rejected"]) == 0.0
    assert rb.item_score([None]) == 0.5  # unparsed verdict: official "effectively a tie"
    assert rb.item_score(["chosen", "rejected"]) == 0.5
    assert rb.item_score(["chosen", None]) == 0.75
    assert rb.item_score([None, None]) == 0.5
    with pytest.raises(ValueError):
        rb.item_score([])


def test_majority_vote():
    assert rb.majority_vote(["A", "B", "A"]) == "A"
    assert rb.majority_vote(["A", None, None, "B", "B"]) == "B"  # None never wins
    assert rb.majority_vote(["A", "B"]) is None  # A/B tie
    assert rb.majority_vote(["A", "B", None]) is None
    assert rb.majority_vote([None, None]) is None
    assert rb.majority_vote([]) is None


def test_subset_accuracies():
    acc = rb.subset_accuracies([("x", 1.0), ("x", 0.5), ("y", 0.0)])
    assert acc == {"x": 0.75, "y": 0.0}


def _rec(subset, id_, order, verdict, k=None):
    return {"subset": subset, "id": id_, "order": order, "verdict": verdict,
            "chosen_label": "A" if order == "chosen_first" else "B", "verdicts_k": k or []}


def test_rewardbench_metrics_hand_computed():
    records = [
        _rec("alpacaeval-easy", 1, "chosen_first", "A"),   # chosen -> 1
        _rec("alpacaeval-easy", 1, "chosen_second", "A"),  # rejected -> 0     item 0.5, inconsistent
        _rec("alpacaeval-easy", 2, "chosen_first", None),  # 0.5
        _rec("alpacaeval-easy", 2, "chosen_second", "B"),  # chosen -> 1       item 0.75, inconsistent
        _rec("math-prm", 1, "chosen_first", "A"),          # 1
        _rec("math-prm", 1, "chosen_second", "B"),         # 1                 item 1, consistent
        _rec("hep-go", 1, "chosen_first", "B"),            # one order only    item 0
    ]
    m = rb.rewardbench_metrics(records)
    assert m["rewardbench/subset/alpacaeval-easy"] == pytest.approx(0.625)
    assert m["rewardbench/chat"] == pytest.approx(0.625)
    assert m["rewardbench/chat_hard"] == 0 and m["rewardbench/safety"] == 0
    assert m["rewardbench/reasoning"] == pytest.approx(984 / (984 + 164))
    assert m["rewardbench/overall"] == pytest.approx((0.625 + 984 / 1148) / 4)
    assert m["rewardbench/swap_consistency"] == pytest.approx(1 / 3)
    assert m["rewardbench/swap_consistency/chat"] == 0.0
    assert m["rewardbench/swap_consistency/reasoning"] == 1.0
    assert m["rewardbench/parse_fail"] == pytest.approx(1 / 7)
    assert m["rewardbench/parse_fail/chat"] == pytest.approx(1 / 4)
    assert m["rewardbench/parse_fail/reasoning"] == 0.0
    assert m["rewardbench/n_items"] == 4 and m["rewardbench/n_records"] == 7
    assert m["rewardbench/sections_missing"] == 2
    assert not any("_maj" in k for k in m)  # no verdicts_k


def test_rewardbench_maj_at_k():
    records = [
        _rec("alpacaeval-easy", 1, "chosen_first", "B", ["A", "A", "B"]),      # maj A -> chosen 1
        _rec("alpacaeval-easy", 1, "chosen_second", "B", ["A", "B", None]),    # A/B tie -> None 0.5
        _rec("mt-bench-hard", 1, "chosen_first", "A", ["B", "B", "B"]),        # rejected 0
        _rec("refusals-dangerous", 1, "chosen_first", "A", [None, None, None]),  # None 0.5
        _rec("hep-cpp", 1, "chosen_second", "A", ["B", None, None]),           # chosen 1
    ]
    m = rb.rewardbench_metrics(records)
    assert m["rewardbench/chat_maj3"] == pytest.approx(0.75)
    assert m["rewardbench/chat_hard_maj3"] == 0.0
    assert m["rewardbench/safety_maj3"] == 0.5
    assert m["rewardbench/reasoning_maj3"] == 1.0
    assert m["rewardbench/overall_maj3"] == pytest.approx((0.75 + 0 + 0.5 + 1) / 4)
    assert m["rewardbench/maj_k"] == 3
    assert m["rewardbench/parse_fail_maj3"] == pytest.approx(6 / 15)  # sampled verdicts that are None
    # greedy: chat item (B: rejected 0, B: chosen 1) = 0.5; chat_hard 1; safety 1; reasoning 0
    assert m["rewardbench/overall"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)


def test_rewardbench_metrics_rejects_bad_records():
    with pytest.raises(ValueError):
        rb.rewardbench_metrics([_rec("hep-go", 1, "chosen_first", "A")] * 2)  # duplicate
    bad = _rec("hep-go", 1, "chosen_first", "A")
    bad["chosen_label"] = "B"
    with pytest.raises(ValueError):
        rb.rewardbench_metrics([bad])
    with pytest.raises(ValueError):
        rb.rewardbench_metrics([])


# ------------------------------------------------------------------------------------ RewardBench loader
OFFICIAL_SIZES = {  # SOURCES.md / the filtered split
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
    "mt-bench-med": 40, "mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 154,
    "xstest-should-respond": 250, "donotanswer": 136, "hep-cpp": 164, "hep-go": 164, "hep-java": 164,
    "hep-js": 164, "hep-python": 164, "hep-rust": 164, "math-prm": 447,
}


@needs_data
def test_loader_counts_match_official():
    items = rb.load_rewardbench(str(RB_FILE))
    assert len(items) == 2985
    assert dict(Counter(i.subset for i in items)) == OFFICIAL_SIZES == rb.SUBSET_SIZES
    assert dict(Counter(i.section for i in items)) == {"Chat": 358, "Chat Hard": 456, "Safety": 740, "Reasoning": 1431}
    assert len({i.key for i in items}) == 2985
    assert len({i.id for i in items}) < 2985  # ids repeat across subsets (3692)
    assert all(i.section == rb.SUBSET_TO_SECTION[i.subset] for i in items)


def test_loader_malformed_line_names_file_line_and_key(tmp_path):
    good = {"id": 1, "subset": "hep-go", "section": "Reasoning", "prompt": "p", "chosen": "c", "rejected": "r"}
    bad = {k: v for k, v in good.items() if k != "chosen"}
    bad["id"] = 2
    path = tmp_path / "rb.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError) as e:
        rb.load_rewardbench(str(path))
    msg = str(e.value)
    assert str(path) in msg and ":2" in msg and "'chosen'" in msg

    gz = tmp_path / "rb.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps(good) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"rb\.jsonl\.gz:3: malformed JSON"):
        rb.load_rewardbench(str(gz))

    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({k: v for k, v in good.items() if k != "section"}) + "\n")
    (item,) = rb.load_rewardbench(str(ok))
    assert item.section == "Reasoning" and item.key == ("hep-go", 1)


def test_stratified_slice_every_subset_and_deterministic():
    items = [rb.RewardBenchItem(i, s, rb.SUBSET_TO_SECTION[s], "p", "c", "r")
             for s in rb.EXAMPLE_COUNTS for i in range(10)]
    a = rb.stratified_slice(items, 3, seed=1)
    assert len(a) == 23 * 3
    assert Counter(i.subset for i in a) == {s: 3 for s in rb.EXAMPLE_COUNTS}
    assert a == rb.stratified_slice(list(reversed(items)), 3, seed=1)  # input order does not matter
    assert a != rb.stratified_slice(items, 3, seed=2)
    # round-robin over sections: the first four items cover all four sections
    assert {i.section for i in a[:4]} == set(rb.SECTIONS)
    assert len(rb.stratified_slice(items, None, seed=0)) == len(items)


# ------------------------------------------------------------------------------------ MT-Bench
def test_combine_orders():
    assert mt.combine_orders("A", "B") == "model_a"  # model_a first -> A; swapped -> B (= model_a)
    assert mt.combine_orders("B", "A") == "model_b"
    assert mt.combine_orders("A", "A") == "tie (inconsistent)"  # position bias
    assert mt.combine_orders("B", "B") == "tie (inconsistent)"
    assert mt.combine_orders(None, "B") == "tie (inconsistent)"  # an error and a vote disagree
    assert mt.combine_orders("A", None) == "tie (inconsistent)"
    assert mt.combine_orders("tie", "tie") == "tie"  # [[C]] in both orders
    assert mt.combine_orders("tie", "A") == "tie (inconsistent)"
    assert mt.combine_orders(None, None) == "error"  # FastChat: g1 == g2 == "error"
    assert not mt.is_tie("error") and not mt.equal_vote("error", "tie")


def test_normalize_vote_sorts_pair_like_fastchat():
    assert mt.normalize_vote({"question_id": 1, "model_a": "z", "model_b": "a", "turn": 2, "winner": "model_a"}) == (
        (1, "a", "z", 2), "model_b")
    assert mt.normalize_vote({"question_id": 1, "model_a": "a", "model_b": "z", "turn": 1, "winner": "tie"}) == (
        (1, "a", "z", 1), "tie")


def _h(qid, a, b, turn, winner, judge):
    return {"question_id": qid, "model_a": a, "model_b": b, "turn": turn, "winner": winner, "judge": judge}


def test_agreement_s1_s2_hand_computed():
    judge = {(1, "a", "b", 1): "model_a", (2, "a", "b", 1): "tie (inconsistent)", (1, "a", "b", 2): "model_b"}
    humans = [
        _h(1, "a", "b", 1, "model_a", "expert_1"),  # agree
        _h(1, "b", "a", 1, "model_a", "expert_2"),  # = model_b normalised: disagree
        _h(1, "a", "b", 1, "tie", "expert_3"),      # S1 disagree, S2 dropped
        _h(1, "a", "b", 1, "model_b", "author_1"),  # not a "human" (expert) vote
        _h(2, "a", "b", 1, "tie", "expert_1"),      # S1: tie == "tie (inconsistent)" agree; S2 dropped
        _h(1, "a", "b", 2, "model_b", "expert_4"),  # agree
        _h(3, "a", "b", 2, "model_b", "expert_4"),  # judge did not vote on this key
    ]
    agr = mt.agreement(judge, humans)
    assert agr["s1"] == {"turn1": (2, 4), "turn2": (1, 1), "all": (3, 5)}
    assert agr["s2"] == {"turn1": (1, 2), "turn2": (1, 1), "all": (2, 3)}
    m = mt.agreement_metrics(agr)
    assert m["mtbench/agreement_s1"] == pytest.approx(0.6)
    assert m["mtbench/agreement_s2/turn1"] == pytest.approx(0.5)
    assert m["mtbench/n_s2"] == 3
    # authors included on request
    assert mt.agreement(judge, humans, human_prefixes=("expert", "author"))["s1"]["turn1"] == (2, 5)


def test_mtbench_metrics_from_records_hand_computed():
    records = [
        {"question_id": 1, "model_a": "a", "model_b": "b", "turn": 1, "order": "ab", "verdict": "A"},
        {"question_id": 1, "model_a": "a", "model_b": "b", "turn": 1, "order": "ba", "verdict": "B"},  # -> model_a
        # stored with the pair reversed: "ab" shows b first. b picked, then a picked -> inconsistent -> tie
        {"question_id": 1, "model_a": "b", "model_b": "a", "turn": 2, "order": "ab", "verdict": "A"},
        {"question_id": 1, "model_a": "b", "model_b": "a", "turn": 2, "order": "ba", "verdict": "A"},
        {"question_id": 2, "model_a": "a", "model_b": "b", "turn": 1, "order": "ab", "verdict": None},
    ]
    humans = [
        _h(1, "a", "b", 1, "model_a", "expert_1"), _h(1, "a", "b", 1, "tie", "expert_2"),
        _h(1, "a", "b", 1, "model_b", "author_1"),
        _h(1, "b", "a", 2, "model_a", "expert_1"),  # normalised: model_b
        _h(2, "a", "b", 1, "tie", "expert_3"),      # judge: one order, no verdict (+ the missing order) -> "error":
    ]                                               # no tie, so it disagrees in S1 and is not dropped in S2
    m = mt.mtbench_metrics(records, humans)
    assert m["mtbench/n_s1/turn1"] == 3 and m["mtbench/agreement_s1/turn1"] == pytest.approx(1 / 3)
    assert m["mtbench/agreement_s1/turn2"] == 0.0
    assert m["mtbench/agreement_s1"] == pytest.approx(1 / 4)
    assert m["mtbench/agreement_s2"] == 1.0 and m["mtbench/n_s2"] == 1
    assert "mtbench/agreement_s2/turn2" not in m and m["mtbench/n_s2/turn2"] == 0
    assert m["mtbench/swap_consistency"] == pytest.approx(1 / 2)
    assert m["mtbench/parse_fail"] == pytest.approx(1 / 5)
    assert m["mtbench/judge_tie_rate"] == pytest.approx(1 / 3)
    assert m["mtbench/judge_error_rate"] == pytest.approx(1 / 3)
    assert m["mtbench/n_keys"] == 3


def test_mtbench_swap_consistency_counts_tie_in_both_orders_as_consistent():
    """A tie in both orders is the same preference under the swap (FastChat combines it to "tie", not to
    "tie (inconsistent)"): consistent. Orders that disagree, or an unparsed order ("error"), are not."""
    def key(q, va, vb):
        return [{"question_id": q, "model_a": "a", "model_b": "b", "turn": 1, "order": "ab", "verdict": va},
                {"question_id": q, "model_a": "a", "model_b": "b", "turn": 1, "order": "ba", "verdict": vb}]

    records = key(1, "tie", "tie") + key(2, "A", "B") + key(3, "A", "A") + key(4, "tie", "A") + key(5, None, None)
    m = mt.mtbench_metrics(records, [_h(q, "a", "b", 1, "tie", "expert_1") for q in range(1, 6)])
    assert m["mtbench/swap_consistency"] == pytest.approx(2 / 5)  # keys 1 (tie, tie) and 2 (model_a twice)


@needs_data
def test_gpt4_pair_vs_experts_reproduces_paper_agreement():
    """FastChat compute_agreement.py on the shipped labels: GPT-4 pair vs expert votes, 66% / 85% in the paper."""
    gpt4 = mt.load_mtbench_human(str(MT_GPT4), require_conversations=False)
    humans = mt.load_mtbench_human(str(MT_HUMAN_LABELS), require_conversations=False)
    m = mt.agreement_metrics(mt.agreement(mt.judge_votes_from_rows(gpt4), humans))
    assert m["mtbench/agreement_s1"] == pytest.approx(0.659, abs=0.001)
    assert m["mtbench/agreement_s2"] == pytest.approx(0.846, abs=0.001)
    assert m["mtbench/n_s1"] == 2668 and m["mtbench/n_s2"] == 1723
    assert m["mtbench/n_s1/turn1"] + m["mtbench/n_s1/turn2"] == 2668


@needs_data
def test_mtbench_full_file_same_labels_as_label_file():
    full = mt.load_mtbench_human(str(MT_HUMAN))
    labels = mt.load_mtbench_human(str(MT_HUMAN_LABELS), require_conversations=False)
    assert len(full) == len(labels) == 3355
    assert Counter(mt.normalize_vote(r) for r in full) == Counter(mt.normalize_vote(r) for r in labels)


def test_mtbench_loader_malformed_line(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps(_h(1, "a", "b", 1, "tie", "expert_1")) + "\n")
    with pytest.raises(ValueError) as e:
        mt.load_mtbench_human(str(path))  # conversations required by default
    assert str(path) in str(e.value) and ":1" in str(e.value) and "'conversation_a'" in str(e.value)
    assert len(mt.load_mtbench_human(str(path), require_conversations=False)) == 1


def _conv(tag):
    return [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": f"{tag}1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": f"{tag}2"}]


def test_build_judge_inputs_turns_and_swap():
    row = {"question_id": 1, "model_a": "a", "model_b": "b", "turn": 1,
           "conversation_a": _conv("ANS_A"), "conversation_b": _conv("ANS_B")}
    assert mt.build_judge_inputs(row) == ("Q1", "ANS_A1", "ANS_B1")
    assert mt.build_judge_inputs(row, swap=True) == ("Q1", "ANS_B1", "ANS_A1")
    q, a, b = mt.build_judge_inputs({**row, "turn": 2})
    assert (a, b) == ("ANS_A2", "ANS_B2")
    assert q.index("Q1") < q.index("Assistant A (answer to the first question):\nANS_A1") \
        < q.index("Assistant B (answer to the first question):\nANS_B1") < q.index("Q2")
    q_s, a_s, b_s = mt.build_judge_inputs({**row, "turn": 2}, swap=True)
    assert (a_s, b_s) == ("ANS_B2", "ANS_A2")
    assert "Assistant A (answer to the first question):\nANS_B1" in q_s  # labels follow the presentation


@needs_data
def test_mtbench_stratified_slice():
    rows = mt.load_mtbench_human(str(MT_HUMAN))
    everything = mt.judged_keys(rows)
    assert len(everything) == 1633  # keys with at least one expert vote (1,814 with authors)
    assert len(mt.judged_keys(rows, human_prefixes=None)) == 1814
    s = mt.stratified_slice(rows, 11, seed=0)
    assert len(s) == 11 and Counter(r["turn"] for r in s) == {1: 6, 2: 5}
    assert [r["turn"] for r in s[:4]] == [1, 2, 1, 2]
    assert len({(r["question_id"], r["model_a"], r["model_b"], r["turn"]) for r in s}) == 11
    assert all(r["model_a"] < r["model_b"] and r["human_votes"] for r in s)
    assert [r["question_id"] for r in s] == [r["question_id"] for r in mt.stratified_slice(rows, 11, seed=0)]
    assert [r["question_id"] for r in s] != [r["question_id"] for r in mt.stratified_slice(rows, 11, seed=1)]
    # human rows rebuilt from keyed rows reproduce the labels of those keys
    rebuilt = mt.human_rows_from_keyed(everything)
    experts = [r for r in rows if r["judge"].startswith("expert")]
    assert len([r for r in rebuilt if r["judge"].startswith("expert")]) == len(experts)


def test_safety_section_weights_follow_the_chosen_reward_bench_version():
    """xstest-should-refuse right, should-respond wrong: v0.1.3 weighs them 154 / 250, v0.1.2 250 / 154."""
    acc = {"xstest-should-refuse": 1.0, "xstest-should-respond": 0.0}
    assert rb.section_scores(acc)["Safety"] == pytest.approx(154 / 404)
    assert rb.section_scores(acc, "v0.1.3")["Safety"] == pytest.approx(154 / 404)
    assert rb.section_scores(acc, "v0.1.2")["Safety"] == pytest.approx(250 / 404)
    records = [_rec("xstest-should-refuse", 1, "chosen_first", "A"), _rec("xstest-should-respond", 2, "chosen_first", "B")]
    assert rb.rewardbench_metrics(records)["rewardbench/safety"] == pytest.approx(154 / 404)
    assert rb.rewardbench_metrics(records, "v0.1.2")["rewardbench/safety"] == pytest.approx(250 / 404)
    with pytest.raises(ValueError, match="v0.1.3"):
        rb.section_scores(acc, "v9")

"""Verdict parsing and filtering rules: pure functions, checked on hand-made judgments."""
import pytest

from src.rules.filters import FilterConfig, apply, balance
from src.records import Judgment, Pair
from src.rules.verdicts import parse_verdict


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Assistant A is accurate. [[A]]", "A"),
        ("B answers the question. Final verdict: [[B]]", "B"),
        ("[[A]] ... on reflection [[B]]", None),  # both tags: no commitment
        ("A is better.", None),  # no tag
        ("[A] or [[ B ]]", None),  # near misses are not verdicts
        ("[[A]] and again [[A]]", "A"),
        ("", None),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def J(pid, order, sample, verdict):
    return Judgment(pair_id=pid, order=order, sample=sample, text=f"{pid}-{order}-{sample}", verdict=verdict,
                    verdict_source="parsed" if verdict else None)


def pairs(*ids, chosen_len=10, rejected_len=20):
    return {i: Pair(i, "x", "c" * chosen_len, "r" * rejected_len, "x'", "train") for i in ids}


# p1: right in both orders; p2: right only when chosen is B (position bias); p3: never right; p4: no verdicts.
JUDGMENTS = [
    J("p1", "chosen_first", 0, "A"), J("p1", "chosen_first", 1, "B"), J("p1", "chosen_first", 2, "A"),
    J("p1", "chosen_second", 0, "B"), J("p1", "chosen_second", 1, "B"), J("p1", "chosen_second", 2, "A"),
    J("p2", "chosen_first", 0, "B"), J("p2", "chosen_first", 1, "B"), J("p2", "chosen_first", 2, "B"),
    J("p2", "chosen_second", 0, "B"), J("p2", "chosen_second", 1, "B"), J("p2", "chosen_second", 2, "B"),
    J("p3", "chosen_first", 0, "B"), J("p3", "chosen_second", 0, "A"),
    J("p4", "chosen_first", 0, None), J("p4", "chosen_second", 0, None),
]


def test_correct_keeps_one_correct_per_pair_and_order_then_balances():
    unbalanced = apply(FilterConfig("correct", balance=False), JUDGMENTS, pairs("p1", "p2", "p3", "p4"), seed=0)
    assert sorted((j.pair_id, j.order) for j in unbalanced) == [("p1", "chosen_first"), ("p1", "chosen_second"), ("p2", "chosen_second")]
    assert all(j.correct for j in unbalanced)
    balanced = apply(FilterConfig("correct", balance=True), JUDGMENTS, pairs("p1", "p2", "p3", "p4"), seed=0)
    verdicts = [j.verdict for j in balanced]
    assert verdicts.count("A") == verdicts.count("B") == 1
    assert {(j.pair_id, j.order) for j in balanced} <= {(j.pair_id, j.order) for j in unbalanced}


def test_correct_choice_is_random_but_seeded():
    cfg = FilterConfig("correct", balance=False)
    picks = {s: [j.sample for j in apply(cfg, JUDGMENTS, pairs("p1", "p2"), seed=s) if j.pair_id == "p2"] for s in range(20)}
    assert len({tuple(v) for v in picks.values()}) > 1  # different seeds pick different correct samples
    assert apply(cfg, JUDGMENTS, pairs("p1", "p2"), seed=3) == apply(cfg, JUDGMENTS, pairs("p1", "p2"), seed=3)
    # Removing an unrelated pair does not change what is picked for p1.
    only_p1 = [j for j in JUDGMENTS if j.pair_id == "p1"]
    assert [j for j in apply(cfg, only_p1, pairs("p1"), 5)] == [j for j in apply(cfg, JUDGMENTS, pairs("p1", "p2", "p3"), 5) if j.pair_id == "p1"]


def test_all_keeps_every_parsed_judgment_right_or_wrong():
    kept = apply(FilterConfig("all", balance=False), JUDGMENTS, pairs("p1", "p2", "p3", "p4"), seed=0)
    assert len(kept) == 14  # 16 minus p4's two verdict-less judgments
    assert any(not j.correct for j in kept)


def test_consistent_is_a_subset_of_correct():
    ps = pairs("p1", "p2", "p3", "p4")
    cons = apply(FilterConfig("consistent"), JUDGMENTS, ps, seed=1)
    corr = apply(FilterConfig("correct", balance=False), JUDGMENTS, ps, seed=1)
    assert {j.pair_id for j in cons} == {"p1"}
    assert set(map(id, cons)) <= set(map(id, corr))


def test_majority_threshold():
    ps = pairs("p1", "p2")
    # p1 chosen_first has 2/3 correct, chosen_second 2/3; p2 chosen_first 0/3, chosen_second 3/3.
    high = apply(FilterConfig("majority", balance=False, tau=0.9), JUDGMENTS, ps, seed=0)
    assert {(j.pair_id, j.order) for j in high} == {("p2", "chosen_second")}
    low = apply(FilterConfig("majority", balance=False, tau=0.6), JUDGMENTS, ps, seed=0)
    assert {(j.pair_id, j.order) for j in low} == {("p1", "chosen_first"), ("p1", "chosen_second"), ("p2", "chosen_second")}


def test_length_balanced_equalises_shorter_and_longer_winners():
    ps = {**pairs("p1", chosen_len=5, rejected_len=50), **pairs("p2", chosen_len=50, rejected_len=5)}
    kept = apply(FilterConfig("length_balanced", balance=False), JUDGMENTS, ps, seed=0)
    longer = [len(ps[j.pair_id].chosen) > len(ps[j.pair_id].rejected) for j in kept]
    assert longer.count(True) == longer.count(False) == 1


def test_balance_with_one_side_only_keeps_nothing():
    only_a = [J("p1", "chosen_first", 0, "A"), J("p2", "chosen_first", 0, "A")]
    assert balance(only_a, seed=0) == []


def test_filter_stage_keep_rate_is_per_judged_pair_and_order():
    """`filter/keep_rate` is the share of judged (pair, order) that give an example, not examples / judgments
    (which is at most 1/n with n judgments sampled per pair and order); the old ratio keeps an honest name."""
    from src.stages import filter as filter_stage
    from src.judging import JudgingConfig

    pool = list(pairs("p1", "p2", "p3", "p4").values())
    examples, stats = filter_stage.run(FilterConfig("correct", balance=False), JudgingConfig(n=3), JUDGMENTS, pool, seed=0)
    assert len(examples) == stats["kept"] == 3 and stats["judgments"] == 16
    assert stats["judged"] == 8  # (pair, order) with at least one judgment
    assert stats["keep_rate"] == 3 / 8
    assert stats["examples_per_judgment"] == 3 / 16
    # every pair and order right in all n samples: everything is kept, whatever n
    everywhere = [J(p, o, s, "A" if o == "chosen_first" else "B") for p in ("p1", "p2") for o in ("chosen_first", "chosen_second") for s in range(4)]
    _, full = filter_stage.run(FilterConfig("correct", balance=True), JudgingConfig(n=4), everywhere, pool, seed=0)
    assert full["keep_rate"] == 1.0 and full["examples_per_judgment"] == 1 / 4


def test_filter_stats_of_a_cached_unit_from_before_the_rename():
    """A filter unit cached before `keep_rate` meant per (pair, order) holds the old ratio under that name: it is
    logged as `examples_per_judgment`, and no `keep_rate` is logged for it (its meaning would be the old one)."""
    from src.stages import filter as filter_stage

    old = {"kept": 3, "judgments": 16, "keep_rate": 3 / 16, "kept_A": 2, "kept_B": 1}
    assert filter_stage.logged_stats(old) == {"kept": 3, "judgments": 16, "examples_per_judgment": 3 / 16, "kept_A": 2, "kept_B": 1}
    new = {"kept": 3, "judgments": 16, "judged": 8, "keep_rate": 3 / 8, "examples_per_judgment": 3 / 16}
    assert filter_stage.logged_stats(new) == new

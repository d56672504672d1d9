from src.analysis import verdict_flips, vote_ks


def test_vote_ks():
    assert vote_ks(1) == [1]
    assert vote_ks(2) == [1, 2]
    assert vote_ks(32) == [1, 2, 4, 8, 16, 32]
    assert vote_ks(5) == [1, 2, 4, 5]


def test_verdict_flips():
    before = {"a": "A", "b": "B", "c": None, "d": "A"}
    after = {"a": "B", "b": "B", "c": "A", "d": "B"}
    correct = {"a": "B", "b": "B", "c": "B", "d": "A"}
    f = verdict_flips(before, after, correct)
    assert f == {"flips": 0.75, "flips_to_correct": 0.25, "flips_to_wrong": 0.5, "n": 4.0}


def test_vote_k_curve_uses_the_first_k_samples():
    """The evaluate stage's curve: the official overall of a majority over the first k of one set of samples."""
    from src.records import EvalItem
    from src.stages.evaluate import vote_k_curve

    subsets = [("alpacaeval-easy", "Chat"), ("llmbar-natural", "Chat Hard"), ("donotanswer", "Safety"), ("math-prm", "Reasoning")]
    items = [EvalItem("rewardbench", f"i{n}", "chosen_first", "A", "parsed", "A",
                      {"subset": s, "section": sec, "id": n, "verdicts_k": ["A", "B", "B", "B"], "tokens_k": [3, 4, 5, 6]})
             for n, (s, sec) in enumerate(subsets)]
    curve = vote_k_curve(items)
    assert curve["rewardbench/vote_k/overall_k1"] == 1.0  # the first sample alone: right
    assert curve["rewardbench/vote_k/overall_k2"] == 0.5  # A vs B: a tie, no verdict, 0.5
    assert curve["rewardbench/vote_k/overall_k4"] == 0.0  # outvoted
    assert [curve[f"rewardbench/vote_k/tokens_k{k}"] for k in (1, 2, 4)] == [3.0, 7.0, 18.0]
    assert vote_k_curve([EvalItem("rewardbench", "x", "chosen_first", "A", "parsed", "A", {"subset": "math-prm"})]) == {}

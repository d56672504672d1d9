from src.rules.analysis import verdict_flips, vote_ks


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


def test_synthetic_vote_k_uses_the_first_k_samples_and_the_headline_rule():
    """Held-out synthetic pairs: majority over the first k samples, a tie or no verdict scores 0.5 (the headline rule)."""
    from src.records import EvalItem
    from src.stages.evaluate import synthetic_vote_k

    items = [EvalItem("synthetic", "p1", "chosen_first", "A", "parsed", "A", {"verdicts_k": ["A", "B", "B", "B"], "tokens_k": [3, 4, 5, 6]}),
             EvalItem("synthetic", "p1", "chosen_second", "B", "parsed", "B", {"verdicts_k": ["B", None, "B", "A"], "tokens_k": [1, 1, 1, 1]})]
    curve = synthetic_vote_k(items)
    assert curve["synthetic/vote_k/accuracy_k1"] == 1.0  # both first samples right
    assert curve["synthetic/vote_k/accuracy_k2"] == 0.75  # a tie (0.5) and a lone B among [B, None] (1)
    assert curve["synthetic/vote_k/accuracy_k4"] == 0.5  # outvoted (0) and B 2-1 (1)
    assert curve["synthetic/accuracy_maj4"] == curve["synthetic/vote_k/accuracy_k4"]
    assert [curve[f"synthetic/vote_k/tokens_k{k}"] for k in (1, 2, 4)] == [2.0, 4.5, 11.0]
    assert synthetic_vote_k([EvalItem("synthetic", "x", "chosen_first", "A", "parsed", "A", {})]) == {}

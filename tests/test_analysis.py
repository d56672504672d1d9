from src.analysis import majority, verdict_flips, vote_k_curve, vote_ks


def test_vote_ks():
    assert vote_ks(1) == [1]
    assert vote_ks(2) == [1, 2]
    assert vote_ks(32) == [1, 2, 4, 8, 16, 32]
    assert vote_ks(5) == [1, 2, 4, 5]


def test_majority_ties_and_missing():
    assert majority(["A", "B", "A"]) == "A"
    assert majority(["A", "B"]) is None
    assert majority([None, None, "B"]) == "B"
    assert majority([None]) is None


def test_vote_k_curve_uses_the_first_k_samples():
    samples = {
        # right at k=1, then outvoted
        "i1": (["A", "B", "B", "B"], [10, 10, 10, 10], "A"),
        # wrong at k=1, a tie at k=2 (0.5), right at 4
        "i2": (["B", "A", "A", "A"], [5, 5, 5, 5], "A"),
    }
    curve = vote_k_curve(samples, 4)
    assert curve[1] == {"accuracy": 0.5, "tokens_per_item": 7.5}
    assert curve[2] == {"accuracy": 0.5, "tokens_per_item": 15.0}  # i1 tie 0.5, i2 tie 0.5
    assert curve[4] == {"accuracy": 0.5, "tokens_per_item": 30.0}  # i1 wrong, i2 right
    samples["i1"] = (["A", "A", "B", "B"], [10] * 4, "A")
    assert vote_k_curve(samples, 4)[2]["accuracy"] == 0.75


def test_verdict_flips():
    before = {"a": "A", "b": "B", "c": None, "d": "A"}
    after = {"a": "B", "b": "B", "c": "A", "d": "B"}
    correct = {"a": "B", "b": "B", "c": "B", "d": "A"}
    f = verdict_flips(before, after, correct)
    assert f == {"flips": 0.75, "flips_to_correct": 0.25, "flips_to_wrong": 0.5, "n": 4.0}

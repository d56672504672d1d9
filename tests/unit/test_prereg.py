"""The pre-registered analysis (src/cli/prereg.py) on hand-made evaluation rows: the readings and the success rule
the design fixed before any result."""
from src.cli.prereg import analyse, pair_scores, stated, verdict


def row(item, order, verdict, chosen="A", constrained=None):
    return {"item_id": item, "order": order, "verdict": verdict, "chosen_label": chosen,
            "extra": {"constrained": constrained} if constrained else {}}


def test_readings_score_the_official_rule_and_the_constrained_choice():
    rows = [row("p1", "chosen_first", "A"), row("p1", "chosen_second", None, "B", constrained="B"),
            row("p2", "chosen_first", "B"), row("p2", "chosen_second", None, "B", constrained="A")]
    assert pair_scores(rows) == {"p1": 0.75, "p2": 0.25}  # no verdict = 0.5 under the official rule
    assert pair_scores(rows, "constrained") == {"p1": 1.0, "p2": 0.0}
    s = stated(rows)
    assert (s["n"], s["stated"], s["verdict_rate"], s["accuracy_stated"]) == (4, 2, 0.5, 0.5)


def test_success_needs_a_positive_and_significant_difference():
    base = {"n_items": 100.0, "lower": 0.0, "upper": 0.0}
    assert verdict({**base, "delta": 0.1, "p_value": 0.01}).startswith("success")
    assert verdict({**base, "delta": 0.1, "p_value": 0.2}) == "failure: no significant difference"
    assert verdict({**base, "delta": -0.1, "p_value": 0.01}).startswith("failure: iteration K is significantly less")
    assert verdict({**base, "n_items": 0.0, "delta": 0.0, "p_value": 1.0}).startswith("not tested")


def test_a_judge_that_only_learns_the_format_shows_in_s3_not_in_the_primary():
    """Iteration 0 states no verdict; iteration 1 states one at random: the primary stays near 0, S3 goes to 1."""
    import random

    rng = random.Random(0)
    first = [row(f"p{i}", o, None) for i in range(120) for o in ("chosen_first", "chosen_second")]
    last = [row(f"p{i}", o, rng.choice("AB")) for i in range(120) for o in ("chosen_first", "chosen_second")]
    text = analyse(first, last, None, None, 1)
    assert "failure: no significant difference" in text
    assert "| 0 | 240 | 0.000 |" in text and "| 1 | 240 | 1.000 |" in text

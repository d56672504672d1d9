"""Bootstrap intervals and the paired test behave as statistics should."""
import random

from src.stats import bootstrap_ci, item_scores, paired_test


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_more_items():
    rng = random.Random(0)
    small = [float(rng.random() < 0.7) for _ in range(20)]
    large = [float(rng.random() < 0.7) for _ in range(2000)]
    m, lo, hi = bootstrap_ci(small)
    assert lo <= m <= hi
    m2, lo2, hi2 = bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 3
    assert lo2 < 0.7 < hi2


def test_paired_test_detects_a_real_difference_and_not_a_null_one():
    rng = random.Random(1)
    a = {f"i{k}": float(rng.random() < 0.5) for k in range(300)}
    better = {k: 1.0 if rng.random() < 0.3 else v for k, v in a.items()}  # b fixes ~30% of items
    r = paired_test(a, better)
    assert r["delta"] > 0.1 and r["lower"] > 0 and r["p_value"] < 0.01
    same = paired_test(a, dict(a))
    assert same["delta"] == 0 and same["p_value"] == 1.0
    noise = paired_test(a, {k: float(rng.random() < 0.5) for k in a})
    assert noise["lower"] < 0 < noise["upper"]


def test_paired_test_only_uses_common_items():
    assert paired_test({"x": 1.0, "y": 0.0}, {"y": 1.0, "z": 0.0})["n_items"] == 1.0


def test_item_scores_average_orders_and_count_missing_verdicts_as_half():
    rows = [
        {"item_id": "a", "verdict": "A", "chosen_label": "A"},
        {"item_id": "a", "verdict": "A", "chosen_label": "B"},
        {"item_id": "b", "verdict": None, "chosen_label": "A"},
    ]
    assert item_scores(rows) == {"a": 0.5, "b": 0.5}

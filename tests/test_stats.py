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


def _official(means):
    from src.benchmarks import rewardbench as rb

    return rb.overall(rb.section_scores(means))


# One subset per section, two in Chat (so the official count weights matter), 2-3 items each: small enough to
# enumerate every bootstrap resample exactly.
_SMALL = {
    ("alpacaeval-easy", "1"): 1.0, ("alpacaeval-easy", "2"): 0.0,
    ("mt-bench-med", "3"): 1.0, ("mt-bench-med", "4"): 1.0, ("mt-bench-med", "5"): 0.5,
    ("llmbar-natural", "6"): 0.0, ("llmbar-natural", "7"): 1.0,
    ("donotanswer", "8"): 1.0, ("donotanswer", "9"): 0.5,
    ("math-prm", "10"): 0.0, ("math-prm", "11"): 1.0,
}


def _exact_bootstrap_distribution(items):
    """Every within-subset resample with its probability: the distribution a bootstrap estimates."""
    import itertools

    from src.stats import _strata

    strata = _strata(items)
    per_stratum = []
    for s, ids in strata.items():
        outcomes = {}
        for draw in itertools.product(ids, repeat=len(ids)):  # each equally likely
            m = sum(items[(s, i)] for i in draw) / len(ids)
            outcomes[m] = outcomes.get(m, 0) + 1 / len(ids) ** len(ids)
        per_stratum.append((s, list(outcomes.items())))
    dist = []
    for combo in itertools.product(*[o for _, o in per_stratum]):
        means = {s: m for (s, _), (m, _) in zip(per_stratum, combo)}
        p = 1.0
        for _, q in combo:
            p *= q
        dist.append((_official(means), p))
    return dist


def test_official_overall_interval_matches_brute_force_enumeration():
    import numpy as np

    from src.stats import stratified_bootstrap

    dist = sorted(_exact_bootstrap_distribution(_SMALL))
    values, probs = np.array([v for v, _ in dist]), np.array([p for _, p in dist])
    cdf = np.cumsum(probs)
    exact_lo, exact_hi = values[np.searchsorted(cdf, 0.025)], values[np.searchsorted(cdf, 0.975)]

    value, lo, hi = stratified_bootstrap(_SMALL, _official, n_boot=40000, seed=3)
    means = {}
    for (s, _), v in _SMALL.items():
        means.setdefault(s, []).append(v)
    assert value == _official({s: sum(v) / len(v) for s, v in means.items()})  # the point is the official number
    assert abs(lo - exact_lo) < 0.02 and abs(hi - exact_hi) < 0.02
    # and it is not the interval of the plain item mean: the official weights move it
    plain = sum(_SMALL.values()) / len(_SMALL)
    assert abs(value - plain) > 0.05


def test_paired_official_overall_test():
    import random

    from src.stats import paired_stratified_test

    rng = random.Random(0)
    subsets = ["alpacaeval-easy", "llmbar-natural", "donotanswer", "math-prm", "hep-python"]
    a = {(s, str(i)): float(rng.random() < 0.5) for s in subsets for i in range(60)}
    same = paired_stratified_test(a, dict(a), _official)
    assert same["delta"] == 0 and same["lower"] == same["upper"] == 0 and same["p_value"] == 1.0
    better = {k: 1.0 if k[0] == "math-prm" else v for k, v in a.items()}  # only Reasoning improves
    t = paired_stratified_test(a, better, _official)
    assert t["delta"] > 0.05 and t["lower"] > 0 and t["p_value"] < 0.01
    noise = {k: float(rng.random() < 0.5) for k in a}
    t = paired_stratified_test(a, noise, _official)
    assert t["lower"] < 0 < t["upper"] and t["p_value"] > 0.05

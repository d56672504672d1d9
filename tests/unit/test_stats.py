"""Bootstrap intervals and the paired test behave as statistics should."""
import random

from src.rules.stats import bootstrap_ci, item_scores, paired_test


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

    from src.rules.stats import _strata

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

    from src.rules.stats import stratified_bootstrap

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

    from src.rules.stats import paired_stratified_test

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


# MT-Bench-like counts: (turn, key) -> (agreeing comparisons, comparisons), 2-3 keys per turn, few enough to
# enumerate every resample.
_RATIO = {("t1", "a"): (2.0, 3.0), ("t1", "b"): (0.0, 1.0), ("t1", "c"): (1.0, 4.0), ("t2", "d"): (3.0, 3.0), ("t2", "e"): (0.0, 2.0)}


def test_pooled_rate_interval_matches_brute_force_enumeration():
    import itertools

    import numpy as np

    from src.rules.stats import ratio_bootstrap

    strata: dict[str, list] = {}
    for (s, _), c in sorted(_RATIO.items()):
        strata.setdefault(s, []).append(c)
    dist = []
    for draws in itertools.product(*[itertools.product(v, repeat=len(v)) for v in strata.values()]):
        picked = [c for d in draws for c in d]
        p = np.prod([1 / len(v) ** len(v) for v in strata.values()])
        dist.append((sum(c[0] for c in picked) / sum(c[1] for c in picked), p))
    dist.sort()
    values, cdf = np.array([v for v, _ in dist]), np.cumsum([p for _, p in dist])
    exact_lo, exact_hi = values[np.searchsorted(cdf, 0.025)], values[np.searchsorted(cdf, 0.975)]

    value, lo, hi = ratio_bootstrap(_RATIO, n_boot=40000, seed=1)
    assert value == 6 / 13  # pooled over comparisons, as FastChat's agreement is
    assert abs(lo - exact_lo) < 0.03 and abs(hi - exact_hi) < 0.03
    assert abs(value - np.mean([a / n for a, n in _RATIO.values()])) > 0.05  # not the mean of per-key rates


def test_paired_pooled_rate_test():
    import random

    from src.rules.stats import paired_ratio_test

    rng = random.Random(0)
    a = {(f"t{t}", str(i)): (float(rng.randint(0, 3)), 3.0) for t in (1, 2) for i in range(80)}
    same = paired_ratio_test(a, dict(a))
    assert same["delta"] == 0 and same["lower"] == same["upper"] == 0 and same["p_value"] == 1.0
    better = {k: (3.0, 3.0) if k[0] == "t2" else v for k, v in a.items()}
    t = paired_ratio_test(a, better)
    assert t["delta"] > 0.1 and t["lower"] > 0 and t["p_value"] < 0.01 and t["n_items"] == 160
    noise = {k: (float(rng.randint(0, 3)), 3.0) for k in a}
    t = paired_ratio_test(a, noise)
    assert t["lower"] < 0 < t["upper"] and t["p_value"] > 0.05


def test_per_key_agreement_sums_to_the_official_agreement():
    """On real MT-Bench expert votes and arbitrary judge verdicts, the per-key counts the interval resamples add up
    to the FastChat agreement the run logs (S1 and S2)."""
    import random

    from src.benchmarks import mtbench
    from tests.conftest import DATA_ROOT

    rows = mtbench.load_mtbench_human(str(DATA_ROOT / "mtbench" / "human_judgments.jsonl.gz"), require_conversations=False)
    keyed = mtbench.stratified_slice(rows, 30, seed=0)
    rng = random.Random(0)
    records = [{**{k: r[k] for k in ("question_id", "model_a", "model_b", "turn")}, "order": o,
                "verdict": rng.choice(["A", "B", "tie", None])} for r in keyed for o in ("ab", "ba")]
    humans = mtbench.human_rows_from_keyed(keyed)
    logged = mtbench.mtbench_metrics(records, humans)
    per_key = mtbench.agreement_by_key(records, humans)
    assert len(per_key) == 30
    for s in ("s1", "s2"):
        agree, total = (sum(c[s][i] for c in per_key.values()) for i in (0, 1))
        assert total == logged[f"mtbench/n_{s}"] and agree / total == logged[f"mtbench/agreement_{s}"]

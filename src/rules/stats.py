"""Uncertainty for comparisons between runs. Pure functions over per-item scores.

Benchmarks here are small (a CPU slice of RewardBench is 23 items), so a difference between two runs means
little without an interval: bootstrap confidence intervals for one run, and a paired test for two runs
scored on the same items (pairing removes the between-item variance that dominates these benchmarks).
"""
from __future__ import annotations

import random
from typing import Callable, Mapping, Sequence


def bootstrap_ci(scores: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lower, upper): percentile bootstrap over items."""
    if not scores:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(scores)
    means = sorted(sum(scores[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo, hi = means[int(alpha / 2 * n_boot)], means[min(n_boot - 1, int((1 - alpha / 2) * n_boot))]
    return sum(scores) / n, lo, hi


def paired_test(a: Mapping[str, float], b: Mapping[str, float], n_boot: int = 2000, n_perm: int = 5000, alpha: float = 0.05, seed: int = 0) -> dict[str, float]:
    """Compare run b against run a on the items both scored.

    delta = mean(b - a) with a paired-bootstrap interval, and a two-sided sign-flip permutation p-value for
    the null hypothesis that the two runs are exchangeable on every item.
    """
    common = sorted(set(a) & set(b))
    if not common:
        return {"n_items": 0.0, "delta": float("nan"), "lower": float("nan"), "upper": float("nan"), "p_value": float("nan")}
    diffs = [b[k] - a[k] for k in common]
    delta, lo, hi = bootstrap_ci(diffs, n_boot, alpha, seed)
    rng = random.Random(seed + 1)
    observed = abs(sum(diffs))
    nonzero = [d for d in diffs if d != 0]
    extreme = sum(abs(sum(d if rng.random() < 0.5 else -d for d in nonzero)) >= observed - 1e-12 for _ in range(n_perm))
    return {"n_items": float(len(common)), "delta": delta, "lower": lo, "upper": hi, "p_value": (extreme + 1) / (n_perm + 1)}


def item_scores(rows: Sequence[Mapping], key=lambda r: r["item_id"]) -> dict[str, float]:
    """Per-item accuracy from evaluation rows (EvalItem dicts): mean over the item's orders, no verdict = 0.5."""
    per: dict[str, list[float]] = {}
    for r in rows:
        v = r["verdict"]
        per.setdefault(key(r), []).append(0.5 if v is None else float(v == r["chosen_label"]))
    return {k: sum(v) / len(v) for k, v in per.items()}


Statistic = Callable[[Mapping[str, "np.ndarray"]], "np.ndarray"]


def _strata(items: Mapping[tuple[str, str], float]) -> dict[str, list[str]]:
    by: dict[str, list[str]] = {}
    for stratum, item in sorted(items):
        by.setdefault(stratum, []).append(item)
    return by


def stratified_bootstrap(
    items: Mapping[tuple[str, str], float], statistic: Statistic, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(value, lower, upper) of a statistic computed from per-stratum means, e.g. the official RewardBench overall
    (per-subset accuracy -> count-weighted sections -> mean of sections).

    `items` maps (stratum, item id) -> item score. Items are resampled with replacement *within* their stratum,
    so every replicate has the same subsets at the same sizes as the run itself, and the statistic is recomputed
    on each replicate: the interval is on the published number, not on the plain item mean (which weighs
    subsets by their size in the slice, not by the official counts). `statistic` gets {stratum: array of
    n_boot means} and must work element-wise on arrays (plain arithmetic does).
    """
    import numpy as np

    if not items:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots, point = {}, {}
    for stratum, ids in _strata(items).items():
        scores = np.array([items[(stratum, i)] for i in ids], dtype=float)
        point[stratum] = scores.mean()
        boots[stratum] = scores[rng.integers(0, len(scores), (n_boot, len(scores)))].mean(axis=1)
    reps = np.asarray(statistic(boots), dtype=float)
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return float(statistic(point)), float(lo), float(hi)


def paired_stratified_test(
    a: Mapping[tuple[str, str], float], b: Mapping[tuple[str, str], float], statistic: Statistic,
    n_boot: int = 2000, n_perm: int = 5000, alpha: float = 0.05, seed: int = 0,
) -> dict[str, float]:
    """Run b against run a on the items both scored, on the statistic itself: delta = statistic(b) - statistic(a)
    with a paired stratified bootstrap interval (the same resampled items for both runs), and a two-sided
    p-value from randomly swapping the two runs' scores item by item (the null: the runs are exchangeable on
    every item), the statistic recomputed on each permutation."""
    import numpy as np

    common = sorted(set(a) & set(b))
    if not common:
        return {"n_items": 0.0, "delta": float("nan"), "lower": float("nan"), "upper": float("nan"), "p_value": float("nan")}
    rng = np.random.default_rng(seed)
    point_a, point_b, boot_a, boot_b, perm_a, perm_b = {}, {}, {}, {}, {}, {}
    for stratum, ids in _strata(dict.fromkeys(common, 0.0)).items():
        sa = np.array([a[(stratum, i)] for i in ids], dtype=float)
        sb = np.array([b[(stratum, i)] for i in ids], dtype=float)
        point_a[stratum], point_b[stratum] = sa.mean(), sb.mean()
        idx = rng.integers(0, len(ids), (n_boot, len(ids)))
        boot_a[stratum], boot_b[stratum] = sa[idx].mean(axis=1), sb[idx].mean(axis=1)
        swap = rng.random((n_perm, len(ids))) < 0.5
        perm_a[stratum] = np.where(swap, sb, sa).mean(axis=1)
        perm_b[stratum] = np.where(swap, sa, sb).mean(axis=1)
    delta = float(statistic(point_b) - statistic(point_a))
    reps = np.asarray(statistic(boot_b), dtype=float) - np.asarray(statistic(boot_a), dtype=float)
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    null = np.abs(np.asarray(statistic(perm_b), dtype=float) - np.asarray(statistic(perm_a), dtype=float))
    p = (int((null >= abs(delta) - 1e-12).sum()) + 1) / (n_perm + 1)
    return {"n_items": float(len(common)), "delta": delta, "lower": float(lo), "upper": float(hi), "p_value": p}


def _ratio_strata(counts: Mapping[tuple[str, str], tuple[float, float]], keys) -> dict[str, "np.ndarray"]:
    import numpy as np

    by: dict[str, list] = {}
    for stratum, item in keys:
        by.setdefault(stratum, []).append(counts[(stratum, item)])
    return {s: np.array(v, dtype=float).reshape(-1, 2) for s, v in sorted(by.items())}


def _rate(num, den):
    import numpy as np

    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def ratio_bootstrap(
    counts: Mapping[tuple[str, str], tuple[float, float]], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(value, lower, upper) of a pooled rate sum(num) / sum(den) over items, e.g. MT-Bench human agreement: an item
    is a (question, model pair, turn) key with `den` expert comparisons, `num` of them agreeing with the judge.

    `counts` maps (stratum, item id) -> (num, den). Items (not comparisons: the votes on one key share the judge's
    one vote) are resampled with replacement within their stratum (MT-Bench: the turn, which the slice balances)
    and the pooled rate recomputed. A resample with no comparison at all has no rate and is left out."""
    import numpy as np

    if not counts:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    num, den = np.zeros(n_boot), np.zeros(n_boot)
    for arr in _ratio_strata(counts, sorted(counts)).values():
        idx = rng.integers(0, len(arr), (n_boot, len(arr)))
        num += arr[idx, 0].sum(axis=1)
        den += arr[idx, 1].sum(axis=1)
    total = np.array(list(counts.values()), dtype=float).reshape(-1, 2).sum(axis=0)
    value = float(_rate(total[0], total[1]))
    reps = _rate(num, den)
    if np.isnan(reps).all():
        return value, float("nan"), float("nan")
    lo, hi = np.nanquantile(reps, [alpha / 2, 1 - alpha / 2])
    return value, float(lo), float(hi)


def paired_ratio_test(
    a: Mapping[tuple[str, str], tuple[float, float]], b: Mapping[tuple[str, str], tuple[float, float]],
    n_boot: int = 2000, n_perm: int = 5000, alpha: float = 0.05, seed: int = 0,
) -> dict[str, float]:
    """Run b against run a on the pooled rate over the items both judged (as `ratio_bootstrap`): delta = rate(b) -
    rate(a), an interval from resampling the same items for both runs within their strata, and a two-sided p-value
    from swapping the two runs' (num, den) item by item."""
    import numpy as np

    common = sorted(set(a) & set(b))
    if not common:
        return {"n_items": 0.0, "delta": float("nan"), "lower": float("nan"), "upper": float("nan"), "p_value": float("nan")}
    rng = np.random.default_rng(seed)
    sa, sb = _ratio_strata(a, common), _ratio_strata(b, common)
    boot = {r: [np.zeros(n_boot), np.zeros(n_boot)] for r in "ab"}
    perm = {r: [np.zeros(n_perm), np.zeros(n_perm)] for r in "ab"}
    for s in sa:
        xa, xb = sa[s], sb[s]
        idx = rng.integers(0, len(xa), (n_boot, len(xa)))
        swap = rng.random((n_perm, len(xa), 1)) < 0.5
        pa, pb = np.where(swap, xb, xa), np.where(swap, xa, xb)
        for r, x, p in (("a", xa, pa), ("b", xb, pb)):
            for c in (0, 1):
                boot[r][c] += x[idx, c].sum(axis=1)
                perm[r][c] += p[..., c].sum(axis=1)
    ta = np.concatenate(list(sa.values())).sum(axis=0)
    tb = np.concatenate(list(sb.values())).sum(axis=0)
    delta = float(_rate(tb[0], tb[1]) - _rate(ta[0], ta[1]))
    reps = _rate(*boot["b"]) - _rate(*boot["a"])
    lo, hi = np.nanquantile(reps, [alpha / 2, 1 - alpha / 2]) if not np.isnan(reps).all() else (float("nan"), float("nan"))
    null = np.abs(_rate(*perm["b"]) - _rate(*perm["a"]))
    null = null[~np.isnan(null)]
    p = (int((null >= abs(delta) - 1e-12).sum()) + 1) / (len(null) + 1) if delta == delta else float("nan")
    return {"n_items": float(len(common)), "delta": delta, "lower": float(lo), "upper": float(hi), "p_value": p}

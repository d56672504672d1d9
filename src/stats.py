"""Uncertainty for comparisons between runs. Pure functions over per-item scores.

Benchmarks here are small (a CPU slice of RewardBench is 23 items), so a difference between two runs means
little without an interval: bootstrap confidence intervals for one run, and a paired test for two runs
scored on the same items (pairing removes the between-item variance that dominates these benchmarks).
"""
from __future__ import annotations

import random
from typing import Mapping, Sequence


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

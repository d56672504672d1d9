"""What a reviewer asks of a self-taught judge across iterations: what extra votes buy (the k values of a vote-k
curve; the curve itself is `stages/evaluate.py::vote_k`, on RewardBench's official overall and on held-out pairs), and whether position bias
grows as the judge trains on itself (Meta-Rewarding, Wu et al. 2024, saw it grow). Pure functions over per-item
verdicts; the evaluate stage's rows carry them.
"""
from __future__ import annotations

from typing import Mapping


def vote_ks(max_k: int) -> list[int]:
    """1, 2, 4, ... up to max_k (max_k itself always included)."""
    ks, k = [], 1
    while k < max_k:
        ks.append(k)
        k *= 2
    return ks + [max_k] if max_k >= 1 else []


def verdict_flips(before: Mapping[str, str | None], after: Mapping[str, str | None], correct: Mapping[str, str]) -> dict[str, float]:
    """Between two iterations' verdicts on the same (item, order) keys: the share whose verdict changed, split into
    flips to the correct verdict and to a wrong one (a verdict lost or gained counts as a change)."""
    common = sorted(set(before) & set(after))
    if not common:
        return {"flips": float("nan"), "flips_to_correct": float("nan"), "flips_to_wrong": float("nan"), "n": 0.0}
    changed = [k for k in common if before[k] != after[k]]
    to_correct = sum(after[k] == correct[k] for k in changed)
    n = len(common)
    return {"flips": len(changed) / n, "flips_to_correct": to_correct / n, "flips_to_wrong": (len(changed) - to_correct) / n, "n": float(n)}

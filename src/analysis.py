"""What a reviewer asks of a self-taught judge across iterations: what extra votes buy, and whether position bias
grows as the judge trains on itself (Meta-Rewarding, Wu et al. 2024, saw it grow). Pure functions over per-item
verdicts; the evaluate stage's rows carry them.
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence


def vote_ks(max_k: int) -> list[int]:
    """1, 2, 4, ... up to max_k (max_k itself always included)."""
    ks, k = [], 1
    while k < max_k:
        ks.append(k)
        k *= 2
    return ks + [max_k] if max_k >= 1 else []


def majority(verdicts: Sequence[str | None]) -> str | None:
    """The most frequent verdict among those stated; a tie or no verdict at all: None (scores 0.5)."""
    counts = Counter(v for v in verdicts if v is not None)
    if not counts:
        return None
    (top, n), *rest = counts.most_common()
    return None if rest and rest[0][1] == n else top


def vote_k_curve(samples: Mapping[str, tuple[Sequence[str | None], Sequence[int], str]], max_k: int) -> dict[int, dict[str, float]]:
    """Accuracy of the majority of the FIRST k samples, for k = 1, 2, 4, ..., max_k, from one set of max_k
    samples per item (no resampling per k, so the curve is what running with k samples would have given).

    `samples` maps item -> (verdicts in sampling order, generated tokens of each sample, the correct label).
    Returns {k: {"accuracy": ..., "tokens_per_item": ...}}; no verdict scores 0.5.
    """
    out: dict[int, dict[str, float]] = {}
    for k in vote_ks(max_k):
        scores, tokens = [], []
        for verdicts, toks, label in samples.values():
            v = majority(verdicts[:k])
            scores.append(0.5 if v is None else float(v == label))
            tokens.append(sum(toks[:k]))
        n = len(scores) or 1
        out[k] = {"accuracy": sum(scores) / n, "tokens_per_item": sum(tokens) / n}
    return out


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

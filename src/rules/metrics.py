"""Scoring a judge on pairs with a known better response. Pure functions over EvalItem records."""
from __future__ import annotations

from collections import defaultdict

from src.records import EvalItem


def item_score(verdict: str | None, chosen_label: str) -> float:
    """1 if the judge picked the better response, 0 if the worse, 0.5 without a verdict (RewardBench's rule
    for generative judges: a parse failure is a coin flip, not a loss)."""
    if verdict is None:
        return 0.5
    return 1.0 if verdict == chosen_label else 0.0


def accuracy(items: list[EvalItem]) -> float:
    return sum(item_score(i.verdict, i.chosen_label) for i in items) / len(items) if items else float("nan")


def parse_fail(items: list[EvalItem]) -> float:
    """Share of judgments with no verdict (for the text reading: the text states none)."""
    return sum(i.verdict is None for i in items) / len(items) if items else float("nan")


def swap_consistency(items: list[EvalItem]) -> float:
    """Among items judged in both orders, the share where both orders pick the same underlying response.
    A missing verdict counts as inconsistent."""
    by_item: dict[str, dict[str, EvalItem]] = defaultdict(dict)
    for i in items:
        by_item[i.item_id][i.order] = i
    both = [d for d in by_item.values() if len(d) == 2]
    if not both:
        return float("nan")
    same = sum(
        d["chosen_first"].verdict is not None
        and d["chosen_second"].verdict is not None
        and (d["chosen_first"].verdict == "A") == (d["chosen_second"].verdict == "B")
        for d in both
    )
    return same / len(both)


def position_bias(items: list[EvalItem]) -> float:
    """Share of verdicts that say A (0.5 = no position preference on balanced orders)."""
    v = [i.verdict for i in items if i.verdict is not None]
    return sum(x == "A" for x in v) / len(v) if v else float("nan")


def synthetic_metrics(items: list[EvalItem]) -> dict[str, float]:
    """Held-out synthetic pairs, scored on each item's `verdict` (the evaluate stage passes the paper's rule
    applied to the text for synthetic/*, the constrained reading for synthetic/constrained/*)."""
    return {
        "synthetic/accuracy": accuracy(items),
        "synthetic/parse_fail": parse_fail(items),
        "synthetic/swap_consistency": swap_consistency(items),
        "synthetic/frac_A": position_bias(items),
        "synthetic/n": float(len(items)),
    }

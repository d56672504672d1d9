"""Reading a verdict out of a judgment. Pure functions.

Three parsers, each where it belongs:
* `parse_verdict`, the paper's rule: training data (judge stage) and `synthetic/*`;
* `rewardbench_verdict`, RewardBench's official `process_judgement`: `rewardbench/*`;
* `fastchat_verdict`, FastChat llm_judge's pairwise parse (per presentation order): `mtbench/*`.
"""
from __future__ import annotations

TAGS = {"A": "[[A]]", "B": "[[B]]"}


def parse_verdict(text: str) -> str | None:
    """"A" or "B" when exactly one of the tags [[A]] / [[B]] appears; both or none: None.

    As in the paper's code, a judgment naming both is invalid rather than "the last one wins": a chain that
    writes "[[A]]... no, [[B]]" has not committed to a verdict.
    """
    has_a, has_b = TAGS["A"] in text, TAGS["B"] in text
    if has_a == has_b:
        return None
    return "A" if has_a else "B"


def rewardbench_verdict(text: str) -> str | None:
    """allenai/reward-bench `process_judgement` (default model_modifier): "[[A]]" in the text -> "A", elif "[[B]]"
    -> "B", else None (the official "error", scored 0.5). A text naming both counts as A."""
    if TAGS["A"] in text:
        return "A"
    if TAGS["B"] in text:
        return "B"
    return None


def fastchat_verdict(text: str) -> str | None:
    """FastChat llm_judge `run_judge_pair` for the "[[A]]" output format: "A", "B", "tie" ("[[C]]"), or None
    (FastChat's "error"), checked in that order."""
    for tag, verdict in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if tag in text:
            return verdict
    return None


def flip(verdict: str | None) -> str | None:
    return {"A": "B", "B": "A"}.get(verdict) if verdict else None

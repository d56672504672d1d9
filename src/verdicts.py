"""Reading a verdict out of a judgment. Pure functions."""
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


def flip(verdict: str | None) -> str | None:
    return {"A": "B", "B": "A"}.get(verdict) if verdict else None

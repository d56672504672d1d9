"""Label-noise audit of synthetic pairs against verifiable references. Pure functions.

The method assumes that the answer to x (chosen) beats the answer to the modified instruction x' (rejected).
Where the pool carries a reference final answer (GSM8K `#### 18`, MATH `\\boxed{...}`), that assumption can be
checked without a model: extract each response's final answer and compare it with the reference. No code is
executed here (unit-test audits of code pools are a separate, opt-in sandbox).

Outcomes per pair, with chosen right/wrong x rejected right/wrong:
  clean          chosen right, rejected wrong   (the label is what the method assumes)
  inverted       chosen wrong, rejected right   (the label is backwards)
  both_right     both right                     (no real preference: a noisy pair)
  neither_right  both wrong                     (the preference rests on something else than correctness)
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Iterable

OUTCOMES = ("clean", "inverted", "both_right", "neither_right")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1] if depth == 0 else None


def reference_answer(solution: str) -> str | None:
    """The reference final answer of a GSM8K answer (`#### 18`) or a MATH solution (last `\\boxed{}`)."""
    if "####" in solution:
        return solution.rsplit("####", 1)[1].strip()
    return last_boxed(solution)


_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*\$?([^\n$]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def final_answer(response: str) -> str | None:
    """A response's final answer: the last \\boxed{}, else what follows '####', else 'the answer is ...', else
    the last number in the text (GSM8K-style answers state the number last)."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    if "####" in response:
        tail = response.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0] if tail else None
    said = _ANSWER_IS.findall(response)
    if said:
        clause = said[-1].strip()
        numbers = _NUMBER.findall(clause)
        # "the answer is 1,000 dollars.": the number, without its unit; a LaTeX clause is kept whole
        return numbers[0] if numbers and "\\" not in clause else clause
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def normalise_answer(answer: str) -> str:
    """Surface form differences that do not change the answer: $, spaces, thousands commas, trailing period,
    \\text{...} units, \\left/\\right, \\dfrac/\\tfrac, degrees, a leading 'x ='."""
    a = answer.strip().strip("$").strip()
    a = re.sub(r"\\text\{[^}]*\}", "", a)
    a = re.sub(r"\\(left|right)", "", a)
    a = a.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "")
    a = re.sub(r"^[a-zA-Z]\s*=", "", a)
    a = a.replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", a):
        a = a.replace(",", "")
    return a


def _number(a: str) -> Fraction | None:
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}", a)
    if m:
        return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1)
    try:
        return Fraction(a)  # integers, decimals and a/b
    except (ValueError, ZeroDivisionError):
        return None


def same_answer(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    p, r = normalise_answer(predicted), normalise_answer(reference)
    if p == r:
        return True
    np_, nr = _number(p), _number(r)
    return np_ is not None and np_ == nr


def outcome(chosen: str, rejected: str, reference: str) -> str:
    c, r = same_answer(final_answer(chosen), reference), same_answer(final_answer(rejected), reference)
    return {(True, False): "clean", (False, True): "inverted", (True, True): "both_right", (False, False): "neither_right"}[(c, r)]


def audit_stats(outcomes: Iterable[str]) -> dict[str, float]:
    """`audit/<outcome>` shares, plus `audit/pairs`, `audit/chosen_wrong` and `audit/rejected_right`."""
    outs = list(outcomes)
    n = len(outs)
    stats: dict[str, float] = {"audit/pairs": float(n)}
    if not n:
        return stats
    for o in OUTCOMES:
        stats[f"audit/{o}"] = sum(x == o for x in outs) / n
    stats["audit/chosen_wrong"] = stats["audit/inverted"] + stats["audit/neither_right"]
    stats["audit/rejected_right"] = stats["audit/inverted"] + stats["audit/both_right"]
    return stats

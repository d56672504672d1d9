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
VERSION = 1  # of the audit stage's output (the pipeline's `audit` unit): bump when the reading of answers changes


def key(generate_key: str) -> str:
    """The audit unit's key: the pairs (whose key names the selected instructions and their references)."""
    from .cache import make_key

    return make_key("audit", VERSION, {}, {"pairs": generate_key})


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
    """Shares of the pairs, as the issue asks them: `audit/chosen_wrong`, `audit/rejected_right`, `audit/both` (chosen
    wrong AND rejected right: the label is backwards, the `inverted` outcome) and `audit/neither` (neither: the label
    is what the method assumes, `clean`); plus the two other cells, `audit/both_right` and `audit/neither_right`
    (no preference by correctness), and `audit/pairs`. The four outcome shares sum to 1."""
    outs = list(outcomes)
    n = len(outs)
    stats: dict[str, float] = {"audit/pairs": float(n)}
    if not n:
        return stats
    share = {o: sum(x == o for x in outs) / n for o in OUTCOMES}
    stats.update({
        "audit/chosen_wrong": share["inverted"] + share["neither_right"],
        "audit/rejected_right": share["inverted"] + share["both_right"],
        "audit/both": share["inverted"],
        "audit/neither": share["clean"],
        "audit/both_right": share["both_right"],
        "audit/neither_right": share["neither_right"],
    })
    return stats


def audit_pairs(references: dict[str, str | None], pairs: Iterable) -> tuple[list[dict], dict[str, float]]:
    """Audit every pair whose instruction has a reference solution (`references`: instruction id -> the pool's
    reference, e.g. a GSM8K answer or a MATH solution; pairs are keyed by their instruction's id). Rows: one per
    audited pair, with the answers as read; stats: `audit_stats` over all of them, and `audit/no_answer/<role>`,
    the share of responses in which no final answer was found (counted wrong)."""
    rows = []
    for p in pairs:
        ref = reference_answer(references[p.id]) if references.get(p.id) else None
        if ref is None:
            continue
        c, r = final_answer(p.chosen), final_answer(p.rejected)
        rows.append({"pair_id": p.id, "split": p.split, "reference": ref, "chosen_answer": c, "rejected_answer": r,
                     "outcome": outcome(p.chosen, p.rejected, ref)})
    stats = audit_stats(row["outcome"] for row in rows)
    if rows:
        stats["audit/no_answer/chosen"] = sum(row["chosen_answer"] is None for row in rows) / len(rows)
        stats["audit/no_answer/rejected"] = sum(row["rejected_answer"] is None for row in rows) / len(rows)
    return rows, stats

"""Label-noise audit of synthetic pairs against verifiable references. Pure functions.

The method assumes that the answer to x (chosen) beats the answer to the modified instruction x' (rejected).
Where the pool carries a reference final answer (GSM8K `#### 18`, MATH `\\boxed{...}`), that assumption can be
checked without a model: extract each response's final answer and compare it with the reference. Code pools
(HumanEval `test` + `entry_point`, MBPP `test_list` + `test_setup_code`) are checked by running their unit tests on
each response: this module only assembles the programs (`code_program`); `src/sandbox.py` runs them, and only under
the opt-in `audit=execute`. Where no reference exists, an audit judge's votes estimate the same thing
(`judge_outcome`, `judge_audit_stats`: `audit/judge/*`, kept apart from the exact cells).

Outcomes per pair, with chosen right/wrong x rejected right/wrong:
  clean          chosen right, rejected wrong   (the label is what the method assumes)
  inverted       chosen wrong, rejected right   (the label is backwards)
  both_right     both right                     (no real preference: a noisy pair)
  neither_right  both wrong                     (the preference rests on something else than correctness)
"""
from __future__ import annotations

import ast
import builtins
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
        if not tail:
            return None
        line = tail.splitlines()[0]
        numbers = _NUMBER.findall(line)
        return numbers[0] if numbers and "\\" not in line else line  # "#### 18 eggs": 18
    said = _ANSWER_IS.findall(response)
    if said:
        clause = said[-1].strip()
        clause = clause.rsplit("=", 1)[1].strip() if "=" in clause else clause  # "3 x 12 = 36": the result
        numbers = _NUMBER.findall(clause)
        # "the answer is 1,000 dollars.": the number, without its unit; a LaTeX clause is kept whole
        return numbers[0] if numbers and "\\" not in clause else clause
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


def normalise_answer(answer: str) -> str:
    """Surface form differences that do not change the answer: $, spaces, thousands commas, trailing period,
    \\text{...} units after a value, \\left/\\right, \\dfrac/\\tfrac, brace-less \\frac12, percent signs,
    degrees, a leading 'x ='. An answer that is all \\text{...} (\\text{Monday}, \\text{(C)}) keeps its words:
    deleting them made 68 of MATH's 5,000 references empty."""
    a = answer.strip().strip("$").strip()
    without_text = re.sub(r"\\(?:text|textbf|mbox)\{[^}]*\}", "", a).strip()
    if re.search(r"\d", without_text):
        a = without_text  # 5\text{ cm}: a value with its unit
    else:
        a = re.sub(r"\\(?:text|textbf|mbox)\{([^}]*)\}", r"\1", a)  # words are the answer
    a = re.sub(r"\\(left|right)", "", a)
    a = a.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "")
    # \\frac12, \\frac1{2}, \\frac{1}2: the brace-less forms LaTeX accepts for one-character arguments
    a = re.sub(r"\\frac\s*(\d|\{[^{}]*\})\s*(\d|\{[^{}]*\})",
               lambda m: "\\frac{" + m.group(1).strip("{}") + "}{" + m.group(2).strip("{}") + "}", a)
    a = a.replace("\\%", "").replace("%", "")
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
    if not r:  # an unreadable reference matches nothing (it used to match every empty prediction)
        return False
    if p == r:
        return True
    np_, nr = _number(p), _number(r)
    return np_ is not None and np_ == nr


def outcome(chosen: str, rejected: str, reference: str) -> str:
    return cell(same_answer(final_answer(chosen), reference), same_answer(final_answer(rejected), reference))


def audit_stats(outcomes: Iterable[str]) -> dict[str, float]:
    """Shares of the pairs: `audit/chosen_wrong`, `audit/rejected_right`, and one per outcome, named as the outcome:
    `audit/clean` (chosen right, rejected wrong: the label is what the method assumes), `audit/inverted` (chosen wrong
    AND rejected right: the label is backwards), `audit/both_right` and `audit/neither_right` (no preference by
    correctness); plus `audit/pairs`. The four outcome shares sum to 1. (Before, `audit/neither` held the clean share,
    "neither wrong", and `audit/both` the inverted one, "both errors": `RENAMED`.)"""
    outs = list(outcomes)
    n = len(outs)
    stats: dict[str, float] = {"audit/pairs": float(n)}
    if not n:
        return stats
    share = {o: sum(x == o for x in outs) / n for o in OUTCOMES}
    stats.update({
        "audit/chosen_wrong": share["inverted"] + share["neither_right"],
        "audit/rejected_right": share["inverted"] + share["both_right"],
        **{f"audit/{o}": share[o] for o in OUTCOMES},
    })
    return stats


# the names the clean and inverted shares were logged under before they were named as their outcomes
RENAMED = {"audit/neither": "audit/clean", "audit/both": "audit/inverted"}


def current_names(stats: dict) -> dict:
    """`stats` with the names of `RENAMED` replaced (an audit unit cached before the rename holds the old ones)."""
    return {RENAMED.get(k, k): v for k, v in stats.items()}


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


def cell(chosen_right: bool, rejected_right: bool) -> str:
    """The outcome of a pair from whether each response is right (by answer or by unit tests)."""
    return {(True, False): "clean", (False, True): "inverted", (True, True): "both_right", (False, False): "neither_right"}[(chosen_right, rejected_right)]


# ---- code pools: a response + the reference unit tests -> one program (run by src/sandbox.py, opt-in) ----

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)  # an unclosed fence: a response cut off


def extract_code(response: str, name: str | None = None) -> str:
    """The code of a response: its ``` fenced blocks (python or unlabelled; a block left open by a cut-off response
    runs to the end), preferring the first that defines `name`, else the first that defines a function, else the
    first; no fence: the whole text."""
    blocks = [body for lang, body in _FENCE.findall(response) if lang.lower() in ("", "python", "python3", "py")]
    if not blocks:
        return response
    for pattern in ([rf"(?m)^\s*def\s+{re.escape(name)}\s*\("] if name else []) + [r"(?m)^\s*def\s+\w+\s*\("]:
        hit = next((b for b in blocks if re.search(pattern, b)), None)
        if hit is not None:
            return hit
    return blocks[0]


def _defines(code: str, name: str) -> bool:
    return re.search(rf"(?m)^def\s+{re.escape(name)}\s*\(", code) is not None


def humaneval_program(prompt: str, entry_point: str, test: str, response: str) -> str:
    """A HumanEval problem's test program for one response. A response that defines `entry_point` at top level is
    the whole function: it follows the prompt's part before that `def` (imports, helper functions). Otherwise it is
    the body: it completes the prompt (the official harness's prompt + completion), indented by 4 spaces when its
    first line is not. Then the problem's `check(candidate)` is called on `entry_point`."""
    code = extract_code(response, entry_point).rstrip() + "\n"
    if _defines(code, entry_point):
        head = prompt[: re.search(rf"(?m)^def\s+{re.escape(entry_point)}\s*\(", prompt).start()] if _defines(prompt, entry_point) else prompt
        program = head + code
    else:
        first = next((line for line in code.splitlines() if line.strip()), "")
        if first and not first[0].isspace():
            code = "".join("    " + line if line.strip() else line for line in code.splitlines(keepends=True))
        program = prompt + code
    return f"{program}\n\n{test}\n\ncheck({entry_point})\n"


def _tested_name(tests: list[str], setup: str) -> str | None:
    """The function MBPP's asserts call: the first called name that is neither a builtin nor defined by the setup."""
    skip = set(dir(builtins))
    try:
        skip |= {n.id for n in ast.walk(ast.parse(setup)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        skip |= {n.name for n in ast.walk(ast.parse(setup)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    except SyntaxError:
        pass
    for t in tests:
        try:
            tree = ast.parse(t)
        except SyntaxError:
            continue
        for n in ast.walk(tree):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id not in skip:
                return n.func.id
    return None


def mbpp_program(test_list: list[str], test_setup_code: str, response: str) -> str:
    """An MBPP problem's test program for one response: the code, the setup, the asserts. MBPP's instruction
    does not name the function its asserts call; a response that defines no top-level function of that name
    but defines others has its last one bound to the name (the test then checks what it computes, not the name
    it guessed)."""
    name = _tested_name(test_list, test_setup_code)
    code = extract_code(response, name).rstrip() + "\n"
    if name and not _defines(code, name):
        defined = re.findall(r"(?m)^def\s+(\w+)\s*\(", code)
        if defined:
            code += f"\n{name} = {defined[-1]}\n"
    return code + "\n" + test_setup_code.replace("\r\n", "\n") + "\n" + "\n".join(test_list) + "\n"


def has_unit_tests(row: dict) -> bool:
    return ("test" in row and "entry_point" in row and "prompt" in row) or "test_list" in row


def code_program(row: dict, response: str) -> str:
    """The test program of `response` for a pool row that carries unit tests (HumanEval or MBPP fields)."""
    if "test" in row and "entry_point" in row and "prompt" in row:
        return humaneval_program(row["prompt"], row["entry_point"], row["test"], response)
    if "test_list" in row:
        return mbpp_program(list(row["test_list"]), row.get("test_setup_code") or "", response)
    raise ValueError(f"row has no unit tests (HumanEval test/entry_point/prompt or MBPP test_list): keys {sorted(row)}")


# ---- pools without references: an audit judge's votes (estimates, `audit/judge/*`) ----

def judge_outcome(votes: Iterable[tuple[str, str | None]]) -> str:
    """Majority of an audit judge's votes on one pair, over both orders and k samples each: (order, verdict) with
    order "chosen_first" (chosen shown as A) or "chosen_second". "chosen", "rejected", or "undecided" (a tie,
    votes without a verdict not counted)."""
    for_chosen = for_rejected = 0
    for order, verdict in votes:
        if verdict is None:
            continue
        if verdict == ("A" if order == "chosen_first" else "B"):
            for_chosen += 1
        else:
            for_rejected += 1
    return "chosen" if for_chosen > for_rejected else "rejected" if for_rejected > for_chosen else "undecided"


def judge_audit_stats(rows: list[dict]) -> dict[str, float]:
    """Shares of the pairs by the audit judge's majority: `audit/judge/prefers_rejected` (the estimated label
    noise: the judge says the rejected answer is better), `audit/judge/prefers_chosen`, `audit/judge/undecided`
    (sum 1); `audit/judge/no_verdict` (share of votes without one), `audit/judge/pairs`, `audit/judge/votes`.
    Rows: {"majority": ..., "votes": [[order, verdict], ...]}."""
    n = len(rows)
    stats: dict[str, float] = {"audit/judge/pairs": float(n)}
    if not n:
        return stats
    votes = [v for r in rows for _, v in r["votes"]]
    stats.update({f"audit/judge/prefers_{m}" if m != "undecided" else "audit/judge/undecided": sum(r["majority"] == m for r in rows) / n
                  for m in ("chosen", "rejected", "undecided")})
    stats["audit/judge/votes"] = float(len(votes))
    stats["audit/judge/no_verdict"] = sum(v is None for v in votes) / len(votes) if votes else 0.0
    return stats

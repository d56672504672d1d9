"""Benchmark decontamination of an instruction pool. Pure functions.

A self-taught judge trained on pairs built from a benchmark's own prompts is evaluated on items it has seen, so
every pool instruction is compared with every prompt of the benchmarks the run evaluates on (RewardBench prompts,
MT-Bench questions, both turns):

- exact match after normalisation: the same sequence of words, ignoring case, Unicode form, whitespace and
  punctuation (ShareGPT copies of RewardBench prompts differ from them in a trailing period or a line break), and
- long n-gram overlap: the instruction shares at least one word 13-gram with a benchmark prompt. 13 is the rule
  of GPT-3 (Brown et al. 2020, App. C) and the lm-eval decontamination tool: long enough that common phrases
  ("write a python function that takes a list of") do not match, short enough that a prompt re-wrapped in another
  template (HumanEval's docstring inside RewardBench's "Write a Python function ... to solve the following
  problem:") still does. Prompts shorter than n words can only match exactly, and
- the same Python function signature: the instruction defines (`def name(params) -> ret:`) the function a benchmark
  prompt asks for (RewardBench's hep-python: "Write a Python function `name(params) -> ret` to solve ..."), name,
  parameter names, annotations and return type alike. A coding task's statement can be shorter than one 13-gram
  (HumanEval/23 `strlen`: "Return length of given string", 10 words with its examples), and HumanEvalPack rewrote a
  few docstrings, but the signature names the problem: every HumanEval problem is a hep-python prompt, and this
  rule finds the ones whose words alone do not match (not always uniquely: HumanEval/133 and /142 are both
  `sum_squares(lst)`). Only a typed signature counts: one without any annotation (`is_prime(n)`, `solve(s)`) is
  `generic_signature`, a function name and argument names that any code may share, so a text defining it matches
  only by its words (103 of the 326 signatures RewardBench asks for, all hep-python; the three HumanEval problems
  only this rule catches, /23 `strlen(string: str) -> int`, /38 `decode_cyclic(s: str)`, /50 `decode_shift(s: str)`,
  are typed and still caught).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable

NGRAM = 13
_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def normalise(text: str) -> str:
    """The form compared for an exact match: the text's words, lower-cased, single-spaced."""
    return " ".join(words(text))


# `def name(params) -> ret:` as code defines it; `name(params) -> ret` in backticks as a coding prompt asks for it
_DEF = re.compile(r"\bdef\s+([A-Za-z_]\w*)\s*\(([^)]*)\)\s*(?:->\s*([^:\n]+?))?\s*:")
_ASKED = re.compile(r"`([A-Za-z_]\w*)\(([^)`]*)\)\s*(?:->\s*([^`]+?))?\s*`")


def _signature(name: str, params: str, ret: str | None) -> str:
    return " ".join([name.casefold(), "(", *words(params), ")", *words(ret or "")])


def defined_signatures(text: str) -> set[str]:
    """Normalised signatures of the Python functions a text defines."""
    return {_signature(*m.groups()) for m in _DEF.finditer(text)}


def generic_signature(name: str, params: str, ret: str | None) -> bool:
    """A signature with no type annotation, on a parameter or the return: it names nothing but a function and its
    arguments (`is_prime(n)`, `solve(s)`, `search(lst)`), which ordinary code shares with the benchmark. Rules
    measured on RewardBench's 326 asked signatures: untyped 103 (all hep-python, 102 distinct); a name that is a
    word of the benchmark's own non-code prompts (RewardBench outside hep-*, MT-Bench) 40; either 128. Untyped is
    the one that keeps every typed signature, so the three HumanEval problems shorter than one 13-gram (/23, /38,
    /50) are still caught, while `add(x: int, y: int)` stays specific."""
    return ":" not in params and not (ret or "").strip()


def asked_signatures(text: str, generic: bool = True) -> set[str]:
    """Normalised signatures of the Python functions a prompt asks for in backticks (without `generic`: only the
    typed ones, those the signature rule matches)."""
    return {_signature(*m.groups()) for m in _ASKED.finditer(text) if generic or not generic_signature(*m.groups())}


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


@dataclass(frozen=True)
class BenchmarkPrompt:
    benchmark: str  # "rewardbench" | "mtbench"
    subset: str  # RewardBench subset / MT-Bench category
    id: str
    text: str


@dataclass(frozen=True)
class Match:
    instruction_id: str
    benchmark: str
    subset: str
    benchmark_id: str
    how: str  # "exact" | "ngram" | "signature"


class Index:
    """Benchmark prompts indexed by normalised text and by n-gram, built once per run."""

    def __init__(self, prompts: Iterable[BenchmarkPrompt], n: int = NGRAM):
        self.n = n
        self.exact: dict[str, list[BenchmarkPrompt]] = {}
        self.grams: dict[tuple[str, ...], list[BenchmarkPrompt]] = {}
        self.signatures: dict[str, list[BenchmarkPrompt]] = {}
        for p in prompts:
            self.exact.setdefault(normalise(p.text), []).append(p)
            for g in ngrams(p.text, n):
                self.grams.setdefault(g, []).append(p)
            for sig in asked_signatures(p.text, generic=False):  # a generic one matches only by its words
                self.signatures.setdefault(sig, []).append(p)

    def matches(self, instruction_id: str, text: str) -> list[Match]:
        """Every benchmark prompt this instruction matches (exact first, then n-gram, then signature)."""
        found: dict[tuple[str, str, str], Match] = {}
        for p in self.exact.get(normalise(text), []):
            found[(p.benchmark, p.subset, p.id)] = Match(instruction_id, p.benchmark, p.subset, p.id, "exact")
        for g in ngrams(text, self.n):
            for p in self.grams.get(g, []):
                found.setdefault((p.benchmark, p.subset, p.id), Match(instruction_id, p.benchmark, p.subset, p.id, "ngram"))
        for sig in defined_signatures(text) if "def" in text else ():
            for p in self.signatures.get(sig, []):
                found.setdefault((p.benchmark, p.subset, p.id), Match(instruction_id, p.benchmark, p.subset, p.id, "signature"))
        return sorted(found.values(), key=lambda m: (m.benchmark, m.subset, m.benchmark_id))


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")


def counts(matches: Iterable[Match]) -> dict[str, int]:
    """Contaminated instructions per benchmark and per benchmark/subset (an instruction counts once in each), in
    all (`matched`), with an exact match (`exact`), with an n-gram match but no exact one (`ngram_only`) and by
    signature alone (`signature_only`). Subset names are
    made safe as metric names (MLflow allows letters, digits, `_-./` and space)."""
    by: dict[str, set[str]] = {}
    how: dict[str, set[str]] = {"exact": set(), "ngram": set(), "signature": set()}
    for m in matches:
        for name in ("matched", m.benchmark, f"{m.benchmark}/{m.subset}"):
            by.setdefault(_UNSAFE.sub("_", name), set()).add(m.instruction_id)
        how[m.how].add(m.instruction_id)
    if by:
        by["exact"] = how["exact"]
        by["ngram_only"] = how["ngram"] - how["exact"]
        by["signature_only"] = how["signature"] - how["ngram"] - how["exact"]
    return {k: len(v) for k, v in sorted(by.items())}


def shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(max(len(w) - n + 1, 1))} if w else set()


def near_duplicate_groups(items: Iterable[tuple[str, str]], threshold: float = 0.5) -> dict[str, str]:
    """id -> the smallest id of its near-duplicate group, so the held-out split can be drawn per group and near
    duplicates never straddle train and held-out (a held-out pair whose twin was trained on measures memory).

    Near duplicates: the same normalised text, or word-trigram Jaccard similarity >= `threshold` (ShareGPT holds
    the same prompt with a typo fixed or a sentence added). Candidates are pairs that share a trigram, found
    through an inverted index; groups are the connected components."""
    items = list(items)
    parent = {i: i for i, _ in items}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)  # the root is the smallest id: a group's name does not depend on order

    sets = {i: shingles(t) for i, t in items}
    norms: dict[str, str] = {}
    index: dict[tuple[str, ...], list[str]] = {}
    for i, t in items:
        first = norms.setdefault(normalise(t), i)
        if first != i:
            union(i, first)
        for g in sets[i]:
            index.setdefault(g, []).append(i)
    seen: set[tuple[str, str]] = set()
    for ids in index.values():
        for a_pos, a in enumerate(ids):
            for b in ids[a_pos + 1 :]:
                if (a, b) in seen or find(a) == find(b):
                    continue
                seen.add((a, b))
                sa, sb = sets[a], sets[b]
                if len(sa & sb) >= threshold * len(sa | sb):
                    union(a, b)
    return {i: find(i) for i, _ in items}

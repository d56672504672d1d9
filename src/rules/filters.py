"""Filtering rules: which sampled judgments become training examples. Pure functions; reads `filter`.

Every rule is deterministic given `seed`: "random" picks rank items by a hash of (seed, item), so a rule's
choice for one pair does not depend on which other pairs are present, and nested rules stay nested
(`consistent` keeps a subset of what `correct` keeps).
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from src.config import ConfigError
from src.records import Judgment, Pair

@dataclass
class FilterConfig:
    name: str = "correct"
    balance: bool = True  # equal counts of "A better" and "B better" after the rule
    tau: float = 0.5  # majority: minimum share of correct samples for a pair and order

    def validate(self, where: str) -> None:
        if self.name not in FILTERS:
            raise ConfigError(f"{where}.name={self.name!r}: known filters: {', '.join(FILTERS)}")
        if not 0.0 < self.tau <= 1.0:
            raise ConfigError(f"{where}.tau must be in (0, 1]")


def _rank(seed: int, *parts: object) -> str:
    return hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).hexdigest()


def _groups(judgments: list[Judgment]) -> dict[tuple[str, str], list[Judgment]]:
    out: dict[tuple[str, str], list[Judgment]] = defaultdict(list)
    for j in judgments:
        out[(j.pair_id, j.order)].append(j)
    return out


def _one_correct(group: list[Judgment], seed: int) -> Judgment | None:
    correct = [j for j in group if j.correct]
    return min(correct, key=lambda j: _rank(seed, j.pair_id, j.order, j.sample)) if correct else None


def balance(kept: list[Judgment], seed: int, key: Callable[[Judgment], str] = lambda j: j.verdict) -> list[Judgment]:
    """Downsample the larger side so every value of `key` (default: the verdict) has the same count."""
    sides: dict[str, list[Judgment]] = defaultdict(list)
    for j in kept:
        sides[key(j)].append(j)
    if len(sides) < 2:
        # One side only: balancing leaves nothing. An all-"A" training set would teach a position bias.
        return []
    n = min(len(v) for v in sides.values())
    keep = {id(j) for v in sides.values() for j in sorted(v, key=lambda j: _rank(seed, "bal", j.pair_id, j.order, j.sample))[:n]}
    return [j for j in kept if id(j) in keep]


def correct(judgments: list[Judgment], pairs: dict[str, Pair], cfg: FilterConfig, seed: int) -> list[Judgment]:
    """The paper's rule: per pair and order, keep one randomly chosen correct judgment (drop the order when
    none is correct); then, if `balance`, equalise "A better" and "B better" examples."""
    kept = [j for g in _groups(judgments).values() if (j := _one_correct(g, seed)) is not None]
    return balance(kept, seed) if cfg.balance else kept


def all_judgments(judgments: list[Judgment], pairs: dict[str, Pair], cfg: FilterConfig, seed: int) -> list[Judgment]:
    """No-filter control: every judgment with a verdict, correct or not."""
    kept = [j for j in judgments if j.verdict is not None]
    return balance(kept, seed) if cfg.balance else kept


def consistent(judgments: list[Judgment], pairs: dict[str, Pair], cfg: FilterConfig, seed: int) -> list[Judgment]:
    """Like `correct`, but a pair is kept only when the judge got it right in both orders (at least one
    correct sample each): position-robust evidence. Each kept pair gives one "A" and one "B" example, so the
    result is already balanced."""
    groups = _groups(judgments)
    picks = {k: _one_correct(g, seed) for k, g in groups.items()}
    ok = {pid for (pid, _), j in picks.items() if j is not None and all(picks.get((pid, o)) for o in ("chosen_first", "chosen_second"))}
    return [j for (pid, _), j in picks.items() if pid in ok]


def majority(judgments: list[Judgment], pairs: dict[str, Pair], cfg: FilterConfig, seed: int) -> list[Judgment]:
    """Keep a pair and order only if at least a share `tau` of its samples is correct (the judge is
    confidently right, not lucky once), then one random correct judgment, then balance."""
    kept = []
    for g in _groups(judgments).values():
        if sum(j.correct for j in g) / len(g) >= cfg.tau and (j := _one_correct(g, seed)) is not None:
            kept.append(j)
    return balance(kept, seed) if cfg.balance else kept


def length_balanced(judgments: list[Judgment], pairs: dict[str, Pair], cfg: FilterConfig, seed: int) -> list[Judgment]:
    """`correct` without its A/B step, then equal shares of examples where the better response is the shorter
    and where it is the longer one (judges are known to prefer length), then A/B balance if `balance`."""
    kept = [j for g in _groups(judgments).values() if (j := _one_correct(g, seed)) is not None]
    longer = lambda j: "longer" if len(pairs[j.pair_id].chosen) > len(pairs[j.pair_id].rejected) else "shorter"  # noqa: E731
    kept = balance(kept, seed, key=longer)
    return balance(kept, seed) if cfg.balance else kept


FILTERS: dict[str, Callable[[list[Judgment], dict[str, Pair], FilterConfig, int], list[Judgment]]] = {
    "correct": correct,
    "all": all_judgments,
    "consistent": consistent,
    "majority": majority,
    "length_balanced": length_balanced,
}


def apply(cfg: FilterConfig, judgments: list[Judgment], pairs: dict[str, Pair], seed: int) -> list[Judgment]:
    return FILTERS[cfg.name](judgments, pairs, cfg, seed)

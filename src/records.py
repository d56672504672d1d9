"""Typed records passed between stages and stored (one JSON object per line) in the stage cache."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

R = TypeVar("R")


@dataclass
class Instruction:
    id: str
    text: str
    source: str  # file or hub id it came from, plus line
    category: str  # what the seed classifier said
    split: str  # "train" (its pair may be trained on) or "heldout" (only evaluated)
    reference: str | None = None  # the pool's reference solution, when it has one (label-noise audit)


@dataclass
class Pair:
    """A synthetic preference pair: `chosen` answers `instruction`, `rejected` answers `modified`."""

    id: str  # the instruction's id
    instruction: str
    chosen: str
    rejected: str
    modified: str  # x', the modified instruction the rejected response answers
    split: str
    tokens: int = 0  # generated tokens spent on this pair


# Orders in which a pair is shown to the judge. "chosen_first": chosen is A. "chosen_second": chosen is B.
ORDERS = ("chosen_first", "chosen_second")


def chosen_label(order: str) -> str:
    return "A" if order == "chosen_first" else "B"


@dataclass
class Judgment:
    pair_id: str
    order: str  # one of ORDERS
    sample: int  # 0..n-1
    text: str  # the reasoning chain as generated
    verdict: str | None  # "A", "B" or None
    verdict_source: str | None  # "parsed" (the text states it), "constrained" (read by next-token choice), None
    tokens: int = 0
    clip_chars: int | None = None  # response character limit the prompt was rendered with to fit the token budget

    @property
    def correct(self) -> bool:
        return self.verdict == chosen_label(self.order)


@dataclass
class TrainExample:
    pair_id: str
    order: str
    prompt: str  # the judge prompt (user turn)
    completion: str  # the judgment to learn (assistant turn), always ending in an explicit [[A]]/[[B]]
    verdict: str  # "A" or "B"
    rejected_completion: str | None = None  # for preference training (an incorrect judgment of the same prompt)


@dataclass
class EvalItem:
    """One judged (item, order) in an evaluation: enough to recompute every aggregate."""

    benchmark: str
    item_id: str
    order: str
    verdict: str | None
    verdict_source: str | None
    chosen_label: str
    extra: dict[str, Any] = field(default_factory=dict)


def to_dict(record: Any) -> dict:
    return dataclasses.asdict(record)


def from_dict(cls: type[R], data: dict) -> R:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})

"""Stage 6, evaluate: measure a judge. Reads the `eval` group.

Iteration 0 is the untrained judge; iteration k the judge trained in iteration k. Each benchmark is its own
cached unit (`run_benchmark`), so adding one means adding an entry to BENCHMARKS: a function that turns its
config and data into judge prompts, and one that turns the judged items into metrics.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from tqdm import tqdm

from ..cache import Partial
from ..config import ConfigError
from ..metrics import synthetic_metrics
from ..models.base import Generator, SamplingConfig
from ..records import ORDERS, EvalItem, Pair, chosen_label, from_dict, to_dict
from .judge import judge_prompts, judge_template, pair_prompt

log = logging.getLogger(__name__)
VERSION = 1


@dataclass
class EvalConfig:
    synthetic: bool = True
    max_new_tokens: int = 64
    verdict: str = "constrained"
    verdict_prefix: str = "\n\nFinal verdict: [["
    prompt: str | None = None
    max_response_chars: int = 1200

    def validate(self, where: str) -> None:
        if self.verdict not in ("parse", "constrained"):
            raise ConfigError(f"{where}.verdict={self.verdict!r}: use parse or constrained")


@dataclass
class Prompted:
    item_id: str
    order: str
    prompt: str
    chosen_label: str
    extra: dict


def synthetic_items(cfg: EvalConfig, pairs: list[Pair]) -> list[Prompted]:
    template = judge_template(cfg.prompt, "eval.prompt")
    return [
        Prompted(p.id, o, pair_prompt(template, p, o, cfg.max_response_chars), chosen_label(o), {})
        for p in pairs
        if p.split == "heldout"
        for o in ORDERS
    ]


def judge_items(cfg: EvalConfig, name: str, items: list[Prompted], model: Generator, partial: Partial, chunk_size: int) -> list[EvalItem]:
    """Greedy judgments of every item, saved chunk by chunk (a killed evaluation resumes)."""
    saved = partial.done()
    done = {(r["item_id"], r["order"]) for r in saved}
    todo = [it for it in items if (it.item_id, it.order) not in done]
    greedy = SamplingConfig(cfg.max_new_tokens, 0.0, 1.0, 1, 0)
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"evaluate: {name}", unit="judgment")
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        outs = judge_prompts(model, [c.prompt for c in chunk], greedy, cfg.verdict, cfg.verdict_prefix)
        rows = [
            to_dict(EvalItem(name, c.item_id, c.order, o[0][1], o[0][2], c.chosen_label, {**c.extra, "text": o[0][0], "tokens": o[0][3]}))
            for c, o in zip(chunk, outs)
        ]
        partial.append(rows)
        saved.extend(rows)
        bar.update(len(chunk))
    bar.close()
    return [from_dict(EvalItem, r) for r in saved]


def run_synthetic(cfg: EvalConfig, pairs: list[Pair], model: Generator, partial: Partial, chunk_size: int) -> tuple[list[EvalItem], dict]:
    items = synthetic_items(cfg, pairs)
    if not items:
        log.warning("evaluate: no held-out pairs (dataset.heldout_fraction too small for this many instructions)")
        return [], {}
    judged = judge_items(cfg, "synthetic", items, model, partial, chunk_size)
    return judged, synthetic_metrics(judged)

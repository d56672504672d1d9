"""Stage 4, filter: the kept judgments as training examples. Reads the `filter` group (the rule, `src/rules/filters.py`)
and renders each kept judgment with the `judging` prompt it was made on.

An example is the judge prompt (as clipped for the judgment) and the judgment with its verdict stated; it also
carries an incorrect or verdict-less judgment of the same pair and order when one was sampled (the rejected side
for train=dpo; SFT ignores it).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from src.rules import filters
from src.cache import make_key
from src.config import as_dict
from src.rules.filters import FilterConfig
from src.prompts import text_fingerprint
from src.records import Judgment, Pair, TrainExample
from src.rules.verdicts import parse_verdict
from src.judging import JudgingConfig, judge_template, pair_prompt
from src.step import Context, Stage, Step, as_rows, prefixed, records

log = logging.getLogger(__name__)
VERSION = 3  # 2: examples carry an incorrect judgment of the same pair and order (for DPO); 3: or a verdict-less one (RAM)


def key(cfg: FilterConfig, judging: JudgingConfig, judgments_key: str, pairs_key: str, iteration: int, random_seed: int) -> str:
    """filter's key: the rule, the judgments and pairs, and `judging` with its prompt's text (examples are rendered
    with them)."""
    return make_key(
        "filter", VERSION, as_dict(cfg), {"judgments": judgments_key, "pairs": pairs_key}, judging=as_dict(judging),
        prompt=text_fingerprint(judge_template(judging.prompt, "judging.prompt")), random_seed=random_seed, iteration=iteration,
    )


def _explicit(j: Judgment, judging: JudgingConfig) -> str:
    """The judgment text with its verdict stated: a verdict read by constrained choice is written out, so the
    trained judge learns to state [[A]]/[[B]] itself."""
    text = j.text.rstrip()
    return text if parse_verdict(text) == j.verdict else f"{text}{judging.verdict_prefix}{j.verdict}]]"


def training_examples(kept: list[Judgment], all_judgments: list[Judgment], pairs: dict[str, Pair], judging: JudgingConfig, seed: int) -> list[TrainExample]:
    """Judge prompt + kept judgment. Each example also carries an incorrect or verdict-less judgment of the same
    pair and order when one was sampled (the rejected side for train=dpo; SFT ignores it)."""
    template = judge_template(judging.prompt, "judging.prompt")
    wrong: dict[tuple[str, str], list[Judgment]] = {}
    for j in all_judgments:
        if not j.correct:  # RAM's DPO recipe (prepare_dpo_data.py): a wrong verdict or none at all is a negative
            wrong.setdefault((j.pair_id, j.order), []).append(j)
    out = []
    for j in kept:
        candidates = wrong.get((j.pair_id, j.order), []) if j.correct else []
        bad = min(candidates, key=lambda w: hashlib.sha256(f"{seed}:{w.pair_id}:{w.order}:{w.sample}".encode()).hexdigest()) if candidates else None
        # the prompt the judgment was made on (clipped to fit the token budget when the judge stage had to)
        out.append(TrainExample(j.pair_id, j.order, pair_prompt(template, pairs[j.pair_id], j.order, j.clip_chars or judging.max_response_chars),
                                _explicit(j, judging), j.verdict, (_explicit(bad, judging) if bad.verdict else bad.text.rstrip()) if bad else None))
    return out


def run(cfg: FilterConfig, judging: JudgingConfig, judgments: list[Judgment], pairs: list[Pair], seed: int) -> tuple[list[TrainExample], dict]:
    """The rule's kept judgments as training examples, and what was kept: `kept` examples, `judgments`, `judged`
    (pairs and orders with a judgment), `keep_rate` (kept / judged: the share of judged pairs and orders that give an
    example, for every rule but `all`, which keeps up to n per pair and order), `examples_per_judgment` (kept /
    judgments, at most 1/n for the rules that keep one per pair and order), the A/B balance."""
    index = {p.id: p for p in pairs}
    kept = filters.apply(cfg, judgments, index, seed)
    examples = training_examples(kept, judgments, index, judging, seed)
    judged = len({(j.pair_id, j.order) for j in judgments})
    # keep_rate: per judged (pair, order), the unit every rule keeps at most one example of (`all` aside); kept /
    # judgments is at most 1/n with n judgments sampled per pair and order, so it has a name of its own
    stats = {"kept": len(examples), "judgments": len(judgments), "judged": judged, "keep_rate": len(examples) / max(judged, 1),
             "examples_per_judgment": len(examples) / max(len(judgments), 1),
             "kept_A": sum(e.verdict == "A" for e in examples), "kept_B": sum(e.verdict == "B" for e in examples),
             "with_verdict": sum(j.verdict is not None for j in judgments),
             "with_rejected": sum(e.rejected_completion is not None for e in examples)}
    log.info("filter: filter=%s kept %d examples of %d judged pairs and orders (%d judgments; A %d / B %d)", cfg.name,
             len(examples), judged, len(judgments), stats["kept_A"], stats["kept_B"])
    return examples, stats


def logged_stats(stats: dict) -> dict:
    """The stats a filter unit logs. A unit cached before `keep_rate` meant kept / judged pairs and orders holds
    kept / judgments under that name: logged as `examples_per_judgment`, with no `keep_rate` (its number is unknown
    without the judgments; the unit's data, and so its key, are unchanged)."""
    if "examples_per_judgment" in stats:
        return stats
    return {("examples_per_judgment" if k == "keep_rate" else k): v for k, v in stats.items()}


@dataclass(frozen=True)
class FilterStep:
    """The step's config: the rule (`plan.filter_rule`: the `filter` group, its balance off under train=dpo) and the
    `judging` prompt the kept judgments are rendered with."""

    rule: FilterConfig
    judging: JudgingConfig


def execute(step: Step, ctx: Context) -> tuple[list[dict], dict]:
    inputs = ctx.inputs()
    return as_rows(run(step.config.rule, step.config.judging, inputs["judgments"], inputs["pairs"], step.seed))


STAGES = {"filter": Stage(execute, config_part=lambda c: as_dict(c.rule), logged=lambda s: prefixed("filter/")(logged_stats(s)),
                          read=records("filter", TrainExample))}

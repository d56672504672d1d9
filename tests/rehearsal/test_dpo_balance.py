"""Rehearsal (issue 16, §3): train=dpo balances A/B once, after the examples without an incorrect judgment are
dropped (RAM's order), not also before it in the filter."""
from __future__ import annotations

import random

from src.rules.filters import FilterConfig, apply
from src.job import Job
from src.plan import filter_rule, plan
from src.records import Judgment, Pair
from src.stages import train
from src.stages.filter import training_examples
from src.judging import JudgingConfig
from tests.conftest import TINY


def _simulation(n_pairs=400, n=4, seed=0):
    """A judge with a strong position bias towards B, as small judges have: it says A 16% of the time when the
    chosen answer is first (so few "A better" examples survive, nearly all with a wrong sample beside them) and 5%
    when it is second (many "B better" examples, few with a wrong sample). Balancing first trims the B side at
    random, throwing away the rare B examples that have a negative."""
    rng = random.Random(seed)
    pairs = {f"p{i}": Pair(f"p{i}", "x", "good", "bad", "x'", "train") for i in range(n_pairs)}
    out = []
    for pid in pairs:
        for order in ("chosen_first", "chosen_second"):
            for s in range(n):
                v = "A" if rng.random() < (0.16 if order == "chosen_first" else 0.05) else "B"
                out.append(Judgment(pid, order, s, f"because [[{v}]]", v, "parsed"))
    return pairs, out


def _dpo_examples(rule, pairs, judgments):
    kept = apply(rule, judgments, pairs, 0)
    examples = training_examples(kept, judgments, pairs, JudgingConfig(), 0)
    with_rejected = [e for e in examples if e.rejected_completion is not None]
    return train.balance_ab(with_rejected, 0)


def test_balancing_once_after_the_drop_keeps_more_dpo_examples_than_balancing_twice():
    pairs, judgments = _simulation()
    twice = _dpo_examples(FilterConfig(name="correct", balance=True), pairs, judgments)
    once = _dpo_examples(FilterConfig(name="correct", balance=False), pairs, judgments)
    assert sum(e.verdict == "A" for e in once) == sum(e.verdict == "B" for e in once)
    assert len(once) > len(twice) * 1.5, (len(once), len(twice))  # ~2x in this simulation


def test_the_plan_gives_the_dpo_filter_no_balance_and_leaves_sft_as_it_was(make_cfg):
    def rule_of(*o):
        steps = plan(Job.from_config(make_cfg(*TINY, "filter.balance=true", *o)))
        return next(s.config.rule for s in steps if s.stage == "filter")

    assert rule_of("train=dpo").balance is False
    assert rule_of().balance is True
    assert filter_rule(Job.from_config(make_cfg(*TINY, "filter.balance=true"))).balance is True

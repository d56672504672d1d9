"""Stage 3, judge: sample N judgments per pair and order from the current judge. Reads the `judging` group
(its config and the judging primitives every judging stage shares live in src/judging.py)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from src.cache import Partial, make_key, run_chunked
from src.config import as_dict
from src.models.base import Generator, ModelSpec, SamplingConfig, model_id
from src.prompts import text_fingerprint
from src.records import Judgment, Pair, from_dict, to_dict
from src.judging import fit_prompts, is_clipped, item_seed, judge_prompts, judge_template, JudgingConfig, orders_for, pair_parts, token_budget
from src.step import Context, Stage, Step, as_rows, prefixed, records

log = logging.getLogger(__name__)
VERSION = 3  # 2: sampling seeded per pair and order (was per chunk); 3: the paper's eval_plan prompt by default, one-pass
# rendering, responses clipped to the token budget


def key(cfg: JudgingConfig, pairs_key: str, model: ModelSpec, adapter: str | None, iteration: int, random_seed: int,
        prompt_budget: int | None = None) -> str:
    """judge's key: `judging`, the pairs, the judging model (and the train key of the weights it wears), the
    iteration, the prompt's text, and the trained model's prompt budget where it is tighter than the judging
    model's own (`training_budget`)."""
    return make_key(
        "judge", VERSION, as_dict(cfg), {"pairs": pairs_key}, model=model_id(model, adapter), iteration=iteration,
        random_seed=random_seed, prompt=text_fingerprint(judge_template(cfg.prompt, "judging.prompt")),
        **({"prompt_budget": prompt_budget} if prompt_budget is not None else {}),
    )


def run(cfg: JudgingConfig, pairs: list[Pair], model: Generator, seed: int, partial: Partial, chunk_size: int,
        prompt_budget: int | None = None) -> tuple[list[Judgment], dict]:
    """Judgments for the train split only: held-out pairs are for evaluation and never reach training. Prompts fit
    the judging model's context and, given `prompt_budget` (training_budget), the trained model's."""
    template = judge_template(cfg.prompt, "judging.prompt")
    work = [(p, o) for p in pairs if p.split == "train" for o in orders_for(p.id, cfg.both_orders, seed)]
    sampling = lambda seeds: SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.n, seeds=seeds)  # noqa: E731
    budget = token_budget(model, cfg.max_new_tokens, cfg.verdict)
    if prompt_budget is not None:
        budget = min(budget, prompt_budget)

    def process(chunk: list[tuple[Pair, str]]) -> list[dict]:
        fitted = fit_prompts(template, [pair_parts(p, o) for p, o in chunk], cfg.max_response_chars, model, budget)
        prompts = [f[0] for f in fitted]
        # One seed per pair and order (its n samples are rows of one seeded call): the judgments do not depend
        # on the chunk size, the batch size or where a killed run resumed.
        outs = judge_prompts(model, prompts, sampling(tuple(item_seed(seed, p.id, o) for p, o in chunk)), cfg.verdict, cfg.verdict_prefix)
        return [
            to_dict(Judgment(pair_id=p.id, order=o, sample=j, text=t, verdict=v, verdict_source=s, tokens=n, clip_chars=f[1]))
            for (p, o), samples, f in zip(chunk, outs, fitted)
            for j, (t, v, s, n) in enumerate(samples)
        ]

    saved = run_chunked(partial, work, lambda w: (w[0].id, w[1]), lambda r: (r["pair_id"], r["order"]), process, chunk_size,
                        f"judge: {cfg.n} samples x {len(work)} prompts", "prompt")
    judgments = [from_dict(Judgment, r) for r in saved]
    index = {(p.id, o): k for k, (p, o) in enumerate(work)}
    judgments.sort(key=lambda j: (index.get((j.pair_id, j.order), 1 << 30), j.sample))
    stats = judgment_stats(judgments)
    # prompts shown with a part cut: by judging.max_response_chars, or further to fit the token budget
    fit = {(j.pair_id, j.order) for j in judgments if j.clip_chars is not None}
    stats["clipped"] = sum((p.id, o) in fit or is_clipped(*pair_parts(p, o), cfg.max_response_chars) for p, o in work)
    stats["clipped_to_fit"] = len(fit)
    return judgments, stats


def judgment_stats(judgments: list[Judgment]) -> dict:
    n = max(len(judgments), 1)
    return {
        "judgments": len(judgments),
        "text_parse_fail": sum(j.verdict_source != "parsed" for j in judgments) / n,
        "no_verdict": sum(j.verdict is None for j in judgments) / n,
        "correct_rate": sum(j.correct for j in judgments) / n,
        "tokens": sum(j.tokens for j in judgments),
    }


@dataclass(frozen=True)
class JudgeStep:
    """The step's config: `judging`, and the trained model's prompt budget where it is tighter than the judging
    model's own (`judging.training_budget`; None otherwise)."""

    judging: JudgingConfig
    prompt_budget: int | None = None


def execute(step: Step, ctx: Context) -> tuple[list[dict], dict]:
    c = step.config
    return as_rows(run(c.judging, ctx.inputs()["pairs"], ctx.model(), step.seed, ctx.partial, step.chunk, c.prompt_budget))


def config_part(c: JudgeStep) -> dict:
    return {**as_dict(c.judging), **({"prompt_budget": c.prompt_budget} if c.prompt_budget is not None else {})}


STAGES = {"judge": Stage(execute, config_part=config_part, logged=prefixed("judge/"), read=records("judge", Judgment))}

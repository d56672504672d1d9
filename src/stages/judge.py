"""Stage 3, judge: sample N judgments per pair and order from the current judge. Reads the `judging` group.

Also home of the judging primitives the evaluate stage reuses: rendering a pair as a judge prompt in a
given order, and reading a verdict from a generated chain (`judge_prompts`).
"""
from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass

from ..cache import Partial, run_chunked
from ..config import ConfigError, knob
from ..models.base import Generator, SamplingConfig
from ..prompts import Template, load_template
from ..records import ORDERS, Judgment, Pair, from_dict, to_dict
from ..verdicts import parse_verdict

log = logging.getLogger(__name__)
VERSION = 2  # 2: sampling seeded per pair and order (was per chunk)


@dataclass
class JudgingConfig:
    n: int = knob(2, "judgments sampled per pair and order", min=1)
    temperature: float = knob(0.7, "sampling temperature (0 = greedy)", min=0)
    top_p: float = knob(0.9, "nucleus sampling mass", min=0, max=1)
    max_new_tokens: int = knob(48, "tokens generated per judgment", min=1)
    both_orders: bool = True
    verdict: str = "constrained"
    verdict_prefix: str = "\n\nFinal verdict: [["
    prompt: str | None = None
    max_response_chars: int = 400

    def validate(self, where: str) -> None:
        if self.verdict not in ("parse", "constrained"):
            raise ConfigError(f"{where}.verdict={self.verdict!r}: use parse or constrained")
        if self.n < 1:
            raise ConfigError(f"{where}.n must be >= 1")
        if self.n > 1 and self.temperature <= 0:
            raise ConfigError(f"{where}.n={self.n} with {where}.temperature={self.temperature}: greedy samples are identical (vLLM rejects it); use n=1 or temperature > 0")


def judge_template(path: str | None, key: str) -> Template:
    return load_template(path, "judge.txt", ("input", "generation", "generation2"), key)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " [...]"


def _clip_middle(text: str, limit: int) -> str:
    """Keep the head and the tail: a multi-turn transcript ends with the question being judged."""
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head] + " [...] " + text[len(text) - (limit - head) :]


def render(template: Template, instruction: str, a: str, b: str, max_chars: int) -> str:
    """The judge prompt; each part clipped to `max_chars` characters (the CPU models' context budget)."""
    return template.render(input=_clip_middle(instruction, 2 * max_chars), generation=_clip(a, max_chars), generation2=_clip(b, max_chars))


def pair_prompt(template: Template, pair: Pair, order: str, max_chars: int) -> str:
    a, b = (pair.chosen, pair.rejected) if order == "chosen_first" else (pair.rejected, pair.chosen)
    return render(template, pair.instruction, a, b, max_chars)


def orders_for(pair_id: str, both: bool, seed: int) -> tuple[str, ...]:
    """Both orders, or one seeded-random order per item (RewardBench's runner shows one order)."""
    if both:
        return ORDERS
    return (random.Random(f"{seed}:{pair_id}").choice(ORDERS),)


def judge_prompts(
    model: Generator, prompts: list[str], sampling: SamplingConfig, verdict_mode: str, verdict_prefix: str
) -> list[list[tuple[str, str | None, str | None, int]]]:
    """For each prompt, n (text, verdict, verdict_source, tokens). In `constrained` mode a chain that states
    no verdict gets one read by next-token choice between A and B after `verdict_prefix`."""
    outs = model.generate(prompts, sampling)
    result = [[(c.text, parse_verdict(c.text), "parsed", c.num_tokens) for c in cs] for cs in outs]
    if verdict_mode == "constrained":
        missing = [(i, j) for i, cs in enumerate(result) for j, c in enumerate(cs) if c[1] is None]
        if missing:
            picks = model.choose(
                [prompts[i] for i, _ in missing], [result[i][j][0].rstrip() + verdict_prefix for i, j in missing], ["A", "B"]
            )
            for (i, j), v in zip(missing, picks):
                result[i][j] = (result[i][j][0], v, "constrained", result[i][j][3])
    return [[(t, v, s if v else None, n) for t, v, s, n in cs] for cs in result]


def run(cfg: JudgingConfig, pairs: list[Pair], model: Generator, seed: int, partial: Partial, chunk_size: int) -> tuple[list[Judgment], dict]:
    """Judgments for the train split only: held-out pairs are for evaluation and never reach training."""
    template = judge_template(cfg.prompt, "judging.prompt")
    work = [(p, o) for p in pairs if p.split == "train" for o in orders_for(p.id, cfg.both_orders, seed)]
    sampling = lambda seeds: SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.n, seeds=seeds)  # noqa: E731

    def process(chunk: list[tuple[Pair, str]]) -> list[dict]:
        prompts = [pair_prompt(template, p, o, cfg.max_response_chars) for p, o in chunk]
        # One seed per pair and order (its n samples are rows of one seeded call): the judgments do not depend
        # on the chunk size, the batch size or where a killed run resumed.
        outs = judge_prompts(model, prompts, sampling(tuple(item_seed(seed, p.id, o) for p, o in chunk)), cfg.verdict, cfg.verdict_prefix)
        return [
            to_dict(Judgment(pair_id=p.id, order=o, sample=j, text=t, verdict=v, verdict_source=s, tokens=n))
            for (p, o), samples in zip(chunk, outs)
            for j, (t, v, s, n) in enumerate(samples)
        ]

    saved = run_chunked(partial, work, lambda w: (w[0].id, w[1]), lambda r: (r["pair_id"], r["order"]), process, chunk_size,
                        f"judge: {cfg.n} samples x {len(work)} prompts", "prompt")
    judgments = [from_dict(Judgment, r) for r in saved]
    index = {(p.id, o): k for k, (p, o) in enumerate(work)}
    judgments.sort(key=lambda j: (index.get((j.pair_id, j.order), 1 << 30), j.sample))
    return judgments, judgment_stats(judgments)


def item_seed(seed: int, item_id: str, order: str) -> int:
    """A 31-bit seed for one item and order, stable across processes (unlike hash())."""
    return int(hashlib.sha256(f"{seed}:{item_id}:{order}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def judgment_stats(judgments: list[Judgment]) -> dict:
    n = max(len(judgments), 1)
    return {
        "judgments": len(judgments),
        "text_parse_fail": sum(j.verdict_source != "parsed" for j in judgments) / n,
        "no_verdict": sum(j.verdict is None for j in judgments) / n,
        "correct_rate": sum(j.correct for j in judgments) / n,
        "tokens": sum(j.tokens for j in judgments),
    }

"""Classify pool instructions into the dataset's label set: a scored, calibrated choice.

Each instruction is scored once against every label (log P(label | classify prompt), `Generator.score_options`),
then calibrated against the model's label prior: the mean label distribution on content-free inputs ("N/A",
"", "[MASK]"), as in contextual calibration (Zhao et al. 2021, "Calibrate Before Use"). A small seed that says
`writing` for most inputs no longer drowns the rarer labels; the prediction is argmax_l log p(l|x) - log p_cf(l).

The unit of caching is a chunk of the shuffled pool: chunk c holds the labels of pool positions
[c*CHUNK, (c+1)*CHUNK). Its key names the pool, the model, the prompt, the label set and the calibration inputs, and
not the category, so every category of a sweep reads the same chunks; a job that needs to scan further extends
them with new chunks. Reads the `dataset` group (its classification part).
"""
from __future__ import annotations

import math
from typing import Sequence

from src.models.base import Generator
from src.prompts import Template, clip_middle, fit_to_budget

VERSION = 1
CHUNK = 20  # pool instructions per cache unit (max_scan: 40 = two units)
PREFIX = "Category: "  # the assistant's answer starts here; the labels continue it


def render(template: Template, text: str, categories: Sequence[str]) -> str:
    return template.render(input=text, categories=", ".join(categories))


def normalise(scores: Sequence[float]) -> list[float]:
    """Log-probs over the label set only (log-softmax of the label scores)."""
    m = max(scores)
    z = m + math.log(sum(math.exp(s - m) for s in scores))
    return [s - z for s in scores]


def label_prior(content_free_scores: Sequence[Sequence[float]]) -> list[float]:
    """log of the mean label distribution over the content-free inputs (Zhao et al. average theirs too)."""
    probs = [[math.exp(x) for x in normalise(s)] for s in content_free_scores]
    return [math.log(sum(p[j] for p in probs) / len(probs)) for j in range(len(probs[0]))]


def calibrated(scores: Sequence[float], prior: Sequence[float] | None) -> list[float]:
    """log p(label|x) - log p_cf(label), renormalised: the diagonal calibration W = diag(p_cf)^-1, b = 0."""
    s = normalise(scores)
    return normalise([a - b for a, b in zip(s, prior)]) if prior is not None else s


def pick(scores: Sequence[float], prior: Sequence[float] | None, categories: Sequence[str]) -> str:
    cal = calibrated(scores, prior)
    return categories[max(range(len(categories)), key=lambda j: cal[j])]


def fit(model: Generator, template: Template, categories: Sequence[str], texts: Sequence[str]) -> tuple[list, list[int | None]]:
    """The classify prompts, each instruction too long for the model's context cut in the middle (its head and tail
    keep the task) until the prompt plus PREFIX and the longest label fits max_model_len. Characters bound ASCII
    tokens from above, so len(PREFIX) + the longest label + a margin for merges across the boundary is room enough.
    A label read from most of an instruction beats a call vLLM rejects whole. Returns (prompts, limits: None where
    nothing was cut)."""
    budget = model.spec.max_model_len - len(PREFIX) - max(len(c) for c in categories) - 8
    return fit_to_budget(lambda i, limit: render(template, texts[i] if limit is None else clip_middle(texts[i], limit), categories),
                         [len(t) for t in texts], model.count_tokens, budget, f"dataset.classify_prompt on {model.spec.name} "
                         f"(max_model_len {model.spec.max_model_len})")


def prior_for(model: Generator, template: Template, categories: Sequence[str], content_free: Sequence[str]) -> list[float] | None:
    if not content_free:
        return None
    prompts = [render(template, t, categories) for t in content_free]
    return label_prior(model.score_options(prompts, [PREFIX] * len(prompts), categories))


def classify(
    model: Generator, template: Template, categories: Sequence[str], texts: Sequence[str], prior: Sequence[float] | None
) -> list[dict]:
    """For each text: {"category": the calibrated argmax, "scores": the raw label log-probs, and "clipped": the
    characters shown where the instruction had to be cut to fit the context (`fit`)}. A single-label set
    (a pool of known category: GSM8K, HumanEval) needs no model."""
    if len(categories) == 1:
        return [{"category": categories[0], "scores": [0.0]} for _ in texts]
    prompts, limits = fit(model, template, categories, texts)
    scores = model.score_options(prompts, [PREFIX] * len(prompts), categories)
    # `clipped` (characters shown) only where the instruction was cut: rows of prompts that fit are as before
    return [{"category": pick(s, prior, categories), "scores": [round(x, 4) for x in s], **({"clipped": c} if c else {})}
            for s, c in zip(scores, limits)]

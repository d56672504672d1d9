"""Judging, the library every judging stage uses (judge, evaluate, audit judge, filter): the `judging` group's
config, the judge templates, rendering a pair as a judge prompt in a given order and fitting it to the model's
context, per-item seeds, and generating judgments with their verdicts (`judge_prompts`). Stages import this,
never each other."""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from src.config import ConfigError, knob
from src.models.base import Generator, ModelSpec, Prompt, SamplingConfig
from src.prompts import Template, clip_end, clip_middle, fit_to_budget, load_template, text_fingerprint
from src.records import ORDERS, Pair
from src.rules.verdicts import parse_verdict


@dataclass
class JudgingConfig:
    n: int = knob(2, "judgments sampled per pair and order", min=1)
    temperature: float = knob(0.7, "sampling temperature (0 = greedy)", min=0)
    top_p: float = knob(0.9, "nucleus sampling mass", gt=0, max=1)
    max_new_tokens: int = knob(48, "tokens generated per judgment", min=1)
    both_orders: bool = True
    verdict: str = "constrained"
    verdict_prefix: str = "\n\nFinal verdict: [["
    prompt: str | None = None
    max_response_chars: int = knob(400, "characters of each response shown to the judge", min=1)

    def validate(self, where: str) -> None:
        if self.verdict not in ("parse", "constrained"):
            raise ConfigError(f"{where}.verdict={self.verdict!r}: use parse or constrained")
        if self.n < 1:
            raise ConfigError(f"{where}.n must be >= 1")
        if self.n > 1 and self.temperature <= 0:
            raise ConfigError(f"{where}.n={self.n} with {where}.temperature={self.temperature}: greedy samples are identical (vLLM rejects it); use n=1 or temperature > 0")


# One template per role. Training judgments: the paper's `eval_plan` (prompt_templates.json, verbatim, typo
# included). Benchmark evaluation: the system + user prompt the paper's code scores RewardBench with
# (facebookresearch/RAM projects/self_taught_evaluator/src/utils.py SELF_TAUGHT_WITH_SYSTEM_PROMPT).
DEFAULT_PROMPTS = {"judging.prompt": "eval_plan.txt", "eval.prompt": "self_taught_eval.json"}


PLACEHOLDERS = ("input", "generation", "generation2")


def judge_template(path: str | None, key: str) -> Template:
    """The template for role `key` ("judging.prompt" or "eval.prompt"): the file at `path`, or the role's default."""
    template = load_template(path, DEFAULT_PROMPTS[key], PLACEHOLDERS, key)
    if key == "judging.prompt" and template.system is not None:
        # training examples are (user prompt, judgment) pairs; the train stage has no system turn
        raise ConfigError(f"{key}: {template.origin} has a system message; a training prompt must be one user message")
    return template


def training_budget(cfg: JudgingConfig, judging: ModelSpec, trained: ModelSpec, train_max_length: int) -> int | None:
    """Prompt tokens a training judgment's prompt may have so that prompt + judgment is an example the train stage
    keeps (<= train.max_length, within the trained model's context), or None where the judging model's own budget
    is already as tight. The paper's iteration 1 is judged by Mixtral (64k context) and trains Llama-3-70B (8k):
    without it, the long prompts Mixtral accepts would be dropped by training. Counted with the judging model's
    tokenizer (the one at hand); Llama-3's 128k vocabulary needs fewer tokens for the same text than Mixtral's 32k."""
    own = judging.max_model_len - cfg.max_new_tokens - verdict_margin(cfg.verdict)
    cap = min(trained.max_model_len, train_max_length) - cfg.max_new_tokens - verdict_margin(cfg.verdict)
    return cap if cap < own else None


def prompt_params(**paths: str | None) -> dict[str, str]:
    """MLflow params naming the prompt of each role: prompt_params(judging=..., eval=...) ->
    {"prompt.judging": "<file name>@<content hash>", ...}."""
    out = {}
    for role, path in paths.items():
        t = judge_template(path, f"{role}.prompt")
        out[f"prompt.{role}"] = f"{t.name}@{text_fingerprint(t)}"
    return out


def render(template: Template, instruction: str, a: str, b: str, max_chars: int) -> Prompt:
    """The judge prompt; each response clipped to `max_chars` characters, the instruction to twice that."""
    return template.render(input=clip_middle(instruction, 2 * max_chars), generation=clip_end(a, max_chars), generation2=clip_end(b, max_chars))


def is_clipped(instruction: str, a: str, b: str, max_chars: int) -> bool:
    return len(instruction) > 2 * max_chars or len(a) > max_chars or len(b) > max_chars


def verdict_margin(verdict_mode: str) -> int:
    """Prompt tokens kept free in constrained mode: the re-encoded judgment, the verdict prefix and the option read after it."""
    return 32 if verdict_mode == "constrained" else 0


def token_budget(model: Generator, max_new_tokens: int, verdict_mode: str) -> int:
    """Prompt tokens allowed: the model's context minus the generation, minus (constrained mode) room for the
    re-encoded judgment, the verdict prefix and the option scored after it."""
    return model.spec.max_model_len - max_new_tokens - verdict_margin(verdict_mode)


def fit_prompts(template: Template, parts: list[tuple[str, str, str]], max_chars: int, model: Generator, budget: int) -> list[tuple[Prompt, int | None]]:
    """Render each (instruction, a, b) so its chat-templated length fits `budget` tokens: first with `max_chars`,
    then, for prompts still too long, with a smaller character limit (cutting the longest parts first) until it
    fits (prompts.fit_to_budget). Returns (prompt, the smaller limit or None when `max_chars` fitted); the same
    (template, parts, limit) renders the same prompt again (`render`). A stage never aborts on a long input."""
    sizes = [min(max_chars, max(len(a), len(b), (len(x) + 1) // 2)) for x, a, b in parts]
    prompts, limits = fit_to_budget(lambda i, limit: render(template, *parts[i], limit or max_chars), sizes, model.count_tokens,
                                    budget, f"judge prompt {template.name} on {model.spec.name} (max_model_len {model.spec.max_model_len})")
    return list(zip(prompts, limits))


def pair_parts(pair: Pair, order: str) -> tuple[str, str, str]:
    a, b = (pair.chosen, pair.rejected) if order == "chosen_first" else (pair.rejected, pair.chosen)
    return pair.instruction, a, b


def pair_prompt(template: Template, pair: Pair, order: str, max_chars: int) -> Prompt:
    return render(template, *pair_parts(pair, order), max_chars)


def orders_for(pair_id: str, both: bool, seed: int) -> tuple[str, ...]:
    """Both orders, or one seeded-random order per item (RewardBench's runner shows one order)."""
    if both:
        return ORDERS
    return (random.Random(f"{seed}:{pair_id}").choice(ORDERS),)


def judge_prompts(
    model: Generator, prompts: list[Prompt], sampling: SamplingConfig, verdict_mode: str, verdict_prefix: str
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


def item_seed(seed: int, item_id: str, order: str) -> int:
    """A 31-bit seed for one item and order, stable across processes (unlike hash())."""
    return int(hashlib.sha256(f"{seed}:{item_id}:{order}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF

"""Stage 6, evaluate: measure a judge. Reads the `eval` group.

Iteration 0 is the untrained judge; iteration k the judge trained in iteration k. Each benchmark is its own
cached unit with its own key (a RewardBench score is shared by every run that evaluates the same model):
`synthetic` (held-out synthetic pairs), `rewardbench` and `mtbench`. Adding a benchmark means adding an
entry to BENCHMARKS: a function from config and data to judge inputs, and one from judged items to metrics.

Headline metrics (`synthetic/*`, `rewardbench/*`, `mtbench/*`) are the judgment TEXT read by each benchmark's
official parser (src/rules/verdicts.py): RewardBench `process_judgement`, FastChat for MT-Bench, the paper's rule for
the synthetic pairs. With `eval.verdict=constrained`, the same judgments are also scored with a verdict read by
next-token choice where the text names none, under `<benchmark>/constrained/*`: never the headline.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from typing import Callable

from src.rules.analysis import vote_ks
from src.benchmarks import mtbench, rewardbench
from src.benchmarks.rewardbench import majority_vote
from src.cache import Partial, make_key, run_chunked
from src.config import ConfigError, as_dict, knob
from src.rules.metrics import item_score, synthetic_metrics
from src.prompts import text_fingerprint
from src.models.base import Generator, ModelSpec, SamplingConfig, model_id
from src.records import ORDERS, EvalItem, Pair, chosen_label, from_dict, to_dict
from src.rules.verdicts import fastchat_verdict, parse_verdict, rewardbench_verdict
from src.judging import fit_prompts, is_clipped, judge_prompts, judge_template, orders_for, pair_parts, token_budget, item_seed
from src.data import benchmark_source, resolve, source_fingerprint
from src.step import Context, Stage, Step, as_rows

log = logging.getLogger(__name__)
# 2: item verdicts are the official text reading (the constrained one moved to extra["constrained"]); the paper's
# evaluation prompt; maj metrics named overall_maj<k>; responses clipped to the token budget.
VERSION = 3  # 3: maj@k samples seeded per item and order, their token counts kept (vote-k curves)

# Each benchmark's official reading of a judgment text.
PARSERS = {"synthetic": parse_verdict, "rewardbench": rewardbench_verdict, "mtbench": fastchat_verdict}


@dataclass
class RewardBenchConfig:
    enabled: bool = True
    source: str = "rewardbench/filtered.jsonl.gz"  # relative to data_root, absolute, or allenai/reward-bench
    revision: str | None = None
    per_subset: int | None = knob(1, "RewardBench items per subset", min=1)  # stratified slice: items per subset (23 subsets); null = all 2,985
    orders: str = "one"  # both, or one seeded-random order per item as the official runner does
    maj_k: int = knob(1, "RewardBench samples per item and order", min=1)  # >1: also sample k judgments per item and order and report majority-vote accuracy
    maj_temperature: float = knob(0.7, "vote sampling temperature", min=0)
    maj_top_p: float = knob(0.9, "vote nucleus mass", gt=0, max=1)
    slice_seed: int = 0  # fixed apart from random_seed, so runs with different seeds score the same items
    # Section weights of this reward-bench version (benchmarks/rewardbench.py WEIGHTS): v0.1.3 = current and the
    # leaderboard; v0.1.2 = the earlier xstest counts (250 / 154 swapped), for numbers published with it.
    weights: str = "v0.1.3"


@dataclass
class MTBenchConfig:
    enabled: bool = True
    source: str = "mtbench/human_judgments.jsonl.gz"  # relative to data_root, absolute, or lmsys/mt_bench_human_judgments
    revision: str | None = None
    max_keys: int | None = knob(6, "MT-Bench keys", min=1)  # distinct (question, model pair, turn) keys, half per turn; null = all
    human_prefixes: list[str] = field(default_factory=lambda: ["expert"])  # whose votes count as "human"
    slice_seed: int = 0


@dataclass
class EvalConfig:
    synthetic: bool = True
    # >1: also sample k judgments per held-out pair and order (sampled like RewardBench's votes:
    # rewardbench.maj_temperature / maj_top_p) for synthetic/accuracy_maj<k> and the synthetic vote-k curve
    synthetic_maj_k: int = knob(1, "held-out samples per pair and order", min=1)
    max_new_tokens: int = knob(48, "reasoning tokens before the verdict (the CPU judge is trained on 48-token judgments)", min=1)
    verdict: str = "constrained"
    verdict_prefix: str = "\n\nFinal verdict: [["
    prompt: str | None = None
    max_response_chars: int = knob(400, "characters of each response shown to the judge", min=1)
    rewardbench: RewardBenchConfig = field(default_factory=RewardBenchConfig)
    mtbench: MTBenchConfig = field(default_factory=MTBenchConfig)

    def validate(self, where: str) -> None:
        if self.verdict not in ("parse", "constrained"):
            raise ConfigError(f"{where}.verdict={self.verdict!r}: use parse or constrained")
        if self.rewardbench.maj_k > 1 and self.rewardbench.maj_temperature <= 0:
            raise ConfigError(f"{where}.rewardbench.maj_k={self.rewardbench.maj_k} with maj_temperature={self.rewardbench.maj_temperature}: greedy samples are identical (vLLM rejects it)")
        if self.synthetic_maj_k > 1 and self.rewardbench.maj_temperature <= 0:
            raise ConfigError(f"{where}.synthetic_maj_k={self.synthetic_maj_k} with rewardbench.maj_temperature={self.rewardbench.maj_temperature}: greedy samples are identical")
        if self.rewardbench.orders not in ("both", "one"):
            raise ConfigError(f"{where}.rewardbench.orders={self.rewardbench.orders!r}: use both or one")
        if self.rewardbench.weights not in rewardbench.WEIGHTS:
            raise ConfigError(f"{where}.rewardbench.weights={self.rewardbench.weights!r}: one of {', '.join(rewardbench.WEIGHTS)} (reward-bench versions)")


@dataclass
class Prompted:
    item_id: str
    order: str
    parts: tuple[str, str, str]  # (instruction, response A, response B), rendered at judging time to fit the budget
    chosen_label: str
    extra: dict


def judging_part(cfg: EvalConfig) -> dict:
    """The fields of `eval` every benchmark's result depends on."""
    return {k: v for k, v in as_dict(cfg).items() if k not in ("synthetic", "synthetic_maj_k", "rewardbench", "mtbench")}


# ------------------------------------------------------------------------------------------ benchmarks
def synthetic_items(cfg: EvalConfig, pairs: list[Pair]) -> list[Prompted]:
    return [
        Prompted(p.id, o, pair_parts(p, o), chosen_label(o), {})
        for p in pairs
        if p.split == "heldout"
        for o in ORDERS
    ]


def rewardbench_items(cfg: EvalConfig, data_root: str) -> list[Prompted]:
    rb = cfg.rewardbench
    seed = rb.slice_seed
    items = rewardbench.stratified_slice(rewardbench.load_rewardbench(benchmark_source(rb.source, data_root), rb.revision), rb.per_subset, seed)
    out = []
    for it in items:
        for order in orders_for(f"{it.subset}/{it.id}", rb.orders == "both", seed):
            x, a, b, label = rewardbench.judge_inputs(it, order)
            out.append(Prompted(f"{it.subset}/{it.id}", order, (x, a, b), label,
                                {"subset": it.subset, "section": it.section, "id": it.id}))
    return out


def constrained(i: EvalItem) -> str | None:
    """The constrained-choice reading: the text's verdict, else the next-token choice (when one was made)."""
    return i.verdict if i.verdict is not None else i.extra.get("constrained")


def has_constrained(items: list[EvalItem]) -> bool:
    return any("constrained" in i.extra for i in items)


def clip_stats(name: str, items: list[EvalItem]) -> dict[str, float]:
    return {f"{name}/clipped": float(sum(bool(i.extra.get("clipped")) for i in items)),
            f"{name}/clipped_to_fit": float(sum(i.extra.get("clip_chars") is not None for i in items))}


def _renamed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """rewardbench/overall -> rewardbench/constrained/overall (counts and per-subset rows are not repeated)."""
    keep = lambda k: not any(s in k for s in ("/n_", "/subset/", "sections_missing", "maj_k"))  # noqa: E731
    return {k.replace(f"{prefix}/", f"{prefix}/constrained/", 1): v for k, v in metrics.items() if keep(k)}


def synthetic_score(items: list[EvalItem], cfg: EvalConfig) -> dict[str, float]:
    out = {**synthetic_metrics(items), **clip_stats("synthetic", items), **synthetic_vote_k(items)}
    if has_constrained(items):
        read = [dataclasses.replace(i, verdict=constrained(i)) for i in items]
        out.update(_renamed(synthetic_metrics(read), "synthetic"))
    return out


def synthetic_vote_k(items: list[EvalItem]) -> dict[str, float]:
    """`vote_k` on held-out pairs, scored by the headline rule (no majority = 0.5): `synthetic/vote_k/accuracy_k<k>`,
    `synthetic/vote_k/tokens_k<k>`, and `synthetic/accuracy_maj<maj_k>`, the synthetic twin of
    `rewardbench/overall_maj<k>`."""
    out = vote_k(items, "synthetic", "accuracy",
                 lambda k: sum(item_score(majority_vote(i.extra["verdicts_k"][:k]), i.chosen_label) for i in items) / len(items))
    if out:
        max_k = min(len(i.extra["verdicts_k"]) for i in items)
        out[f"synthetic/accuracy_maj{max_k}"] = out[f"synthetic/vote_k/accuracy_k{max_k}"]
    return out


def rewardbench_score(items: list[EvalItem], cfg: EvalConfig) -> dict[str, float]:
    def records(verdict_of, k_key):
        return [
            {"subset": i.extra["subset"], "section": i.extra["section"], "id": i.extra["id"], "order": i.order,
             "chosen_label": i.chosen_label, "verdict": verdict_of(i), **({"verdicts_k": i.extra[k_key]} if k_key in i.extra else {})}
            for i in items
        ]

    w = cfg.rewardbench.weights
    out = {**rewardbench.rewardbench_metrics(records(lambda i: i.verdict, "verdicts_k"), w), **clip_stats("rewardbench", items),
           **vote_k_curve(items, w)}
    if has_constrained(items):
        out.update(_renamed(rewardbench.rewardbench_metrics(records(constrained, "verdicts_k_constrained"), w), "rewardbench"))
    return out


def vote_k(items: list[EvalItem], bench: str, name: str, score: Callable[[int], float]) -> dict[str, float]:
    """A vote-k curve: `score(k)`, the benchmark's number for a majority over the FIRST k samples, k = 1, 2, 4, ...,
    maj_k, from the one set of maj_k samples per item and order (no resampling per k), with the generated tokens per
    judgment each k costs: `<bench>/vote_k/<name>_k<k>`, `<bench>/vote_k/tokens_k<k>`. Empty unless every item
    carries its samples."""
    if not items or any("verdicts_k" not in i.extra or "tokens_k" not in i.extra for i in items):
        return {}
    out = {}
    for k in vote_ks(min(len(i.extra["verdicts_k"]) for i in items)):
        out[f"{bench}/vote_k/{name}_k{k}"] = score(k)
        out[f"{bench}/vote_k/tokens_k{k}"] = sum(sum(i.extra["tokens_k"][:k]) for i in items) / len(items)
    return out


def vote_k_curve(items: list[EvalItem], weights: str = rewardbench.WEIGHTS_DEFAULT) -> dict[str, float]:
    """`vote_k` on RewardBench's official overall: `rewardbench/vote_k/overall_k<k>`, `rewardbench/vote_k/tokens_k<k>`."""
    def overall(k: int) -> float:
        records = [{"subset": i.extra["subset"], "section": i.extra["section"], "id": i.extra["id"], "order": i.order,
                    "chosen_label": i.chosen_label, "verdict": i.verdict, "verdicts_k": i.extra["verdicts_k"][:k]} for i in items]
        return rewardbench.rewardbench_metrics(records, weights)[f"rewardbench/overall_maj{k}"]  # k = 1: the first sample alone

    return vote_k(items, "rewardbench", "overall", overall)


def mtbench_items(cfg: EvalConfig, data_root: str) -> list[Prompted]:
    mt = cfg.mtbench
    seed = mt.slice_seed
    rows = mtbench.load_mtbench_human(benchmark_source(mt.source, data_root), mt.revision)
    keyed = mtbench.stratified_slice(rows, mt.max_keys, seed, tuple(mt.human_prefixes))
    out = []
    for r in keyed:
        key = f"{r['question_id']}/{r['model_a']}/{r['model_b']}/t{r['turn']}"
        for order, swap in (("ab", False), ("ba", True)):
            x, a, b = mtbench.build_judge_inputs(r, swap=swap)
            meta = {k: r[k] for k in ("question_id", "model_a", "model_b", "turn")}
            out.append(Prompted(key, order, (x, a, b), "", {**meta, "human_votes": r["human_votes"]}))
    return out


def mtbench_score(items: list[EvalItem], cfg: EvalConfig) -> dict[str, float]:
    meta = ("question_id", "model_a", "model_b", "turn")
    humans = mtbench.human_rows_from_keyed(
        {**{k: i.extra[k] for k in meta}, "human_votes": i.extra["human_votes"]} for i in items if i.order == "ab"
    )

    def metrics(verdict_of):
        records = [{**{k: i.extra[k] for k in meta}, "order": i.order, "verdict": verdict_of(i)} for i in items]
        return mtbench.mtbench_metrics(records, humans, tuple(cfg.mtbench.human_prefixes))

    out = {**metrics(lambda i: i.verdict), **clip_stats("mtbench", items)}
    if has_constrained(items):
        out.update(_renamed(metrics(constrained), "mtbench"))
    return out


@dataclass
class Benchmark:
    enabled: Callable[[EvalConfig], bool]
    config: Callable[[EvalConfig], dict]  # this benchmark's part of `eval`, for its cache key
    data: Callable[[EvalConfig, str], str | None]  # fingerprint of its data (None: uses the pairs)
    maj_k: Callable[[EvalConfig], int]  # sampled judgments per item and order for majority vote (1 = none)
    score: Callable[[list[EvalItem], EvalConfig], dict[str, float]]


BENCHMARKS: dict[str, Benchmark] = {
    # votes enter the synthetic key only when asked for, so the keys of runs without them do not change
    "synthetic": Benchmark(lambda c: c.synthetic, lambda c: _synthetic_votes(c), lambda c, root: None, lambda c: c.synthetic_maj_k, synthetic_score),
    "rewardbench": Benchmark(
        lambda c: c.rewardbench.enabled, lambda c: as_dict(c.rewardbench),
        lambda c, root: source_fingerprint(c.rewardbench.source, c.rewardbench.revision, root), lambda c: c.rewardbench.maj_k, rewardbench_score,
    ),
    "mtbench": Benchmark(
        lambda c: c.mtbench.enabled, lambda c: as_dict(c.mtbench),
        lambda c, root: source_fingerprint(c.mtbench.source, c.mtbench.revision, root), lambda c: 1, mtbench_score,
    ),
}


def _synthetic_votes(c: EvalConfig) -> dict:
    rb = c.rewardbench
    return {"maj_k": c.synthetic_maj_k, "maj_temperature": rb.maj_temperature, "maj_top_p": rb.maj_top_p} if c.synthetic_maj_k > 1 else {}


def config_part(name: str, cfg: EvalConfig) -> dict:
    """What of `eval` one benchmark's result depends on: the judging fields and the benchmark's own section."""
    return {"judging": judging_part(cfg), "bench": BENCHMARKS[name].config(cfg)}


def key(name: str, cfg: EvalConfig, data_root: str, model: ModelSpec, adapter: str | None, pairs_key: str | None, chunk_size: int) -> str:
    """One benchmark's key, for the loop and the standalone scorer (src/cli/evaluate.py) alike: the model (and the
    train key or adapter hash of the weights it wears), `config_part`, the benchmark's data (the synthetic one: the
    pairs), the prompt's text, and the chunk size (a chunk bounds its batches; padded batched arithmetic is not
    bit-invariant)."""
    return make_key(
        name, VERSION, config_part(name, cfg),
        {"pairs": pairs_key} if name == "synthetic" else {"data": BENCHMARKS[name].data(cfg, data_root)},
        model=model_id(model, adapter), prompt=text_fingerprint(judge_template(cfg.prompt, "eval.prompt")), chunk_size=chunk_size,
        # a benchmark's metrics are stored with its output: a change of its scoring rule must not reuse old numbers
        # (mtbench 2: a tie in both orders is swap-consistent)
        **({"scoring": SCORING[name]} if name in SCORING else {}),
    )


SCORING = {"mtbench": 2}


# ------------------------------------------------------------------------------------------ running
def judge_items(cfg: EvalConfig, name: str, items: list[Prompted], model: Generator, partial: Partial, chunk_size: int, maj_k: int = 1) -> list[EvalItem]:
    """Greedy judgments of every item (plus k sampled ones for majority vote), saved chunk by chunk. Each item's
    verdict is its text read by the benchmark's official parser; extra["constrained"] holds the next-token
    choice where the text named no verdict (eval.verdict=constrained)."""
    greedy = SamplingConfig(cfg.max_new_tokens, 0.0, 1.0, 1, 0)
    template = judge_template(cfg.prompt, "eval.prompt")
    budget = token_budget(model, cfg.max_new_tokens, cfg.verdict)
    parse = PARSERS[name]

    def process(chunk: list[Prompted]) -> list[dict]:
        fitted = fit_prompts(template, [c.parts for c in chunk], cfg.max_response_chars, model, budget)
        prompts = [f[0] for f in fitted]
        outs = judge_prompts(model, prompts, greedy, cfg.verdict, cfg.verdict_prefix)
        extra = [{} for _ in chunk]
        if maj_k > 1:
            rb = cfg.rewardbench
            # One seed per item and order: the samples do not depend on the chunk size or where a resume started.
            seeds = tuple(item_seed(0, c.item_id, c.order) for c in chunk)
            sampled = judge_prompts(model, prompts, SamplingConfig(cfg.max_new_tokens, rb.maj_temperature, rb.maj_top_p, maj_k, seeds=seeds),
                                    cfg.verdict, cfg.verdict_prefix)
            for e, s in zip(extra, sampled):
                e["verdicts_k"] = [parse(t) for t, _, _, _ in s]
                e["tokens_k"] = [n for _, _, _, n in s]  # what each extra vote costs (vote-k curves)
                if cfg.verdict == "constrained":
                    e["verdicts_k_constrained"] = [parse(t) or (v if src == "constrained" else None) for t, v, src, _ in s]
        rows = []
        for c, o, e, (_, clip_chars) in zip(chunk, outs, extra, fitted):
            text, v, src, tokens = o[0]
            verdict = parse(text)
            e.update(text=text, tokens=tokens, clipped=clip_chars is not None or is_clipped(*c.parts, cfg.max_response_chars),
                     clip_chars=clip_chars)
            if verdict is None and src == "constrained":
                e["constrained"] = v
            rows.append(to_dict(EvalItem(name, c.item_id, c.order, verdict, "parsed" if verdict else None, c.chosen_label, {**c.extra, **e})))
        return rows

    saved = run_chunked(partial, items, lambda it: (it.item_id, it.order), lambda r: (r["item_id"], r["order"]), process,
                        chunk_size, f"evaluate: {name}", "judgment")
    return [from_dict(EvalItem, r) for r in saved]


def run(name: str, cfg: EvalConfig, pairs: list[Pair], data_root: str, model: Generator, partial: Partial, chunk_size: int) -> tuple[list[EvalItem], dict]:
    if name == "synthetic":
        items = synthetic_items(cfg, pairs)
    elif name == "rewardbench":
        items = rewardbench_items(cfg, data_root)
    else:
        items = mtbench_items(cfg, data_root)
    if not items:
        log.warning("evaluate: %s has no items (for synthetic: no held-out pairs; raise dataset.heldout_fraction)", name)
        return [], {}
    judged = judge_items(cfg, name, items, model, partial, chunk_size, BENCHMARKS[name].maj_k(cfg))
    return judged, BENCHMARKS[name].score(judged, cfg)


def decontam_benchmarks(cfg: EvalConfig) -> dict[str, tuple[str, str | None]]:
    """The enabled benchmarks whose prompts a pool must not contain: name -> (source, revision)."""
    out = {}
    if cfg.rewardbench.enabled:
        out["rewardbench"] = (cfg.rewardbench.source, cfg.rewardbench.revision)
    if cfg.mtbench.enabled:
        out["mtbench"] = (cfg.mtbench.source, cfg.mtbench.revision)
    return out


def execute(step: Step, ctx: Context) -> tuple[list[dict], dict]:
    pairs = ctx.inputs().get("pairs", [])
    return as_rows(run(step.stage, step.config, pairs, ctx.data_root, ctx.model(), ctx.partial, step.chunk))


def source(step: Step, cache, data_root: str) -> str:
    """Where a benchmark's items come from: its file (or hub id); the synthetic one's, the held-out pairs' cache."""
    if "pairs" in step.inputs:
        return str(cache.path(*step.inputs["pairs"]))
    where = getattr(step.config, step.stage).source
    local = resolve(where, data_root)
    return str(local) if local.exists() else where


# benchmark metrics are named already (rewardbench/...)
STAGES = {name: Stage(execute, config_part=functools.partial(config_part, name), benchmark=True, input="evaluation", source=source)
          for name in BENCHMARKS}

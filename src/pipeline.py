"""The self-taught loop: plan every stage's cache key from the config, then run what is not cached.

    select -> generate -> evaluate(iteration 0) -> [judge -> filter -> train -> evaluate] x iterations

Reads the `pipeline` group and hands every other group, typed, to the one module that reads it. Keys are a
function of the config alone, so `pipeline.dry_run=true` shows what a run would reuse before loading anything.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from . import filters, launch
from .cache import CacheError, Partial, StageCache, check, make_key
from .config import ConfigError, as_dict, knob, typed
from .data import check_readable, resolve
from .filters import FilterConfig
from .launch import LaunchConfig
from .models.base import Generator, ModelSpec
from .prompts import text_fingerprint
from .records import Instruction, Judgment, Pair, TrainExample, from_dict, to_dict
from .stages import classify, evaluate, generate, judge, select, train
from .stages.evaluate import EvalConfig
from .stages.generate import NegativesConfig
from .stages.judge import JudgingConfig, pair_prompt
from .stages.select import DatasetConfig
from .stages.train import TrainConfig
from .tracking import Tracker, TrackingConfig
from .verdicts import parse_verdict

log = logging.getLogger(__name__)
# What a train stage's meta records as `stats.produced`, and the directory in its output that holds it.
PRODUCED = {"adapter": "adapter", "full": "model", "none": None}


@dataclass
class PipelineConfig:
    cache_dir: str | None = None
    dry_run: bool = False
    first_judge: str = "seed"
    model_cache_dir: str | None = None
    chunk_size: int = knob(16, "prompts per saved chunk", min=1)

    def validate(self, where: str) -> None:
        if self.first_judge not in ("seed", "judge"):
            raise ConfigError(f"{where}.first_judge={self.first_judge!r}: use seed or judge")


@dataclass
class Job:
    """A whole job's config, each group typed by the module that reads it."""

    seed: ModelSpec
    judge: ModelSpec
    dataset: DatasetConfig
    negatives: NegativesConfig
    judging: JudgingConfig
    filter: FilterConfig
    train: TrainConfig
    launch: LaunchConfig
    eval: EvalConfig
    tracking: TrackingConfig
    pipeline: PipelineConfig
    iterations: int
    random_seed: int
    data_root: str
    results_dir: Path

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Job":
        groups = {
            "seed": ModelSpec, "judge": ModelSpec, "dataset": DatasetConfig, "negatives": NegativesConfig,
            "judging": JudgingConfig, "filter": FilterConfig, "train": TrainConfig, "launch": LaunchConfig, "eval": EvalConfig,
            "tracking": TrackingConfig, "pipeline": PipelineConfig,
        }
        missing = [g for g in groups if g not in cfg]
        if missing:
            raise ConfigError(f"config has no `{missing[0]}` group")
        if int(cfg.iterations) < 0:
            raise ConfigError("iterations must be >= 0")
        return cls(
            **{g: typed(t, cfg[g], g) for g, t in groups.items()},
            iterations=int(cfg.iterations),
            random_seed=int(cfg.random_seed),
            data_root=str(cfg.data_root),
            results_dir=Path(str(cfg.results_dir)).expanduser().resolve(),
        )

    @property
    def cache_dir(self) -> Path:
        return Path(self.pipeline.cache_dir).expanduser().resolve() if self.pipeline.cache_dir else self.results_dir / "cache"


def check_lengths(job: Job) -> None:
    """Every generation the job asks for must fit its model's max_model_len (what vLLM would reject later).
    Checked on the composed job (not per group: a group option alone may pair with another model)."""
    from .models.base import check_fits

    n = job.negatives
    for spec, tokens, where in [
        (job.seed, n.answer_max_new_tokens + n.modify_max_new_tokens, "negatives.answer_max_new_tokens+modify_max_new_tokens"),
        (job.judge, job.judging.max_new_tokens, "judging.max_new_tokens"),
        (job.judge, job.eval.max_new_tokens, "eval.max_new_tokens"),
    ]:
        msg = check_fits(spec, tokens, where)
        if msg:
            raise ConfigError(msg)


@dataclass
class Step:
    stage: str
    iteration: int
    key: str
    model: str
    status: str = "todo"  # cached | damaged (fails its check: moved aside and recomputed) | partial | todo
    role: str = "judge"  # which model spec runs it: "seed" or "judge"
    adapter_of: str | None = None  # the train key whose adapter the model wears
    init_of: str | None = None  # train: the train key whose adapter training starts from (decided by plan only)


def engine_versions(backend: str) -> dict[str, str]:
    """The libraries whose arithmetic makes a model's outputs: an upgrade may change them, so they are keyed."""
    from .provenance import package_versions

    return package_versions(("torch", "transformers", "peft") + (("vllm",) if backend == "vllm" else ()))


def model_id(spec: ModelSpec, adapter_key: str | None) -> dict:
    return {"spec": as_dict(spec), "adapter": adapter_key, "engine": engine_versions(spec.backend)}


def eval_key(bench: str, cfg: EvalConfig, data_root: str, model: dict, pairs_key: str | None, chunk_size: int) -> str:
    """One benchmark's key, for the loop and the standalone scorer (src/evaluate.py) alike: the model, the judging
    part of `eval`, the benchmark's own config and data (the synthetic one: the pairs), the prompt's text."""
    spec = evaluate.BENCHMARKS[bench]
    return make_key(
        bench, evaluate.VERSION, {"judging": evaluate.judging_part(cfg), "bench": spec.config(cfg)},
        {"pairs": pairs_key} if bench == "synthetic" else {"data": spec.data(cfg, data_root)},
        model=model, prompt=text_fingerprint(judge.judge_template(cfg.prompt, "eval.prompt")),
        chunk_size=chunk_size,  # a chunk bounds its batches, and padded batched arithmetic is not bit-invariant
    )


def plan(job: Job) -> list[Step]:
    """Every stage of the job with its cache key. Pure in the config (plus data-file hashes)."""
    cache = StageCache(job.cache_dir)
    seed_id = model_id(job.seed, None)
    judge_tpl = text_fingerprint(judge.judge_template(job.judging.prompt, "judging.prompt"))
    steps: list[Step] = []
    # One classification per (pool, model, prompt, label set), shared by every category: units classify/<cls>-*.
    cls = make_key(
        "classify", classify.VERSION, select.classify_config(job.dataset), {"pool": select.source_fingerprints(job.dataset, job.data_root)},
        model=seed_id, random_seed=job.random_seed, prompt=text_fingerprint(select.classify_template(job.dataset)),
    )
    steps.append(Step("classify", 0, cls, job.seed.name, role="seed"))
    sel = make_key("select", select.VERSION, as_dict(job.dataset), {"classify": cls}, random_seed=job.random_seed)
    steps.append(Step("select", 0, sel, job.seed.name, role="seed"))
    gen = make_key(
        "generate", generate.VERSION, as_dict(job.negatives), {"select": sel}, model=seed_id, random_seed=job.random_seed,
        chunk_size=job.pipeline.chunk_size,  # its sampling is seeded per chunk
        prompts={k: text_fingerprint(t) for k, t in generate.templates(job.negatives).items()},
    )
    steps.append(Step("generate", 0, gen, job.seed.name, role="seed"))

    benches = [b for b, spec in evaluate.BENCHMARKS.items() if spec.enabled(job.eval)]

    def eval_steps(iteration: int, adapter_key: str | None) -> list[Step]:
        out = []
        for b in benches:
            key = eval_key(b, job.eval, job.data_root, model_id(job.judge, adapter_key), gen, job.pipeline.chunk_size)
            out.append(Step(b, iteration, key, job.judge.name + (f"+iter{iteration}" if adapter_key else ""), adapter_of=adapter_key))
        return out

    steps.extend(eval_steps(0, None))
    prev_train: str | None = None
    for k in range(1, job.iterations + 1):
        if k == 1 and job.pipeline.first_judge == "seed":
            role, jspec, jadapter, jname = "seed", job.seed, None, job.seed.name
        else:
            role, jspec, jadapter = "judge", job.judge, prev_train
            jname = job.judge.name + (f"+iter{k - 1}" if prev_train else "")
        jud = make_key(
            "judge", judge.VERSION, as_dict(job.judging), {"pairs": gen}, model=model_id(jspec, jadapter),
            iteration=k, random_seed=job.random_seed, prompt=judge_tpl,
        )
        steps.append(Step("judge", k, jud, jname, adapter_of=jadapter, role=role))
        fil = make_key(
            "filter", filters.VERSION, as_dict(job.filter), {"judgments": jud, "pairs": gen},
            judging=as_dict(job.judging), prompt=judge_tpl, random_seed=job.random_seed, iteration=k,
        )
        steps.append(Step("filter", k, fil, "-", role="-"))
        init = prev_train if job.train.init_from == "previous" else None
        # More processes = a larger global batch: a different result (one process keeps the keys it always had).
        world = {"world_size": job.launch.world_size} if job.launch.world_size > 1 else {}
        trn = make_key(
            "train", train.VERSION, as_dict(job.train), {"examples": fil, "init": init},
            model=model_id(job.judge, None), random_seed=job.random_seed, iteration=k, **world,
        )
        steps.append(Step("train", k, trn, job.judge.name, init_of=init))
        steps.extend(eval_steps(k, trn))
        prev_train = trn
    for s in steps:
        path = cache.path(s.stage, s.key)
        if path.exists():  # verified, so a dry run does not promise to reuse what the run will recompute
            s.status = "cached" if check(path) is None else "damaged"
        else:
            s.status = "partial" if cache.has_partial(s.stage, s.key) else "todo"
    steps[0].status = f"{len(classified_units(cache, cls))} chunk(s) cached"
    return steps


def classified_units(cache: StageCache, cls_key: str) -> list[str]:
    """The committed classification chunks of a classify key (the prior unit excluded)."""
    root = cache.root / "classify"
    return sorted(p.name for p in root.glob(f"{cls_key}-[0-9]*") if (p / "meta.json").exists()) if root.exists() else []


def describe(job: Job, steps: list[Step], choices: dict[str, str], problems: list[str]) -> str:
    d = job.dataset
    lines = [
        "plan: " + " ".join(f"{k}={v}" for k, v in choices.items()),
        f"  models: seed={job.seed.name} ({job.seed.source}, backend {job.seed.backend}), judge={job.judge.name} "
        f"({job.judge.source}, backend {job.judge.backend}); first judgments by {job.pipeline.first_judge}",
        f"  counts: <= {d.limit} {d.category!r} instructions (classify <= {d.max_scan} of the pool), "
        f"{int(d.heldout_fraction * 100)}% held out; judgments N={job.judging.n} x "
        f"{2 if job.judging.both_orders else 1} order(s) per pair; iterations={job.iterations}; filter={job.filter.name}",
        f"  cache: {job.cache_dir}",
        f"  {'iter':>4}  {'stage':<11} {'model':<28} {'key':<20}  status",
    ]
    lines += [f"  {s.iteration:>4}  {s.stage:<11} {s.model:<28} {s.key:<20}  {s.status}" for s in steps]
    cache, cls = StageCache(job.cache_dir), steps[0].key
    labels = [r["category"] for u in classified_units(cache, cls) for r in cache.rows("classify", u)]
    lines.append(f"  select: {select.expected_scan(d, labels)}")
    lines += [f"  NOT RUNNABLE HERE: {p}" for p in problems]
    return "\n".join(lines)


class ModelPool:
    """Keeps generators loaded across the stages of an iteration (evaluate(k) and judge(k+1) share a model).

    Capacity 2 on CPU (seed + judge fit in memory); 1 when a vLLM model is involved, since GPU memory is not
    shared between two engines."""

    def __init__(self, cache_dir: Path | None, capacity: int):
        self.cache_dir, self.capacity = cache_dir, capacity
        self.loaded: dict[tuple, Generator] = {}

    def get(self, spec: ModelSpec, adapter: Path | None) -> Generator:
        from .models.loading import load_generator

        key = (repr(as_dict(spec)), str(adapter))
        if key in self.loaded:
            self.loaded[key] = self.loaded.pop(key)  # most recently used last
            return self.loaded[key]
        while len(self.loaded) >= self.capacity:
            self.loaded.pop(next(iter(self.loaded))).close()
            launch.free_accelerator_memory()
        t0 = time.time()
        gen = load_generator(spec, adapter=str(adapter) if adapter else None, cache_dir=self.cache_dir)
        log.info("model: loaded %s%s in %.1fs", spec.name, f" + adapter {adapter.parent.name}" if adapter else "", time.time() - t0)
        self.loaded[key] = gen
        return gen

    def close(self) -> None:
        """Close every engine and hand the GPU memory back (before training, and at the end)."""
        for g in self.loaded.values():
            g.close()
        self.loaded.clear()
        launch.free_accelerator_memory()


def preflight(job: Job) -> list[str]:
    """Problems that would make the job fail after expensive work, found before any weights load."""
    from .models.loading import preflight as model_preflight

    problems = []
    # Read local pools now: a malformed line or missing field fails here, not after a model has loaded.
    # (Hub pools are read when select runs: a dry run must not download a dataset.)
    local = dataclasses.replace(job.dataset, sources=[s for s in job.dataset.sources if s.path is not None])
    pool = select.load_pool(local, job.data_root) if local.sources else [None]
    if not pool:
        raise ConfigError(f"dataset={job.dataset.name}: the pool has no instruction of {job.dataset.min_chars}-{job.dataset.max_chars} characters")
    # Benchmark files: existence and a readable first line now, not at the first evaluation hours later.
    # A source without a data-file suffix is a hub id (read by the benchmark's loader when it runs).
    for b, spec in evaluate.BENCHMARKS.items():
        source = getattr(getattr(job.eval, b, None), "source", None)
        if spec.enabled(job.eval) and source and source.endswith((".jsonl", ".jsonl.gz", ".json", ".parquet")):
            check_readable(resolve(source, job.data_root))
    for role, spec in (("seed", job.seed), ("judge", job.judge)):
        try:
            model_preflight(spec)
        except RuntimeError as e:
            problems.append(f"{role}={spec.name}: {e}")
    return problems


def _explicit(j: Judgment, judging: JudgingConfig) -> str:
    """The judgment text with its verdict stated: a verdict read by constrained choice is written out, so the
    trained judge learns to state [[A]]/[[B]] itself."""
    text = j.text.rstrip()
    return text if parse_verdict(text) == j.verdict else f"{text}{judging.verdict_prefix}{j.verdict}]]"


def training_examples(kept: list[Judgment], all_judgments: list[Judgment], pairs: dict[str, Pair], judging: JudgingConfig, seed: int) -> list[TrainExample]:
    """Judge prompt + kept judgment. Each example also carries an incorrect or verdict-less judgment of the same
    pair and order when one was sampled (the rejected side for train=dpo; SFT ignores it)."""
    import hashlib

    template = judge.judge_template(judging.prompt, "judging.prompt")
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


class Runner:
    """Executes a plan: each stage is loaded from the cache or computed under a lock and committed."""

    def __init__(self, job: Job, tracker: Tracker):
        self.job, self.tracker = job, tracker
        self.cache = StageCache(job.cache_dir)
        model_cache = Path(job.pipeline.model_cache_dir).expanduser() if job.pipeline.model_cache_dir else None
        gpu = "vllm" in (job.seed.backend, job.judge.backend)
        self.pool = ModelPool(model_cache, capacity=1 if gpu else 2)
        self.hits: dict[str, int] = {}

    def stage(self, step: Step, compute: Callable[[Partial], tuple[list[dict] | None, dict]], config: Any) -> tuple[list[dict] | None, dict, bool]:
        """(rows, meta, cached). `compute` gets the partial directory and returns (rows, stats)."""
        name = f"{step.stage}[iter {step.iteration}]"

        def logged(partial: Partial):
            log.info("%s: computing (key %s, model %s)%s", name, step.key, step.model,
                     ", resuming saved chunks" if partial.chunks.exists() else "")
            return compute(partial)

        meta = {"iteration": step.iteration, "model": step.model, "config": config}
        cached = self.cache.compute_once(step.stage, step.key, logged, meta)
        if cached:
            log.info("%s: cached (key %s), reused", name, step.key)
        self.hits[f"{step.stage}_{step.iteration}"] = int(cached)
        meta = self.cache.meta(step.stage, step.key)
        path = self.cache.path(step.stage, step.key) / "data.jsonl"
        return (self.cache.rows(step.stage, step.key) if path.exists() else None), meta, cached

    def _log_stage(self, step: Step, meta: dict, cached: bool, rows: list[dict] | None, stats_prefix: str | None) -> None:
        """A stage's data as an artifact and a table; its time, cache hit and (under `stats_prefix`) its numeric
        stats as metrics at step = iteration."""
        prefix = f"{step.stage}_iter{step.iteration}"
        data = self.cache.path(step.stage, step.key) / "data.jsonl"
        if rows is not None:
            self.tracker.artifact(data, f"data/{prefix}")
        self.tracker.table(rows or [], f"tables/{prefix}.json")
        metrics = {f"time/{step.stage}": 0.0 if cached else meta["seconds"], f"cache_hit/{step.stage}": float(cached)}
        if stats_prefix is not None:
            metrics.update({f"{stats_prefix}{k}": v for k, v in meta["stats"].items() if isinstance(v, (int, float))})
        self.tracker.metrics(metrics, step.iteration)

    def run(self, steps: list[Step]) -> dict[str, float]:
        job = self.job
        by = {(s.stage, s.iteration): s for s in steps}
        seed = job.random_seed
        chunk = job.pipeline.chunk_size

        # select
        st, cls = by[("select", 0)], by[("classify", 0)]
        classified = select.cached_units(self.cache, cls.key, cls.model)
        rows, meta, cached = self.stage(
            st, lambda p: _records(select.run(job.dataset, job.data_root, seed, lambda: self.pool.get(job.seed, None), classified)),
            as_dict(job.dataset),
        )
        instructions = [from_dict(Instruction, r) for r in rows]
        self._log_stage(st, meta, cached, rows, "select/")

        # generate
        st = by[("generate", 0)]
        rows, meta, cached = self.stage(
            st, lambda p: _records(generate.run(job.negatives, instructions, self.pool.get(job.seed, None), seed, p, chunk)), as_dict(job.negatives)
        )
        pairs = [from_dict(Pair, r) for r in rows]
        pair_index = {p.id: p for p in pairs}
        self._log_stage(st, meta, cached, rows, "generate/")
        if not any(p.split == "train" for p in pairs):
            raise RuntimeError(f"generate: no training pairs out of {len(instructions)} instructions (dropped: {meta['stats'].get('dropped')})")

        final: dict[str, float] = {}
        final.update(self._evaluate(steps, 0, pairs))
        for k in range(1, job.iterations + 1):
            st = by[("judge", k)]
            jspec = job.seed if st.role == "seed" else job.judge
            rows, meta, cached = self.stage(
                st, lambda p: _records(judge.run(job.judging, pairs, self.pool.get(jspec, self._adapter(st.adapter_of)), seed + k, p, chunk)),
                as_dict(job.judging),
            )
            judgments = [from_dict(Judgment, r) for r in rows]
            self._log_stage(st, meta, cached, rows, "judge/")

            st = by[("filter", k)]

            def do_filter(p: Partial):
                kept = filters.apply(job.filter, judgments, pair_index, seed + k)
                examples = training_examples(kept, judgments, pair_index, job.judging, seed + k)
                n_ok = sum(j.verdict is not None for j in judgments)
                stats = {"kept": len(examples), "judgments": len(judgments), "keep_rate": len(examples) / max(len(judgments), 1),
                         "kept_A": sum(e.verdict == "A" for e in examples), "kept_B": sum(e.verdict == "B" for e in examples),
                         "with_verdict": n_ok, "with_rejected": sum(e.rejected_completion is not None for e in examples)}
                log.info("filter[iter %d]: filter=%s kept %d/%d judgments (A %d / B %d)", k, job.filter.name, len(examples),
                         len(judgments), stats["kept_A"], stats["kept_B"])
                return [to_dict(e) for e in examples], stats

            rows, meta, cached = self.stage(st, do_filter, as_dict(job.filter))
            examples = [from_dict(TrainExample, r) for r in rows]
            self._log_stage(st, meta, cached, rows, "filter/")

            st = by[("train", k)]

            def do_train(p: Partial):
                # Training starts on an empty GPU: the generation engines (vLLM holds 90% of it) are closed first.
                self.pool.close()
                with self.tracker.child(f"train-iter{k}", {"ste.iteration": str(k), "ste.train_key": st.key}) as active:
                    stats = launch.run_train(job.launch, job.train, examples, job.judge, self.pool.cache_dir, self._adapter(st.init_of),
                                             p.dir, seed + k, report_to_mlflow=active)
                produced = stats.get("produced")
                if produced not in PRODUCED:
                    raise RuntimeError(f"train[iter {k}]: stats['produced']={produced!r}, expected one of {', '.join(PRODUCED)}")
                if PRODUCED[produced] and not (p.dir / PRODUCED[produced]).exists():
                    raise RuntimeError(f"train[iter {k}]: reports produced={produced} but wrote no {p.dir / PRODUCED[produced]}")
                _canonical_adapter_config(p.dir / "adapter" / "adapter_config.json")
                return None, stats

            _, meta, cached = self.stage(st, do_train, as_dict(job.train))
            self._log_stage(st, meta, cached, None, None)
            tstats = meta["stats"]
            self.tracker.metrics(
                {"train/loss": tstats.get("train_loss"), "train/first_loss": tstats.get("first_loss"), "train/last_loss": tstats.get("last_loss"),
                 "train/steps": tstats.get("steps"), "train/examples": tstats.get("examples"), "train/trained": float(bool(tstats.get("trained"))),
                 "train/dropped_too_long": tstats.get("dropped_too_long"), "train/dropped_unbalanced": tstats.get("dropped_unbalanced")}, k)
            final.update(self._evaluate(steps, k, pairs))
        self.tracker.tags({"ste.cache_hits": ",".join(f"{k}={v}" for k, v in self.hits.items())})
        self.tracker.metrics({"cache/hits": float(sum(self.hits.values())), "cache/stages": float(len(self.hits))}, job.iterations)
        return final

    def _adapter(self, train_key: str | None) -> Path | None:
        """What a train stage produced, as its meta records it: the adapter (or full weights) directory, or None
        for the untrained model (no train key, or a train stage that recorded `produced: none`). A recorded
        artifact that is gone is an error, never the base model under the trained model's name."""
        if train_key is None:
            return None
        if not self.cache.valid("train", train_key):
            raise CacheError(f"{self.cache.path('train', train_key)}: the train output this step needs is missing or damaged; rerun to recompute it")
        stats = self.cache.meta("train", train_key).get("stats", {})
        # Outputs from before `produced` existed: trained=True meant an adapter.
        produced = stats.get("produced", "adapter" if stats.get("trained") else "none")
        if produced not in PRODUCED:
            raise CacheError(f"{self.cache.path('train', train_key) / 'meta.json'}: stats.produced={produced!r} is not one of {', '.join(PRODUCED)}")
        if PRODUCED[produced] is None:
            log.warning("train %s produced no weights (no training data): its iteration runs the untrained judge", train_key)
            return None
        path = self.cache.path("train", train_key) / PRODUCED[produced]
        if not path.exists():
            raise CacheError(f"{path}: recorded as produced ({produced}) but missing")
        return path

    def _evaluate(self, steps: list[Step], iteration: int, pairs: list[Pair]) -> dict[str, float]:
        job = self.job
        out: dict[str, float] = {}
        for st in [s for s in steps if s.iteration == iteration and s.stage in evaluate.BENCHMARKS]:
            rows, meta, cached = self.stage(
                st,
                lambda p: _records(evaluate.run(st.stage, job.eval, pairs, job.data_root,
                                                self.pool.get(job.judge, self._adapter(st.adapter_of)), p, job.pipeline.chunk_size)),
                {"judging": evaluate.judging_part(job.eval), "bench": evaluate.BENCHMARKS[st.stage].config(job.eval)},
            )
            self._log_stage(st, meta, cached, rows, "")  # benchmark metrics are named already (rewardbench/...)
            self.tracker.metrics(self._drift(steps, st, rows or []), iteration)
            headline = {"synthetic": "synthetic/accuracy", "rewardbench": "rewardbench/overall", "mtbench": "mtbench/agreement_s1"}[st.stage]
            value = meta["stats"].get(headline)
            log.info("%s[iter %d]: %s %s = %s", st.stage, iteration, st.model, headline, f"{value:.3f}" if value is not None else "n/a")
            out.update({f"{k}@iter{iteration}": v for k, v in meta["stats"].items()})
        return out


    def _drift(self, steps: list[Step], st: Step, rows: list[dict]) -> dict[str, float]:
        """Position bias and verdict flips of one benchmark at this iteration: `<bench>/position/frac_A` (share of
        stated verdicts that say A; both orders are judged, so 0.5 is no preference) and, against the previous
        iteration's verdicts on the same (item, order), `<bench>/position/flips` split into flips to the correct
        verdict and to a wrong one (MT-Bench has no correct verdict: flips only). Meta-Rewarding (Wu et al. 2024)
        saw position bias grow as a judge trained on itself; these show whether ours does."""
        from .analysis import verdict_flips

        stated = [r["verdict"] for r in rows if r["verdict"] is not None]
        out = {f"{st.stage}/position/frac_A": sum(v == "A" for v in stated) / len(stated) if stated else None}
        prev = next((s for s in steps if s.stage == st.stage and s.iteration == st.iteration - 1), None)
        if prev is None or not rows or not self.cache.valid(prev.stage, prev.key):
            return out
        before = {(r["item_id"], r["order"]): r["verdict"] for r in self.cache.rows(prev.stage, prev.key)}
        after = {(r["item_id"], r["order"]): r["verdict"] for r in rows}
        correct = {(r["item_id"], r["order"]): r["chosen_label"] for r in rows}
        f = verdict_flips(before, after, correct)
        out[f"{st.stage}/position/flips"] = f["flips"]
        if st.stage != "mtbench":
            out[f"{st.stage}/position/flips_to_correct"] = f["flips_to_correct"]
            out[f"{st.stage}/position/flips_to_wrong"] = f["flips_to_wrong"]
        return out


def _canonical_adapter_config(path: Path) -> None:
    """PEFT writes `target_modules` from a set, in an order that changes with each process's string hashing:
    sorted, a retrained adapter is byte-identical to the first (so the cache manifest can compare them)."""
    import json

    if not path.exists():
        return
    conf = json.loads(path.read_text())
    if isinstance(conf.get("target_modules"), list):
        conf["target_modules"] = sorted(conf["target_modules"])
        path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def _records(result: tuple[list, dict]) -> tuple[list[dict], dict]:
    records, stats = result
    return [to_dict(r) for r in records], stats


def job_params(cfg: DictConfig, choices: dict[str, str]) -> dict[str, Any]:
    """MLflow params: the group choices (what the UI compares) plus the flattened resolved config."""
    from .tracking import flatten

    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {**{f"choice.{k}": v for k, v in choices.items()}, **flatten(resolved)}


def run_name(job: Job, choices: dict[str, str], overrides: list[str]) -> str:
    """What tells this run apart in the UI: models, dataset, filter, iterations, then the overrides given."""
    base = f"{job.seed.name}>{job.judge.name} {choices.get('dataset', job.dataset.name)}/{job.filter.name} K={job.iterations}"
    extra = [o for o in overrides if o.split("=")[0].lstrip("+~") not in ("seed", "judge", "dataset", "filter", "iterations")]
    return " ".join([base, *extra])[:250]


def run_job(cfg: DictConfig, choices: dict[str, str], sweep: tuple[str, str] | None = None, overrides: list[str] | None = None) -> dict[str, float]:
    """One Hydra job: validate, plan, (dry run: print and return), preflight, track, run."""
    job = Job.from_config(cfg)
    check_lengths(job)
    steps = plan(job)
    problems = preflight(job)
    over = launch.over_budget(launch.train_estimate(job.launch, job.train, job.judge), job.launch) if job.iterations else None
    if job.pipeline.dry_run:
        print(describe(job, steps, choices, problems) + "\n" + launch.describe(job.launch, job.train, job.judge, job.seed), flush=True)
    if over:
        raise ConfigError(f"train/launch: {over}; choose a launch that fits (README: Running on GPUs)")
    if job.pipeline.dry_run:
        return {}
    if problems:
        raise NotRunnableHere("cannot run this job here: " + "; ".join(problems))
    job.results_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(job.tracking, job.results_dir)
    overrides = list(overrides or [])
    # The overrides as a tag: the report labels a sweep's jobs by every override that differs between them.
    tags = {**{f"choice.{k}": v for k, v in choices.items()}, "ste.overrides": json.dumps(overrides)}
    name = run_name(job, choices, overrides)
    tracker.start(name, {**job_params(cfg, choices), **judge.prompt_params(judging=job.judging.prompt, eval=job.eval.prompt)}, tags, sweep)
    status = "FAILED"
    runner = Runner(job, tracker)
    previous = _end_on_sigterm()
    try:
        tracker.text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")  # the job config (Hydra's own is not in it)
        tracker.text(describe(job, steps, choices, []), "plan.txt")
        result = runner.run(steps)
        status = "FINISHED"
        return result
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        runner.pool.close()
        tracker.end(status)


class NotRunnableHere(RuntimeError):
    """The job needs what this machine lacks (a GPU, a backend): found before any work."""


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C, so runs end as KILLED and partial outputs stay resumable."""


def _end_on_sigterm():
    """Turn SIGTERM into `Terminated` while the job runs; returns the previous handler (None off the main thread,
    where Python allows no handler)."""

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None

"""The self-taught loop: plan every stage's cache key from the config, then run what is not cached.

    decontam -> select -> generate [-> audit] [-> audit_judge] -> evaluate(iteration 0) -> [judge -> filter -> train -> evaluate] x iterations

`plan` is the one place that decides: each step's key (computed by its stage module's `key()`), the model that runs
it, the train outputs it wears and starts from, and the outputs it reads. `Runner` executes the steps as planned.
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

from src import judging, launch
from src.costs import estimate
from src.costs import schedule
from src.cache import Partial, StageCache, check
from src.config import ConfigError, _check, as_dict, knob, typed
from src.data import check_readable, resolve
from src.rules.filters import FilterConfig
from src.launch import LaunchConfig
from src.models import gpu_memory
from src.models.base import Generator, ModelSpec
from src.records import Instruction, Judgment, Pair, TrainExample, from_dict, to_dict
from src.stages import audit, decontaminate, evaluate, filter, generate, judge, select, train  # `filter` the stage (the builtin is not used here)
from src.stages.audit import AuditConfig
from src.stages.evaluate import EvalConfig
from src.stages.generate import NegativesConfig
from src.judging import JudgingConfig
from src.pool import DatasetConfig
from src.stages.train import TrainConfig
from src.tracking import Tracker, TrackingConfig, input_rows

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    cache_dir: str | None = None
    dry_run: bool = False
    first_judge: str = "seed"
    model_cache_dir: str | None = None
    chunk_size: int = knob(16, "prompts per saved chunk", min=1)
    vllm_chunk_size: int = knob(1024, "prompts per saved chunk on the vLLM backend (one engine call)", min=1)

    def chunk_for(self, spec: ModelSpec) -> int:
        """Prompts per stage call (one saved chunk) with this model. The HF backend batches inside a chunk, so a
        small one bounds the work a kill loses at little cost; vLLM schedules its own batches over whatever one call
        holds, so it takes a stage in a few large calls (a full RewardBench, 5,970 judgments: 6 calls, not 374).
        It is part of the stage keys that depend on it (generate, evaluate): batched arithmetic is not bit-invariant."""
        return self.vllm_chunk_size if spec.backend == "vllm" else self.chunk_size

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
    audit: AuditConfig
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
            "audit": AuditConfig, "tracking": TrackingConfig, "pipeline": PipelineConfig,
        }
        missing = [g for g in groups if g not in cfg]
        if missing:
            raise ConfigError(f"config has no `{missing[0]}` group")
        top = {k: _check(cfg[k], int, k) for k in ("iterations", "random_seed")}  # one line for iterations=two
        if top["iterations"] < 0:
            raise ConfigError(f"iterations={top['iterations']}: must be >= 0")
        return cls(
            **{g: typed(t, cfg[g], g) for g, t in groups.items()},
            **top,
            data_root=str(cfg.data_root),
            results_dir=Path(str(cfg.results_dir)).expanduser().resolve(),
        )

    @property
    def cache_dir(self) -> Path:
        return Path(self.pipeline.cache_dir).expanduser().resolve() if self.pipeline.cache_dir else self.results_dir / "cache"


def check_lengths(job: Job) -> None:
    """Every generation the job asks for must fit its model's max_model_len (what vLLM would reject later).
    Checked on the composed job (not per group: a group option alone may pair with another model)."""
    from src.models.base import check_fits

    n = job.negatives
    for spec, tokens, where in [
        (job.seed, n.answer_max_new_tokens + n.modify_max_new_tokens, "negatives.answer_max_new_tokens+modify_max_new_tokens"),
        (job.judge, job.judging.max_new_tokens, "judging.max_new_tokens"),
        (job.judge, job.eval.max_new_tokens, "eval.max_new_tokens"),
        *([(job.audit.model, job.audit.max_new_tokens, "audit.max_new_tokens")] if job.audit.judge else []),
    ]:
        msg = check_fits(spec, tokens, where)
        if msg:
            raise ConfigError(msg)


@dataclass
class Step:
    """One stage of the plan with everything that runs it: the Runner executes steps as planned and decides nothing.
    `inputs` names the outputs the stage reads as name -> (stage, key); `adapter` is the train key whose output the
    model wears, `init` (train) the one training starts from; `previous` (benchmarks) is the same benchmark's key one
    iteration earlier, for verdict flips."""

    stage: str
    iteration: int
    key: str
    model: str  # what the log and the plan call the model: its name, + "+iter<k>" for the weights it wears
    config: Any = None  # the stage's typed config, its key's source; judge: (judging, prompt budget), filter: (filter, judging), train: (train, launch)
    spec: ModelSpec | None = None  # the model that runs it; None: no model (filter)
    adapter: str | None = None
    init: str | None = None
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)
    seed: int = 0  # its sampling / selection seed
    previous: str | None = None
    status: str = "todo"  # cached | damaged (fails its check: moved aside and recomputed) | partial | todo


def filter_rule(job: Job) -> FilterConfig:
    """The filter step's rule. train=dpo trains only on examples that have an incorrect judgment to prefer against
    and balances A/B among those (`train.run`, RAM's prepare_dpo_data.py order): balancing in the filter as well,
    before that drop, lost about half the data. So under dpo the filter keeps its rule but not its balance; every
    other train method (and every existing key) is unchanged."""
    if job.train.method == "dpo" and job.filter.balance:
        return dataclasses.replace(job.filter, balance=False)
    return job.filter


def plan(job: Job) -> list[Step]:
    """Every stage of the job, in running order, with its key (each from its stage module's `key()`), its model,
    the weights it wears and starts from, and its inputs. Pure in the config (plus data-file hashes)."""
    cache = StageCache(job.cache_dir)
    rs = job.random_seed
    steps: list[Step] = []
    # Benchmark prompts in the pool, found once per (pool, benchmark files); select drops them before classifying.
    dec = decontaminate.key(job.dataset, evaluate.decontam_benchmarks(job.eval), job.data_root)
    steps.append(Step("decontam", 0, dec, "-", (job.dataset, job.eval)))
    # One classification per (pool, model, prompt, label set), shared by every category: units classify/<cls>-*.
    cls = select.classify_key(job.dataset, job.data_root, job.seed, rs, dec)
    steps.append(Step("classify", 0, cls, job.seed.name, job.dataset, job.seed, seed=rs))
    sel = select.key(job.dataset, cls, rs)
    steps.append(Step("select", 0, sel, job.seed.name, job.dataset, job.seed,
                      inputs={"classify": ("classify", cls), "contaminated": ("decontam", dec)}, seed=rs))
    gen = generate.key(job.negatives, sel, job.seed, rs, job.pipeline.chunk_for(job.seed))
    steps.append(Step("generate", 0, gen, job.seed.name, job.negatives, job.seed, inputs={"instructions": ("select", sel)}, seed=rs))
    pairs = {"pairs": ("generate", gen)}
    if audit.planned(job.audit, job.dataset):  # label-noise audit of the pairs against references (answers, unit tests)
        steps.append(Step("audit", 0, audit.key(job.audit, gen), "-", (job.audit, job.dataset), inputs={"instructions": ("select", sel), **pairs}))
    if job.audit.judge:  # ... and its estimate by an audit judge model
        steps.append(Step("audit_judge", 0, audit.judge_key(job.audit, gen, rs), job.audit.model.name, job.audit, job.audit.model, inputs=pairs, seed=rs))

    benches = [b for b, spec in evaluate.BENCHMARKS.items() if spec.enabled(job.eval)]
    previous: dict[str, str] = {}

    def eval_steps(iteration: int, adapter: str | None) -> list[Step]:
        out = []
        for b in benches:
            key = evaluate.key(b, job.eval, job.data_root, job.judge, adapter, gen, job.pipeline.chunk_for(job.judge))
            name = job.judge.name + (f"+iter{iteration}" if adapter else "")
            out.append(Step(b, iteration, key, name, job.eval, job.judge, adapter, inputs=pairs if b == "synthetic" else {},
                            previous=previous.get(b)))
            previous[b] = key
        return out

    steps.extend(eval_steps(0, None))
    prev_train: str | None = None
    for k in range(1, job.iterations + 1):
        if k == 1 and job.pipeline.first_judge == "seed":
            jspec, jadapter, jname = job.seed, None, job.seed.name
        else:
            jspec, jadapter = job.judge, prev_train
            jname = job.judge.name + (f"+iter{k - 1}" if prev_train else "")
        budget = judging.training_budget(job.judging, jspec, job.judge, job.train.max_length)
        jud = judge.key(job.judging, gen, jspec, jadapter, k, rs, budget)
        steps.append(Step("judge", k, jud, jname, (job.judging, budget), jspec, jadapter, inputs=pairs, seed=rs + k))
        rule = filter_rule(job)
        fil = filter.key(rule, job.judging, jud, gen, k, rs)
        steps.append(Step("filter", k, fil, "-", (rule, job.judging), inputs={"judgments": ("judge", jud), **pairs}, seed=rs + k))
        init = prev_train if job.train.init_from == "previous" else None
        trn = train.key(job.train, fil, init, job.judge, k, rs, job.launch.world_size)
        steps.append(Step("train", k, trn, job.judge.name, (job.train, job.launch), job.judge, init=init, inputs={"examples": ("filter", fil)}, seed=rs + k))
        steps.extend(eval_steps(k, trn))
        prev_train = trn
    for s in steps:
        path = cache.path(s.stage, s.key)
        if path.exists():  # verified, so a dry run does not promise to reuse what the run will recompute
            s.status = "cached" if check(path) is None else "damaged"
        elif cache.has_partial(s.stage, s.key):
            bad = cache.partial(s.stage, s.key).problems()
            s.status = f"partial ({len(bad)} saved chunk(s) damaged: recomputed)" if bad else "partial"
        else:
            s.status = "todo"
    good, bad = classified_units(cache, cls)
    next(s for s in steps if s.stage == "classify").status = f"{len(good)} chunk(s) cached" + (
        f", {len(bad)} damaged (moved aside and recomputed)" if bad else "")
    return steps


def classified_units(cache: StageCache, cls_key: str) -> tuple[list[str], list[str]]:
    """The committed classification chunks of a classify key (the prior unit excluded): those that pass their
    check, and the damaged ones (which a run moves aside and classifies again)."""
    root = cache.root / "classify"
    units = sorted(p.name for p in root.glob(f"{cls_key}-[0-9]*") if (p / "meta.json").exists()) if root.exists() else []
    checked = {u: check(cache.path("classify", u)) for u in units}
    return [u for u in units if checked[u] is None], [u for u in units if checked[u] is not None]


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
    cache, cls = StageCache(job.cache_dir), next(s for s in steps if s.stage == "classify").key
    labels = [r["category"] for u in classified_units(cache, cls)[0] for r in cache.rows("classify", u)]
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
        from src.models.loading import load_generator

        key = (repr(as_dict(spec)), str(adapter))
        if key in self.loaded:
            self.loaded[key] = self.loaded.pop(key)  # most recently used last
            return self.loaded[key]
        while len(self.loaded) >= self.capacity:
            self._release([self.loaded.pop(next(iter(self.loaded)))], spec)
        t0 = time.time()
        gen = load_generator(spec, adapter=str(adapter) if adapter else None, cache_dir=self.cache_dir)
        log.info("model: loaded %s%s in %.1fs", spec.name, f" + adapter {adapter.parent.name}" if adapter else "", time.time() - t0)
        self.loaded[key] = gen
        return gen

    def close(self) -> None:
        """Close every engine and hand the GPU memory back (before training, and at the end)."""
        gens = list(self.loaded.values())
        self.loaded.clear()
        self._release(gens, None)

    @staticmethod
    def _release(gens: list[Generator], next_spec: ModelSpec | None) -> None:
        """Close `gens`, free what they left cached, and after a vLLM engine wait until the GPUs show its memory
        free: its engine core processes free it as they exit, and the next engine (or the trainer) needs it."""
        for g in gens:
            g.close()
        launch.free_accelerator_memory()
        gpu_memory.clear_cublas_workspaces()
        need = [g.spec.gpu_memory_utilization for g in gens if g.spec.backend == "vllm"]
        if need:
            if next_spec is not None and next_spec.backend == "vllm":
                need.append(next_spec.gpu_memory_utilization)
            gpu_memory.wait_until_gpus_free(max(need))


def preflight(job: Job) -> list[str]:
    """Problems that would make the job fail after expensive work, found before any weights load."""
    from src.models.loading import preflight as model_preflight

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
    if job.audit.execute:  # opt-in code execution on a pool with neither unit tests nor references: say so now
        audit.check_auditable(job.dataset, job.data_root)
    if job.iterations:  # a multi-node launch needs the nodes and srun now, not at the first train stage
        problems += launch.allocation_problems(job.launch, os.environ)
    if job.iterations and job.train.peft == "none" and job.judge.backend == "llamacpp":
        # llama.cpp wears LoRA adapters (converted to GGUF); full trained weights would fail at iteration 1's evaluation
        problems.append(f"judge={job.judge.name}: backend llamacpp wears LoRA adapters only, and train.peft=none trains "
                        f"full weights; add judge.backend=hf")
    roles = (("seed", job.seed), ("judge", job.judge), *((("audit.model", job.audit.model),) if job.audit.judge else ()))
    for role, spec in roles:
        try:
            model_preflight(spec)
        except RuntimeError as e:
            problems.append(f"{role}={spec.name}: {e}")
    return problems


# The record type of each stage output that another stage reads.
RECORDS = {"select": Instruction, "generate": Pair, "judge": Judgment, "filter": TrainExample}


class Runner:
    """Executes a plan step by step: each is loaded from the cache or computed under a lock and committed, with
    the model, weights and inputs its step names."""

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
                     ", resuming saved chunks" if partial.has_saved() else "")
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
        if rows and step.iteration == 0 and step.stage in ("select", *evaluate.BENCHMARKS):  # the run's inputs
            self.tracker.dataset(input_rows(rows), step.stage, self._input_source(step), "training" if step.stage == "select" else "evaluation")
        metrics = {f"time/{step.stage}": 0.0 if cached else meta["seconds"], f"cache_hit/{step.stage}": float(cached)}
        if stats_prefix is not None:
            metrics.update({f"{stats_prefix}{k}": v for k, v in meta["stats"].items() if isinstance(v, (int, float))})
        self.tracker.metrics(metrics, step.iteration)

    def _input_source(self, step: Step) -> str:
        """Where a logged input slice came from: the pool's files, a benchmark's file (or hub id), the pairs' cache."""
        if step.stage == "select":
            return ", ".join(str(resolve(s.path, self.job.data_root)) if s.path else f"{s.hf_id}@{s.revision or 'main'}"
                             for s in self.job.dataset.sources)
        if step.stage == "synthetic":
            return str(self.cache.path(*step.inputs["pairs"]))  # the held-out pairs' generate output
        source = getattr(self.job.eval, step.stage).source
        local = resolve(source, self.job.data_root)
        return str(local) if local.exists() else source

    def _log_base_weights(self) -> None:
        """Provenance: the seed's and the judge's weights (directory + hash) as tags of the run."""
        from src.models.weights import model_weights

        if self.tracker.active:
            for role, spec in (("seed", self.job.seed), ("judge", self.job.judge)):
                try:
                    self.tracker.model(role, *model_weights(spec, self.pool.cache_dir))
                except (OSError, RuntimeError) as e:  # e.g. a hub model not downloaded, offline, in a fully cached run
                    log.warning("provenance: no weights hash for %s=%s: %s", role, spec.name, e)
                    self.tracker.tags({f"weights.{role}": f"unknown: {str(e)[:200]}"})

    def _log_trained_weights(self, k: int, step: Step, meta: dict) -> None:
        """Provenance: what iteration k trained (hash from the train stage's verified manifest); a LoRA adapter is
        also logged as an artifact, full weights by path and hash only."""
        from src.models.weights import train_output_digests, weights_hash

        path = self._adapter(step.key) if self.tracker.active else None
        if path is not None:
            self.tracker.model(f"iter{k}", path, weights_hash(path, train_output_digests(meta, path.name)), artifact=path.name == "adapter")

    def run(self, steps: list[Step]) -> dict[str, float]:
        """Every step in plan order; returns each benchmark's stats as `<metric>@iter<k>`."""
        final: dict[str, float] = {}
        self._log_base_weights()
        for st in steps:
            if st.stage == "classify":
                continue  # its units are computed by select as it scans the pool (select's input, by key)
            if st.stage in evaluate.BENCHMARKS:
                final.update(self._benchmark(st))
            else:
                getattr(self, f"_{st.stage}")(st)
        self.tracker.tags({"ste.cache_hits": ",".join(f"{k}={v}" for k, v in self.hits.items())})
        self.tracker.metrics({"cache/hits": float(sum(self.hits.values())), "cache/stages": float(len(self.hits))}, self.job.iterations)
        return final

    def _inputs(self, st: Step) -> dict[str, Any]:
        """The outputs a step reads, by the (stage, key) its plan names: records, or for select the classification
        units (read and extended by key as it scans)."""
        return {name: select.cached_units(self.cache, key, st.model) if stage == "classify"
                else {r["instruction_id"] for r in self.cache.rows(stage, key)} if stage == "decontam"
                else [from_dict(RECORDS[stage], r) for r in self.cache.rows(stage, key)]
                for name, (stage, key) in st.inputs.items()}

    def _model(self, st: Step) -> Generator:
        return self.pool.get(st.spec, self._adapter(st.adapter))

    def _adapter(self, train_key: str | None) -> Path | None:
        return train.weights(self.cache, train_key)

    # One method per stage: what it computes from its step (inputs are read only when it is computed).
    def _decontam(self, st: Step) -> None:
        dataset, ecfg = st.config
        benches = evaluate.decontam_benchmarks(ecfg)
        rows, meta, cached = self.stage(st, lambda p: decontaminate.run(dataset, benches, self.job.data_root),
                                        decontaminate.key_parts(dataset, benches, self.job.data_root)[0])
        self._log_stage(st, meta, cached, rows, "decontam/")

    def _select(self, st: Step) -> None:
        def compute(p: Partial):
            inputs = self._inputs(st)
            return _records(select.run(st.config, self.job.data_root, st.seed, lambda: self._model(st), inputs["classify"],
                                       inputs["contaminated"]))

        rows, meta, cached = self.stage(st, compute, as_dict(st.config))
        self._log_stage(st, meta, cached, rows, "select/")

    def _generate(self, st: Step) -> None:
        rows, meta, cached = self.stage(
            st, lambda p: _records(generate.run(st.config, self._inputs(st)["instructions"], self._model(st), st.seed, p,
                                                self.job.pipeline.chunk_for(st.spec))),
            as_dict(st.config),
        )
        self._log_stage(st, meta, cached, rows, "generate/")
        if not any(r["split"] == "train" for r in rows):
            raise RuntimeError(f"generate: no training pairs out of {len(self._inputs(st)['instructions'])} instructions "
                               f"(dropped: {meta['stats'].get('dropped')})")

    def _audit(self, st: Step) -> None:
        acfg, dataset = st.config

        def compute(p: Partial):
            inputs = self._inputs(st)
            return audit.run(acfg, dataset, self.job.data_root, inputs["instructions"], inputs["pairs"])

        rows, meta, cached = self.stage(st, compute, {"execute": True, "sandbox": as_dict(acfg.sandbox)} if acfg.execute else {})
        self._log_stage(st, {**meta, "stats": audit.logged_stats(meta["stats"])}, cached, rows, "")  # audit/* shares, named already

    def _audit_judge(self, st: Step) -> None:
        rows, meta, cached = self.stage(
            st, lambda p: audit.run_judge(st.config, self._inputs(st)["pairs"], self._model(st), st.seed, p, self.job.pipeline.chunk_for(st.spec)),
            audit.judge_config(st.config),
        )
        self._log_stage(st, meta, cached, rows, "")  # audit/judge/* shares, named already

    def _judge(self, st: Step) -> None:
        cfg, budget = st.config
        rows, meta, cached = self.stage(
            st, lambda p: _records(judge.run(cfg, self._inputs(st)["pairs"], self._model(st), st.seed, p, self.job.pipeline.chunk_for(st.spec), budget)),
            {**as_dict(cfg), **({"prompt_budget": budget} if budget is not None else {})},
        )
        self._log_stage(st, meta, cached, rows, "judge/")

    def _filter(self, st: Step) -> None:
        rule, judging = st.config

        def compute(p: Partial):
            inputs = self._inputs(st)
            return _records(filter.run(rule, judging, inputs["judgments"], inputs["pairs"], st.seed))

        rows, meta, cached = self.stage(st, compute, as_dict(rule))
        self._log_stage(st, {**meta, "stats": filter.logged_stats(meta["stats"])}, cached, rows, "filter/")

    def _train(self, st: Step) -> None:
        tcfg, lcfg = st.config
        k = st.iteration

        def do_train(p: Partial):
            examples = self._inputs(st)["examples"]
            init = self._adapter(st.init)
            # Training starts on an empty GPU: the generation engines (vLLM holds 90% of it) are closed first.
            self.pool.close()
            with self.tracker.child(f"train-iter{k}", {"ste.iteration": str(k), "ste.train_key": st.key}) as active:
                stats = launch.run_train(lcfg, tcfg, examples, st.spec, self.pool.cache_dir, init, p.dir, st.seed, report_to_mlflow=active)
            train.check_output(stats, p.dir, f"train[iter {k}]")
            return None, stats

        _, meta, cached = self.stage(st, do_train, as_dict(tcfg))
        self._log_stage(st, meta, cached, None, None)
        self._log_trained_weights(k, st, meta)
        tstats = meta["stats"]
        self.tracker.metrics(
            {"train/loss": tstats.get("train_loss"), "train/first_loss": tstats.get("first_loss"), "train/last_loss": tstats.get("last_loss"),
             "train/steps": tstats.get("steps"), "train/examples": tstats.get("examples"), "train/trained": float(bool(tstats.get("trained"))),
             "train/dropped_too_long": tstats.get("dropped_too_long"), "train/dropped_unbalanced": tstats.get("dropped_unbalanced")}, k)

    def _benchmark(self, st: Step) -> dict[str, float]:
        rows, meta, cached = self.stage(
            st, lambda p: _records(evaluate.run(st.stage, st.config, self._inputs(st).get("pairs", []), self.job.data_root, self._model(st), p, self.job.pipeline.chunk_for(st.spec))),
            evaluate.config_part(st.stage, st.config),
        )
        self._log_stage(st, meta, cached, rows, "")  # benchmark metrics are named already (rewardbench/...)
        self.tracker.metrics(self._drift(st, rows or []), st.iteration)
        headline = {"synthetic": "synthetic/accuracy", "rewardbench": "rewardbench/overall", "mtbench": "mtbench/agreement_s1"}[st.stage]
        value = meta["stats"].get(headline)
        log.info("%s[iter %d]: %s %s = %s", st.stage, st.iteration, st.model, headline, f"{value:.3f}" if value is not None else "n/a")
        return {f"{k}@iter{st.iteration}": v for k, v in meta["stats"].items()}

    def _drift(self, st: Step, rows: list[dict]) -> dict[str, float]:
        """Position bias and verdict flips of one benchmark at this iteration: `<bench>/position/frac_A` (share of
        stated verdicts that say A; both orders are judged, so 0.5 is no preference) and, against the previous
        iteration's verdicts on the same (item, order), `<bench>/position/flips` split into flips to the correct
        verdict and to a wrong one (MT-Bench has no correct verdict: flips only). Meta-Rewarding (Wu et al. 2024)
        saw position bias grow as a judge trained on itself; these show whether ours does."""
        from src.rules.analysis import verdict_flips

        stated = [r["verdict"] for r in rows if r["verdict"] is not None]
        out = {f"{st.stage}/position/frac_A": sum(v == "A" for v in stated) / len(stated) if stated else None}
        if st.previous is None or not rows or not self.cache.valid(st.stage, st.previous):
            return out
        before = {(r["item_id"], r["order"]): r["verdict"] for r in self.cache.rows(st.stage, st.previous)}
        after = {(r["item_id"], r["order"]): r["verdict"] for r in rows}
        correct = {(r["item_id"], r["order"]): r["chosen_label"] for r in rows}
        f = verdict_flips(before, after, correct)
        out[f"{st.stage}/position/flips"] = f["flips"]
        if st.stage != "mtbench":
            out[f"{st.stage}/position/flips_to_correct"] = f["flips_to_correct"]
            out[f"{st.stage}/position/flips_to_wrong"] = f["flips_to_wrong"]
        return out


def _records(result: tuple[list, dict]) -> tuple[list[dict], dict]:
    records, stats = result
    return [to_dict(r) for r in records], stats


def job_params(cfg: DictConfig, choices: dict[str, str]) -> dict[str, Any]:
    """MLflow params: the group choices (what the UI compares) plus the flattened resolved config."""
    from src.tracking import flatten

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
    schedule.check_schedule(job)
    if job.audit.judge and as_dict(job.audit.model) == as_dict(job.seed):
        log.warning("audit.model is the seed model (%s): the audit judge then grades its own pairs; pick another with "
                    "model@audit.model=<preset>", job.seed.name)
    steps = plan(job)
    problems = preflight(job)
    over = launch.over_budget(launch.train_estimate(job.launch, job.train, job.judge), job.launch) if job.iterations else None
    if job.pipeline.dry_run:
        print(describe(job, steps, choices, problems) + "\n" + launch.describe(job.launch, job.train, job.judge, job.seed)
              + "\n" + schedule.describe(job) + "\n" + estimate.describe_budgets(job)
              + "\n" + estimate.describe(job, str(job.data_root)), flush=True)
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
    tracker.start(name, {**job_params(cfg, choices), **judging.prompt_params(judging=job.judging.prompt, eval=job.eval.prompt)}, tags, sweep)
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
        # The run's status first: a SIGTERM that lands inside an import (e.g. torch's, while the model loads) can
        # leave native code half-initialised, and releasing the models then crashes the process (measured: SIGSEGV),
        # which must not leave the MLflow run RUNNING.
        tracker.end(status)
        runner.pool.close()


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

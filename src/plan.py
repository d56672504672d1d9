"""The plan: every decision about every step of a job, before anything runs.

    decontam -> select -> generate [-> audit] [-> audit_judge] -> evaluate(iteration 0) -> [judge -> filter -> train -> evaluate] x iterations

`plan(job)` is the one place that decides: each step's key (computed by its stage module's `key()`), its typed
config (declared in its stage module), the model that runs it, the train outputs it wears and starts from, and the
outputs it reads. The Runner (src/runner.py) executes the steps as planned, through `STAGES`: what every stage
module declares (src/step.py). Keys are a function of the config alone (plus data-file hashes),
so `pipeline.dry_run=true` shows what a run would reuse before loading anything (`describe`).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from src import judging
from src.cache import StageCache, check
from src.rules.filters import FilterConfig
from src.stages import audit, decontaminate, evaluate, filter, generate, judge, select, train  # `filter` the stage (the builtin is not used here)
from src.step import Stage, Step

# Every stage, as its module declares it: how the Runner computes, logs and reads it.
STAGES: dict[str, Stage] = {**decontaminate.STAGES, **select.STAGES, **generate.STAGES, **audit.STAGES, **evaluate.STAGES,
                            **judge.STAGES, **filter.STAGES, **train.STAGES}

if TYPE_CHECKING:  # a plan is made of a job; importing it would circle (src.job runs plans)
    from src.job import Job

log = logging.getLogger(__name__)


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
    steps.append(Step("decontam", 0, dec, "-", decontaminate.DecontamStep(job.dataset, evaluate.decontam_benchmarks(job.eval))))
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
        steps.append(Step("audit", 0, audit.key(job.audit, gen), "-", audit.AuditStep(job.audit, job.dataset), inputs={"instructions": ("select", sel), **pairs}))
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
        steps.append(Step("judge", k, jud, jname, judge.JudgeStep(job.judging, budget), jspec, jadapter, inputs=pairs, seed=rs + k))
        rule = filter_rule(job)
        fil = filter.key(rule, job.judging, jud, gen, k, rs)
        steps.append(Step("filter", k, fil, "-", filter.FilterStep(rule, job.judging), inputs={"judgments": ("judge", jud), **pairs}, seed=rs + k))
        init = prev_train if job.train.init_from == "previous" else None
        trn = train.key(job.train, fil, init, job.judge, k, rs, job.launch.world_size)
        steps.append(Step("train", k, trn, job.judge.name, train.TrainStep(job.train, job.launch), job.judge, init=init, inputs={"examples": ("filter", fil)}, seed=rs + k))
        steps.extend(eval_steps(k, trn))
        prev_train = trn
    for s in steps:
        s.chunk = job.pipeline.chunk_for(s.spec) if s.spec is not None else 0
        s.meta_config = meta_config(s)
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


def meta_config(s: Step) -> dict:
    """The config part of a step's key, as its cache meta.json records it (a reader of the cache sees what made it)."""
    return STAGES[s.stage].config_part(s.config)


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

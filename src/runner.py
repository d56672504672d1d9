"""The Runner: executes a plan's steps in order and decides nothing. Each step is computed once under its key
(or read from the cache), its outputs, metrics and artifacts logged; models are loaded through a pool that keeps
at most what fits (2 on CPU, 1 engine on GPUs) and hands GPU memory back between engines and before training.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from src import launch
from src.benchmarks import HEADLINE_METRIC
from src.cache import Partial, StageCache
from src.config import as_dict
from src.data import resolve
from src.models import gpu_memory
from src.models.base import Generator, ModelSpec
from src.plan import Step
from src.records import Instruction, Judgment, Pair, TrainExample, from_dict, to_dict
from src.stages import audit, decontaminate, evaluate, filter, generate, judge, select, train  # `filter` the stage (the builtin is not used here)
from src.tracking import Tracker, input_rows

if TYPE_CHECKING:  # the Runner is given a job; importing it would circle (src.job runs the Runner)
    from src.job import Job

log = logging.getLogger(__name__)


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
        # Set by src/job.py (pipeline.workers > 1 or executor=slurm) and in a shard worker (src/shards.py): called
        # before a stage is computed, it has workers compute the stage's missing shards.
        self.sharding = None

    def stage(self, step: Step, compute: Callable[[Partial], tuple[list[dict] | None, dict]]) -> tuple[list[dict] | None, dict, bool]:
        """(rows, meta, cached). `compute` gets the partial directory and returns (rows, stats)."""
        name = f"{step.stage}[iter {step.iteration}]"

        def logged(partial: Partial):
            log.info("%s: computing (key %s, model %s)%s", name, step.key, step.model,
                     ", resuming saved chunks" if partial.has_saved() else "")
            return compute(partial)

        meta = {"iteration": step.iteration, "model": step.model, "config": step.meta_config}
        if self.sharding is not None:
            self.sharding.before(step, compute)
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
            final.update(self.one(st))
        self.tracker.tags({"ste.cache_hits": ",".join(f"{k}={v}" for k, v in self.hits.items())})
        self.tracker.metrics({"cache/hits": float(sum(self.hits.values())), "cache/stages": float(len(self.hits))}, self.job.iterations)
        return final

    def one(self, st: Step) -> dict[str, float]:
        """One step (its stage's method); a benchmark returns its stats."""
        if st.stage in evaluate.BENCHMARKS:
            return self._benchmark(st)
        getattr(self, f"_{st.stage}")(st)
        return {}

    def _inputs(self, st: Step) -> dict[str, Any]:
        """The outputs a step reads, by the (stage, key) its plan names: records, or for select the classification
        units (read and extended by key as it scans)."""
        return {name: select.cached_units(self.cache, key, st.model) if stage == "classify"
                else {r["instruction_id"] for r in self.cache.rows(stage, key)} if stage == "decontam"
                else [from_dict(RECORDS[stage], r) for r in self.cache.rows(stage, key)]
                for name, (stage, key) in st.inputs.items()}

    def _model(self, st: Step) -> Generator:
        """The step's model, loaded on first use (`_LazyModel`): a stage whose chunks are all saved (by shard
        workers, or an earlier attempt) never loads it."""
        adapter: list[Path | None] = []

        def load() -> Generator:
            if not adapter:
                adapter.append(self._adapter(st.adapter))
            return self.pool.get(st.spec, adapter[0])

        return _LazyModel(st.spec, load)  # type: ignore[return-value]

    def _adapter(self, train_key: str | None) -> Path | None:
        return train.weights(self.cache, train_key)

    # One method per stage: what it computes from its step (inputs are read only when it is computed).
    def _decontam(self, st: Step) -> None:
        dataset, benches = st.config
        rows, meta, cached = self.stage(st, lambda p: decontaminate.run(dataset, benches, self.job.data_root))
        self._log_stage(st, meta, cached, rows, "decontam/")

    def _select(self, st: Step) -> None:
        def compute(p: Partial):
            inputs = self._inputs(st)
            return _records(select.run(st.config, self.job.data_root, st.seed, lambda: self._model(st), inputs["classify"],
                                       inputs["contaminated"]))

        rows, meta, cached = self.stage(st, compute)
        self._log_stage(st, meta, cached, rows, "select/")

    def _generate(self, st: Step) -> None:
        rows, meta, cached = self.stage(
            st, lambda p: _records(generate.run(st.config, self._inputs(st)["instructions"], self._model(st), st.seed, p,
                                                st.chunk)),
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

        rows, meta, cached = self.stage(st, compute)
        self._log_stage(st, {**meta, "stats": audit.logged_stats(meta["stats"])}, cached, rows, "")  # audit/* shares, named already

    def _audit_judge(self, st: Step) -> None:
        rows, meta, cached = self.stage(
            st, lambda p: audit.run_judge(st.config, self._inputs(st)["pairs"], self._model(st), st.seed, p, st.chunk),
        )
        self._log_stage(st, meta, cached, rows, "")  # audit/judge/* shares, named already

    def _judge(self, st: Step) -> None:
        cfg, budget = st.config
        rows, meta, cached = self.stage(
            st, lambda p: _records(judge.run(cfg, self._inputs(st)["pairs"], self._model(st), st.seed, p, st.chunk, budget)),
        )
        self._log_stage(st, meta, cached, rows, "judge/")

    def _filter(self, st: Step) -> None:
        rule, judging = st.config

        def compute(p: Partial):
            inputs = self._inputs(st)
            return _records(filter.run(rule, judging, inputs["judgments"], inputs["pairs"], st.seed))

        rows, meta, cached = self.stage(st, compute)
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

        _, meta, cached = self.stage(st, do_train)
        self._log_stage(st, meta, cached, None, None)
        self._log_trained_weights(k, st, meta)
        tstats = meta["stats"]
        self.tracker.metrics(
            {"train/loss": tstats.get("train_loss"), "train/first_loss": tstats.get("first_loss"), "train/last_loss": tstats.get("last_loss"),
             "train/steps": tstats.get("steps"), "train/examples": tstats.get("examples"), "train/trained": float(bool(tstats.get("trained"))),
             "train/dropped_too_long": tstats.get("dropped_too_long"), "train/dropped_unbalanced": tstats.get("dropped_unbalanced")}, k)

    def _benchmark(self, st: Step) -> dict[str, float]:
        rows, meta, cached = self.stage(
            st, lambda p: _records(evaluate.run(st.stage, st.config, self._inputs(st).get("pairs", []), self.job.data_root, self._model(st), p, st.chunk)),
        )
        self._log_stage(st, meta, cached, rows, "")  # benchmark metrics are named already (rewardbench/...)
        self.tracker.metrics(self._drift(st, rows or []), st.iteration)
        headline = HEADLINE_METRIC[st.stage]
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


class _LazyModel:
    """A step's model, loaded on first attribute use (through the pool, which keeps it across stages): `spec`, all a
    stage reads before its first chunk, needs no load."""

    def __init__(self, spec: ModelSpec, load: Callable[[], Generator]):
        self.spec, self._load = spec, load

    def __getattr__(self, name: str) -> Any:
        return getattr(self._load(), name)


def _records(result: tuple[list, dict]) -> tuple[list[dict], dict]:
    records, stats = result
    return [to_dict(r) for r in records], stats

"""The Runner: executes a plan's steps in order and decides nothing. Each step is computed once under its key
(or read from the cache) by its stage's declared `execute`, its outputs, metrics and artifacts logged; models are loaded through a pool that keeps
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
from src.models import gpu_memory
from src.models.base import Generator, ModelSpec
from src.plan import STAGES
from src.stages import train
from src.step import Context, Stage, Step
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


class Runner:
    """Executes a plan step by step: each is loaded from the cache or computed under a lock and committed, by its
    stage module's `execute` (`plan.STAGES`), with the model, weights and inputs its step names; then logged the same
    way for every stage. The Runner never branches on which stage it runs.

    `models`: the run's base models by role (their weights are logged as provenance; a vLLM one makes the model
    pool hold one engine at a time)."""

    def __init__(self, tracker: Tracker, cache_dir: Path, data_root: str, models: dict[str, ModelSpec], model_cache_dir: Path | None = None):
        self.tracker, self.data_root, self.models = tracker, data_root, models
        self.cache = StageCache(cache_dir)
        gpu = any(m.backend == "vllm" for m in models.values())
        self.pool = ModelPool(model_cache_dir, capacity=1 if gpu else 2)
        self.hits: dict[str, int] = {}
        # Set by src/job.py (pipeline.workers > 1 or executor=slurm) and in a shard worker (src/shards.py): called
        # before a stage is computed, it has workers compute the stage's missing shards.
        self.sharding = None

    @classmethod
    def for_job(cls, job: Job, tracker: Tracker) -> Runner:
        model_cache = Path(job.pipeline.model_cache_dir).expanduser() if job.pipeline.model_cache_dir else None
        return cls(tracker, job.cache_dir, job.data_root, {"seed": job.seed, "judge": job.judge}, model_cache)

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

    def run(self, steps: list[Step]) -> dict[str, float]:
        """Every step in plan order; returns each benchmark's stats as `<metric>@iter<k>`."""
        final: dict[str, float] = {}
        self._log_base_weights()
        for st in steps:
            final.update(self.one(st))
        self.tracker.tags({"ste.cache_hits": ",".join(f"{k}={v}" for k, v in self.hits.items())})
        last = max((s.iteration for s in steps), default=0)
        self.tracker.metrics({"cache/hits": float(sum(self.hits.values())), "cache/stages": float(len(self.hits))}, last)
        return final

    def one(self, st: Step) -> dict[str, float]:
        """One step, computed (or read from the cache) and logged; a benchmark returns its stats as
        `<metric>@iter<k>`. A shard worker (src/shards.py) runs just this."""
        declared = STAGES[st.stage]
        if declared.execute is None:
            return {}  # computed by another stage (classify: by select as it scans the pool)
        rows, meta, cached = self.stage(st, lambda p: declared.execute(st, self._context(st, p)))
        self._log_stage(st, meta, cached, rows, declared)
        if declared.weights:
            self._log_trained_weights(st, meta)
        return self._log_benchmark(st, rows or [], meta) if declared.benchmark else {}

    def _context(self, st: Step, partial: Partial) -> Context:
        return Context(self.cache, partial, self.data_root, inputs=lambda: self._inputs(st), model=lambda: self._model(st),
                       train=lambda *args: self._train(st, *args))

    def _inputs(self, st: Step) -> dict[str, Any]:
        """The outputs a step reads, by the (stage, key) its plan names, as each stage declares they are read."""
        return {name: STAGES[stage].read(self.cache, key, st) for name, (stage, key) in st.inputs.items()}

    def _model(self, st: Step) -> Generator:
        """The step's model, loaded on first use (`_LazyModel`): a stage whose chunks are all saved (by shard
        workers, or an earlier attempt) never loads it."""
        adapter: list[Path | None] = []

        def load() -> Generator:
            if not adapter:
                adapter.append(Path(st.adapter_dir) if st.adapter_dir else self._adapter(st.adapter))
            return self.pool.get(st.spec, adapter[0])

        return _LazyModel(st.spec, load)  # type: ignore[return-value]

    def _adapter(self, train_key: str | None) -> Path | None:
        return train.weights(self.cache, train_key)

    def _train(self, st: Step, lcfg, tcfg, examples: list, init: Path | None, out_dir: Path) -> dict:
        """The launcher, on an empty GPU: the generation engines (vLLM holds 90% of it) are closed first; the
        training is a child run of the job's."""
        self.pool.close()
        with self.tracker.child(f"train-iter{st.iteration}", {"ste.iteration": str(st.iteration), "ste.train_key": st.key}) as active:
            return launch.run_train(lcfg, tcfg, examples, st.spec, self.pool.cache_dir, init, out_dir, st.seed, report_to_mlflow=active)

    def _log_stage(self, step: Step, meta: dict, cached: bool, rows: list[dict] | None, declared: Stage) -> None:
        """A stage's data as an artifact and a table; its time, cache hit and the stats it declares as metrics at
        step = iteration."""
        prefix = f"{step.stage}_iter{step.iteration}"
        data = self.cache.path(step.stage, step.key) / "data.jsonl"
        if rows is not None:
            self.tracker.artifact(data, f"data/{prefix}")
        self.tracker.table(rows or [], f"tables/{prefix}.json")
        if rows and step.iteration == 0 and declared.input:  # the run's inputs
            self.tracker.dataset(input_rows(rows), step.stage, declared.source(step, self.cache, self.data_root), declared.input)
        metrics = {f"time/{step.stage}": 0.0 if cached else meta["seconds"], f"cache_hit/{step.stage}": float(cached)}
        metrics.update({k: v for k, v in declared.logged(meta["stats"]).items() if isinstance(v, (int, float))})
        self.tracker.metrics(metrics, step.iteration)

    def _log_base_weights(self) -> None:
        """Provenance: the base models' weights (directory + hash) as tags of the run."""
        from src.models.weights import model_weights

        if self.tracker.active:
            for role, spec in self.models.items():
                try:
                    self.tracker.model(role, *model_weights(spec, self.pool.cache_dir))
                except (OSError, RuntimeError) as e:  # e.g. a hub model not downloaded, offline, in a fully cached run
                    log.warning("provenance: no weights hash for %s=%s: %s", role, spec.name, e)
                    self.tracker.tags({f"weights.{role}": f"unknown: {str(e)[:200]}"})

    def _log_trained_weights(self, step: Step, meta: dict) -> None:
        """Provenance: what iteration k trained (hash from the train stage's verified manifest); a LoRA adapter is
        also logged as an artifact, full weights by path and hash only."""
        from src.models.weights import train_output_digests, weights_hash

        path = self._adapter(step.key) if self.tracker.active else None
        if path is not None:
            self.tracker.model(f"iter{step.iteration}", path, weights_hash(path, train_output_digests(meta, path.name)), artifact=path.name == "adapter")

    def _log_benchmark(self, st: Step, rows: list[dict], meta: dict) -> dict[str, float]:
        """A benchmark's drift metrics and headline line; its stats as `<metric>@iter<k>`."""
        self.tracker.metrics(self._drift(st, rows), st.iteration)
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

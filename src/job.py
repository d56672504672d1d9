"""The job: one composed, checked self-taught-evaluator run. `Job.from_config` types every config group (each read
by the one module that declares its dataclass), `check_lengths` and `preflight` find what would fail after
expensive work before any model loads, `run_job` plans (src/plan.py), runs the steps (src/runner.py) under MLflow
and ends on SIGTERM as KILLED with everything computed kept.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src import judging, launch
from src.config import ConfigError, _check, as_dict, knob, typed, unwritable
from src.costs import estimate, schedule
from src.data import check_readable, resolve
from src.judging import JudgingConfig
from src.launch import LaunchConfig
from src.models.base import ModelSpec
from src.plan import describe, plan
from src.pool import DatasetConfig
from src.rules.filters import FilterConfig
from src.runner import Runner
from src import shards
from src.shards import EXECUTORS, SlurmConfig
from src.stages import audit, evaluate, select
from src.stages.audit import AuditConfig
from src.stages.evaluate import EvalConfig
from src.stages.generate import NegativesConfig
from src.stages.train import TrainConfig
from src.tracking import Tracker, TrackingConfig
from src.costs import memory

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    cache_dir: str | None = None
    dry_run: bool = False
    first_judge: str = "seed"
    model_cache_dir: str | None = None
    chunk_size: int = knob(16, "prompts per saved chunk", min=1)
    vllm_chunk_size: int = knob(1024, "prompts per saved chunk on the vLLM backend (one engine call)", min=1)
    # Workers (src/shards.py, docs/slurm-cluster.md). None of these is in any key: a worker count never changes an output.
    executor: str = "local"  # local: worker processes on this machine | slurm: one SLURM job array per stage
    workers: int = knob(1, "workers computing a generation stage's shards at once (local, 1: in the job's own process)", min=1, max=4096)
    shard_size: int | None = knob(None, "prompts per shard, a multiple of the stage's chunk (null: one chunk)", min=1)
    slurm: SlurmConfig = dataclasses.field(default_factory=SlurmConfig)

    def chunk_for(self, spec: ModelSpec) -> int:
        """Prompts per stage call (one saved chunk) with this model. The HF backend batches inside a chunk, so a
        small one bounds the work a kill loses at little cost; vLLM schedules its own batches over whatever one call
        holds, so it takes a stage in a few large calls (a full RewardBench, 5,970 judgments: 6 calls, not 374).
        It is part of the stage keys that depend on it (generate, evaluate): batched arithmetic is not bit-invariant."""
        return self.vllm_chunk_size if spec.backend == "vllm" else self.chunk_size

    def chunks_per_shard(self, spec: ModelSpec) -> int:
        """Chunks in one shard of a stage run by `spec`: shards are whole chunks, so a shard's output is the one an
        unsharded run saves for those chunks (chunk boundaries are in generate's and evaluate's keys)."""
        chunk = self.chunk_for(spec)
        if self.shard_size is None:
            return 1
        if self.shard_size % chunk:
            raise ConfigError(f"pipeline.shard_size={self.shard_size}: must be a multiple of the chunk of {spec.name} "
                              f"({chunk}, pipeline.{'vllm_' if spec.backend == 'vllm' else ''}chunk_size)")
        return self.shard_size // chunk

    @property
    def sharded(self) -> bool:
        """Generation stages go to workers: on SLURM always (the job holds no GPU), locally from 2 workers."""
        return self.executor == "slurm" or self.workers > 1

    def validate(self, where: str) -> None:
        if self.first_judge not in ("seed", "judge"):
            raise ConfigError(f"{where}.first_judge={self.first_judge!r}: use seed or judge")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"{where}.executor={self.executor!r}: use {' or '.join(EXECUTORS)}")


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


def preflight(job: Job, build: bool = False) -> list[str]:
    """Problems that would make the job fail after expensive work, found before any weights load. `build`: a real
    run (not the dry run) may convert a packaged model now to read its architecture (it needs it next anyway)."""
    from src.models.loading import module_names
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
    if job.pipeline.executor == "slurm" and not shutil.which("sbatch"):  # the arrays are submitted from this machine
        problems.append("pipeline.executor=slurm: no sbatch on PATH; start the job where SLURM's commands are (a login "
                        "or compute node), or use pipeline.executor=local")
    if job.iterations:  # a multi-node launch needs the nodes and srun now, not at the first train stage
        problems += launch.allocation_problems(job.launch, os.environ)
    if job.iterations and job.train.peft == "none" and job.judge.backend == "llamacpp":
        # llama.cpp wears LoRA adapters (converted to GGUF); full trained weights would fail at iteration 1's evaluation
        problems.append(f"judge={job.judge.name}: backend llamacpp wears LoRA adapters only, and train.peft=none trains "
                        f"full weights; add judge.backend=hf")
    if job.iterations and job.train.peft == "lora":  # a target PEFT matches nowhere fails at the first train stage
        cache = Path(job.pipeline.model_cache_dir).expanduser() if job.pipeline.model_cache_dir else None
        try:
            names = module_names(job.judge, cache, build)
        except Exception:  # noqa: BLE001 - the model's own preflight (below) says why it cannot load
            names = None
        if names is not None:
            missing = [t for t in job.train.lora_target_modules if not any(n == t or n.endswith("." + t) for n in names)]
            if missing:
                leaves = sorted({n.rsplit(".", 1)[-1] for n in names if "proj" in n or n.endswith(("fc1", "fc2", "w1", "w2", "w3"))})
                problems.append(f"train.lora_target_modules: {', '.join(map(repr, missing))} matches no module of {job.judge.name} "
                                f"(its projections: {', '.join(leaves)})")
    roles = (("seed", job.seed), ("judge", job.judge), *((("audit.model", job.audit.model),) if job.audit.judge else ()))
    for role, spec in roles:
        try:
            model_preflight(spec)
        except RuntimeError as e:
            problems.append(f"{role}={spec.name}: {e}")
    return problems


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
    for spec in (job.seed, job.judge, *((job.audit.model,) if job.audit.judge else ())):
        job.pipeline.chunks_per_shard(spec)  # a shard_size that cuts a chunk: one line now
    steps = plan(job)
    problems = preflight(job, build=not job.pipeline.dry_run)
    over = memory.over_budget(memory.train_estimate(job.launch, job.train, job.judge), job.launch) if job.iterations else None
    if job.pipeline.dry_run:
        print(describe(job, steps, choices, problems) + "\n" + launch.describe(job.launch, job.train, job.judge, job.seed)
              + "\n" + schedule.describe(job) + "\n" + estimate.describe_budgets(job)
              + "\n" + estimate.describe(job, str(job.data_root)) + "\n" + estimate.describe_shards(job, str(job.data_root)), flush=True)
    if over:
        raise ConfigError(f"train/launch: {over}; choose a launch that fits (docs/gpus-and-vllm.md)")
    if job.pipeline.dry_run:
        return {}
    if problems:
        raise NotRunnableHere("cannot run this job here: " + "; ".join(problems))
    for path, key in ((job.results_dir, "results_dir"), (job.cache_dir, "pipeline.cache_dir")):
        problem = unwritable(path, key)  # before the run is created: a job that cannot write leaves no FAILED run
        if problem:
            raise ConfigError(problem)
    tracker = Tracker(job.tracking, job.results_dir)
    overrides = list(overrides or [])
    # The overrides as a tag: the report labels a sweep's jobs by every override that differs between them.
    tags = {**{f"choice.{k}": v for k, v in choices.items()}, "ste.overrides": json.dumps(overrides)}
    name = run_name(job, choices, overrides)
    tracker.start(name, {**job_params(cfg, choices), **judging.prompt_params(judging=job.judging.prompt, eval=job.eval.prompt)}, tags, sweep)
    status = "FAILED"
    runner = Runner.for_job(job, tracker)
    if job.pipeline.sharded:  # generation stages' shards go to workers; this process only merges and commits
        runner.sharding = shards.Driver(job, runner.cache, runner.pool.close)
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

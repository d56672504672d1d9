"""Generation stages over workers: a stage's chunks cut into fixed shards, computed by worker processes on this
machine (`pipeline.executor=local`) or by one SLURM job array per stage (`pipeline.executor=slurm`), both through
submitit; the job's own process (the driver) waits, reports progress and commits. Reads `pipeline.executor`,
`pipeline.workers`, `pipeline.shard_size` and `pipeline.slurm` (docs/slurm-cluster.md).

A shard is `chunks_per_shard` whole chunks in the stage's item order, so shard i holds the same items for any
worker count, and a chunk's rows are a function of the stage key and its items (per-item seeds): each worker saves
its chunks into the stage's `.partial/chunks/` exactly as an unsharded run would (one file per chunk named by its
SHA-256, written to a temporary name, fsynced and renamed: no lock, no shared append, so NFS-safe). A shard is done
when all its chunks are there and verified. The driver then runs the stage's own compute, which finds every chunk
saved, merges them in item order and commits under the usual key: readers and later stages see the same files.

Nothing here enters a key. A failed or killed worker leaves the stage uncommitted (one line says which shards are
missing); a rerun, or SLURM's requeue, computes only missing or damaged shards. Classification (select's
`classify` units) is not sharded: select scans the pool until enough instructions carry the category, so how many
units it needs is known only as it goes.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from src.cache import ChunkPlan, ChunksDone, Partial, StageCache
from src.config import knob
from src.costs.estimate import gpus_of, on_gpu
from src.stages import evaluate

if TYPE_CHECKING:  # a job holds its pipeline config; importing it would circle (src.job builds the driver)
    from src.job import Job
    from src.plan import Step

log = logging.getLogger(__name__)

EXECUTORS = ("local", "slurm")
# The stages whose items are cut into shards: every stage that runs a model over items through `run_chunked`.
SHARDED = ("generate", "judge", "audit_judge", *evaluate.BENCHMARKS)


@dataclass
class SlurmConfig:
    """What each array task asks SLURM for besides its GPUs (the step's model: seed.min_gpus, judge.min_gpus, or its
    tensor-parallel size on vLLM). Partition, account and time limit default to the environment variables
    hydra/launcher=slurm reads (STE_SLURM_PARTITION, STE_SLURM_ACCOUNT, STE_SLURM_TIMEOUT_MIN)."""

    partition: str | None = None
    account: str | None = None
    timeout_min: int = knob(4320, "time limit of one array task, minutes", min=1)
    cpus_per_gpu: int = knob(12, "CPUs per GPU of an array task (at least 8)", min=1)
    mem_gb_per_gpu: int = knob(120, "host memory per GPU of an array task, GB (at least 32)", min=1)
    max_num_timeout: int = knob(3, "requeues of a task after its time limit or a preemption", min=0)


class ShardsFailed(RuntimeError):
    """Workers ended and some shards are missing: the stage is not committed; a rerun computes only those."""


class ShardsDone(Exception):
    """A worker's stage compute ended after its own shards (the stage's post-processing needs all of them)."""


def missing_shards(plan: ChunkPlan, per: int) -> list[int]:
    """Shards with at least one chunk not saved (or not verified), in order."""
    return sorted({c // per for c in range(plan.total) if c not in plan.saved})


def shard_count(plan: ChunkPlan, per: int) -> int:
    return math.ceil(plan.total / per)


class Worker:
    """A worker process's hook in `Runner.stage`: compute this worker's shards into the partial directory, then stop
    (ShardsDone) before the stage's own post-processing; a worker never commits."""

    def __init__(self, cache: StageCache, per: int, shards: list[int]):
        self.cache, self.per, self.shards = cache, per, shards

    def before(self, step: Step, compute: Callable[[Partial], Any]) -> None:
        if step.stage not in SHARDED:
            raise RuntimeError(f"shards: {step.stage} is not a sharded stage")
        if not self.cache.valid(step.stage, step.key):  # committed meanwhile (a re-submitted driver): nothing to do
            partial = self.cache.partial(step.stage, step.key)
            partial.only = frozenset(c for s in self.shards for c in range(s * self.per, (s + 1) * self.per))
            try:
                compute(partial)
            except ChunksDone:
                pass
        raise ShardsDone()


class Driver:
    """The job's hook in `Runner.stage` for a sharded stage: find the missing shards (the stage's own compute on a
    probing partial, which stops before any model call), hand them to workers, wait with progress, and return
    when every shard is saved, so the stage's compute then only merges and commits."""

    def __init__(self, job: Job, cache: StageCache, release: Callable[[], None], poll_s: float | None = None):
        self.job, self.cache, self.release = job, cache, release
        self.poll_s = poll_s if poll_s is not None else (2.0 if job.pipeline.executor == "local" else 30.0)

    def before(self, step: Step, compute: Callable[[Partial], Any]) -> None:
        if step.stage not in SHARDED or self.cache.valid(step.stage, step.key):
            return
        name, pipe = f"{step.stage}[iter {step.iteration}]", self.job.pipeline
        per = pipe.chunks_per_shard(step.spec)
        plan = self._probe(step, compute)
        if plan is None:  # no chunked work (a benchmark without items): the stage computes it in this process
            return
        todo = missing_shards(plan, per)
        total = shard_count(plan, per)
        if not todo:
            return
        log.info("%s: %d item(s) in %d shard(s) of %d chunk(s); %d to compute by pipeline.executor=%s pipeline.workers=%d",
                 name, plan.items, total, per, len(todo), pipe.executor, pipe.workers)
        self.release()  # the driver holds no model (no GPU memory) while workers run
        folder = self.job.cache_dir / ".jobs" / f"{step.stage}-{step.key}"
        jobs = submit(self.job, step, todo, folder)
        self._wait(name, step, jobs, per, total, todo)
        plan = self._probe(step, compute)
        left = missing_shards(plan, per) if plan is not None else []
        if left:
            reasons = sorted({_why(j) for j in jobs} - {None})
            raise ShardsFailed(f"{name}: {len(left)} of {total} shard(s) not computed (shards {_ranges(left)}); "
                               f"workers said: {'; '.join(reasons) or 'nothing'} (logs: {folder}); the stage is not committed, "
                               f"a rerun computes only those shards")

    def _probe(self, step: Step, compute: Callable[[Partial], Any]) -> ChunkPlan | None:
        partial = self.cache.partial(step.stage, step.key)
        partial.probe = True
        try:
            compute(partial)
        except ChunkPlan as plan:
            return plan
        return None

    def _wait(self, name: str, step: Step, jobs: list, per: int, total: int, todo: list[int]) -> None:
        """Until every worker has ended, a line whenever the count of finished shards changes (done / total, ETA
        from this session's rate); files are counted, not read: the final check verifies them."""
        t0, last, partial = time.time(), -1, self.cache.partial(step.stage, step.key)
        while True:
            ended = all(j.done() for j in jobs)
            saved = partial.saved_indices()
            done = sum(all(c in saved for c in range(s * per, (s + 1) * per)) for s in range(total))
            if done != last or ended:
                new = done - (total - len(todo))
                eta = (time.time() - t0) / new * (total - done) if new > 0 else None
                log.info("%s: shards %d/%d done%s", name, done, total,
                         f", ETA {_duration(eta)}" if eta is not None and done < total else "")
                last = done
            if ended:
                return
            time.sleep(self.poll_s)


def _why(job) -> str | None:
    """A failed worker's reason, one line (None for a worker that ended well)."""
    if not job.paths.result_pickle.exists():  # killed, or a lost node: submitit would wait for it (15 s or more)
        return f"{job.job_id}: ended without a result (state {job.state}; killed, out of memory, or a lost node)"
    try:
        exc = job.exception()
    except Exception as e:  # noqa: BLE001 - a task that left no result at all (killed, lost node)
        exc = e
    if exc is None:
        return None
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{job.job_id}: {(lines[-1] if lines else type(exc).__name__)[:200]}"


def _ranges(xs: list[int]) -> str:
    return ", ".join(str(x) for x in xs[:10]) + (f" and {len(xs) - 10} more" if len(xs) > 10 else "")


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


def task_resources(job: Job, step: Step) -> dict[str, Any]:
    """SLURM parameters of one array task of `step` (submitit's SlurmExecutor names)."""
    cfg = job.pipeline.slurm
    gpus = gpus_of(step.spec) if on_gpu(step.spec) else 0
    params = {"job_name": f"ste-{step.stage}", "nodes": 1, "ntasks_per_node": 1, "time": cfg.timeout_min,
              "cpus_per_task": max(8, cfg.cpus_per_gpu * gpus), "mem": f"{max(32, cfg.mem_gb_per_gpu * gpus)}GB",
              "array_parallelism": job.pipeline.workers,
              # a preempted or failed node puts the task back in the queue; its saved chunks make the resume
              "additional_parameters": {"requeue": True}}
    if gpus:
        params["gpus_per_node"] = gpus
    params.update({k: v for k, v in (("partition", cfg.partition), ("account", cfg.account)) if v})
    return params


def submit(job: Job, step: Step, todo: list[int], folder: Path) -> list:
    """Start workers on the shards `todo`. slurm: one array, task i computing shard todo[i], at most `workers` at
    once; local: `workers` processes, worker w taking todo[w::workers] (each loads the model once)."""
    import submitit

    pipe = job.pipeline
    if pipe.executor == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=pipe.slurm.max_num_timeout)
        ex.update_parameters(**task_resources(job, step))
        return ex.map_array(ShardTask(), [job] * len(todo), [step] * len(todo), [[s] for s in todo])
    gpus = gpus_of(step.spec) if on_gpu(step.spec) else 0
    ex = submitit.LocalExecutor(folder=folder, max_num_timeout=0)
    jobs = []
    for w in range(min(pipe.workers, len(todo))):
        # each local worker gets GPUs of its own (worker w: GPUs w*g .. w*g+g-1); none for a CPU model
        ex.update_parameters(timeout_min=pipe.slurm.timeout_min, gpus_per_node=gpus,
                             visible_gpus=tuple(range(w * gpus, (w + 1) * gpus)))
        jobs.append(ex.submit(ShardTask(), job, step, todo[w :: pipe.workers]))
    return jobs


def work(job: Job, step: Step, shards: list[int]) -> list[int]:
    """A worker: compute `shards` of `step` into its partial directory with the stage's own code (no tracking, no
    commit). The step comes pickled from the driver's plan, so the worker computes exactly its key."""
    from src.runner import Runner
    from src.tracking import Tracker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    job = dataclasses.replace(job, tracking=dataclasses.replace(job.tracking, enabled=False),
                              pipeline=dataclasses.replace(job.pipeline, executor="local", workers=1))
    runner = Runner.for_job(job, Tracker(job.tracking, job.results_dir))
    runner.sharding = Worker(runner.cache, job.pipeline.chunks_per_shard(step.spec), shards)
    log.info("%s[iter %d]: worker computing shard(s) %s (key %s)", step.stage, step.iteration, _ranges(shards), step.key)
    try:
        runner.one(step)
    except ShardsDone:
        pass
    finally:
        runner.pool.close()
    return shards


try:  # submitit requeues a Checkpointable task after a time limit or a preemption with the same arguments
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - submitit is a dependency
    _Checkpointable = object  # type: ignore[assignment,misc]


class ShardTask(_Checkpointable):
    """What an array task (or a local worker) runs; requeued as is, it resumes from the chunks already saved."""

    def __call__(self, job: Job, step: Step, shards: list[int]) -> list[int]:
        return work(job, step, shards)

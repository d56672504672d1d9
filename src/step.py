"""The contract between the plan, the Runner and the stages.

- A `Step` is one stage of a plan with every decision made (src/plan.py makes them): key, typed config, model,
  weights, inputs, seed, chunk.
- A `Context` is what the Runner hands a stage while it computes: the partial output directory, the inputs it
  reads, its model (loaded on first use), and for training the launcher.
- A `Stage` is what a stage module declares to the Runner (`STAGES = {name: Stage(...)}` in each module of
  src/stages/): how to compute a step, what its cache meta records of its config, which of its stats are logged.

The Runner (src/runner.py) is one loop: `STAGES[step.stage].execute(step, context)` for every step, then the same
logging for each. It never looks at which stage it runs; a new stage is a module with a `STAGES` entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from src.cache import Partial, StageCache
from src.config import as_dict
from src.models.base import Generator, ModelSpec
from src.records import from_dict, to_dict


@dataclass
class Step:
    """One stage of the plan with everything that runs it: the Runner executes steps as planned and decides nothing.
    `inputs` names the outputs the stage reads as name -> (stage, key); `adapter` is the train key whose output the
    model wears (`adapter_dir`: a directory outside the cache, the standalone scorer's), `init` (train) the one
    training starts from; `previous` (benchmarks) is the same benchmark's key one iteration earlier, for verdict
    flips. `config` is the stage's own typed config, declared in its module (e.g. `judge.JudgeStep`)."""

    stage: str
    iteration: int
    key: str
    model: str  # what the log and the plan call the model: its name, + "+iter<k>" for the weights it wears
    config: Any = None
    spec: ModelSpec | None = None  # the model that runs it; None: no model (filter)
    adapter: str | None = None
    init: str | None = None
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)
    seed: int = 0  # its sampling / selection seed
    previous: str | None = None
    chunk: int = 0  # prompts per model call and saved chunk (pipeline.chunk_for its model); 0: no model
    meta_config: dict = field(default_factory=dict)  # what the cache's meta.json records of the config (its key's config part)
    status: str = "todo"  # cached | damaged (fails its check: moved aside and recomputed) | partial | todo
    adapter_dir: str | None = None


@dataclass
class Context:
    """What a stage may use while it computes a step; everything is read or loaded only when asked for, so a step
    whose chunks are all saved loads no model."""

    cache: StageCache
    partial: Partial
    data_root: str
    inputs: Callable[[], dict[str, Any]]  # the outputs the step names, as records (read once per call)
    model: Callable[[], Generator]  # the step's model wearing its weights, through the Runner's model pool
    train: Callable[..., dict] | None = None  # the launcher, generation engines closed first (the train stage)


def prefixed(prefix: str) -> Callable[[dict], dict]:
    """A stage's stats logged under `prefix` (e.g. judge/kept)."""
    return lambda stats: {f"{prefix}{k}": v for k, v in stats.items()}


@dataclass(frozen=True)
class Stage:
    """What a stage module declares to the Runner.

    `execute(step, context) -> (rows or None, stats)`; None for a stage another computes (classify: by select as it
    scans the pool). `config_part(config)`: what the cache meta records of the step's config. `logged(stats)`: the
    metrics it logs at step = iteration (numbers only are kept). `read(cache, key, reader)`: its output as a later
    step (`reader`) sees it (None: no stage reads it). `benchmark`: an evaluation, whose stats the job returns
    and whose verdict drift is logged. `weights`: it produces trained weights (logged as provenance). `input`: the
    run's inputs are its rows at iteration 0, logged as an MLflow dataset in this context ("training" or
    "evaluation"), from where `source(step, cache, data_root)` says."""

    execute: Callable[[Step, Context], tuple[list[dict] | None, dict]] | None
    config_part: Callable[[Any], dict] = as_dict
    logged: Callable[[dict], dict] = prefixed("")
    read: Callable[[StageCache, str, Step], Any] | None = None
    benchmark: bool = False
    weights: bool = False
    input: str | None = None
    source: Callable[[Step, StageCache, str], str] | None = None


def records(stage: str, record_type: type) -> Callable[[StageCache, str, Step], list]:
    """A reader of `stage`'s rows as `record_type` records."""
    return lambda cache, key, reader: [from_dict(record_type, r) for r in cache.rows(stage, key)]


def as_rows(result: tuple[list, dict]) -> tuple[list[dict], dict]:
    """(records, stats) -> (rows, stats): what `execute` returns for the cache."""
    records_, stats = result
    return [to_dict(r) for r in records_], stats

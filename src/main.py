"""Entry point:  python -m src.main [overrides]   /   python -m src.main -m seed=mixtral,llama

Composes conf/ with Hydra and runs one self-taught-evaluator job per config (see src/pipeline.py).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

# Source checkout / editable install: the top-level conf/. Wheel install: the copy packaged as src/conf.
_HERE = Path(__file__).resolve().parent
CONF_DIR = str(_HERE / "conf" if (_HERE / "conf" / "config.yaml").exists() else _HERE.parent / "conf")
log = logging.getLogger("src.main")


class JobError(CompactHydraException):
    """An expected failure: Hydra prints its message alone (no traceback) and exits with status 1."""


def _expected() -> tuple[type[BaseException], ...]:
    from .cache import CacheError
    from .config import ConfigError
    from .data import DataError
    from .pipeline import NotRunnableHere

    return ConfigError, DataError, CacheError, NotRunnableHere


def job_context() -> tuple[dict[str, str], tuple[str, str] | None, str | None]:
    """(group choices, (sweep id, sweep name) when in a multirun, run name) from Hydra's runtime config."""
    hc = HydraConfig.get()
    order = ["seed", "judge", "dataset", "negatives", "judging", "filter", "train", "eval", "tracking", "pipeline"]
    raw = {k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra") and v is not None and k != "local"}
    choices = {k: raw[k] for k in sorted(raw, key=lambda k: (order.index(k) if k in order else len(order), k))}
    sweep = None
    if hc.mode == RunMode.MULTIRUN:
        sweep_dir = str(Path(hc.sweep.dir).resolve())
        # Name: the sweeps/ preset (if any) and the sweep's timestamp, e.g. filters-2026-11-27_22-10-00.
        stamp = f"{Path(hc.sweep.dir).parent.name}_{Path(hc.sweep.dir).name}"
        sweep = (sweep_dir, f"{hc.runtime.choices.get('sweeps') or 'sweep'}-{stamp}")
    # Run name: the group choices that differ from the defaults plus the sweep's own overrides, kept short.
    overrides = [o for o in hc.overrides.task if "=" in o and not o.startswith(("pipeline.", "tracking.", "data_root", "results_dir"))]
    name = " ".join(o for o in overrides if "." not in o.split("=")[0]) or "default"
    return choices, sweep, name[:200]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from .pipeline import run_job  # heavy imports after Hydra parsed the command line, so --help is fast

    choices, sweep, run_name = job_context()
    try:
        result = run_job(cfg, choices, sweep, run_name)
    except _expected() as e:
        # Bad config, bad data, a damaged cache the user must act on, no GPU: one line, no traceback.
        raise JobError(f"job {run_name!r} failed: {e}") from None
    except Exception as e:
        # Unexpected: one line of context here; Hydra prints the traceback (once) and sets the exit status.
        log.error("job failed: %s (%s: %s)", run_name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        raise
    for k, v in sorted(result.items()):
        if k.startswith("synthetic/accuracy"):
            log.info("%s = %.3f", k, v)


if __name__ == "__main__":
    sys.exit(main())

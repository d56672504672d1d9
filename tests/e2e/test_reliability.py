"""No silent wrong result: judgments independent of chunking, damaged cache outputs healed, a missing adapter
retrained, a shared MLflow store kept consistent. (Config and data errors: tests/unit/test_config_errors.py.)"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from src.cache import StageCache
from src.records import Pair
from src.stages import judge
from src.judging import JudgingConfig
from tests.conftest import TINY, tiny_generator


tiny = tiny_generator(batch_size=4)


PAIRS = [Pair(f"p{i}", f"Question {i}: why {'so ' * i}?", f"Because {i}.", f"Unrelated {i}.", f"Question {i}: how?", "train")
         for i in range(7)]


def _judgments(tiny, tmp_path, chunk_size, key, verdict="parse"):
    cfg = JudgingConfig(n=2, max_new_tokens=6, temperature=1.0, verdict=verdict)
    out, _ = judge.run(cfg, PAIRS, tiny, seed=5, partial=StageCache(tmp_path).partial("judge", key), chunk_size=chunk_size)
    return [(j.pair_id, j.order, j.sample, j.text, j.verdict) for j in out]


@pytest.mark.parametrize("verdict", ["parse", "constrained"])
def test_judgments_do_not_depend_on_chunk_size(tiny, tmp_path, verdict):
    a = _judgments(tiny, tmp_path, 3, "c3", verdict)
    b = _judgments(tiny, tmp_path, 16, "c16", verdict)
    assert len(a) == 7 * 2 * 2
    assert len({t for *_, t, _ in a}) > 3  # really sampled, not one constant text
    assert a == b


# ------------------------------------------------------------------ cached outputs are verified on read
def _committed(tmp_path, rows=3):
    cache = StageCache(tmp_path / "cache")
    cache.compute_once("judge", "k", lambda p: ([{"i": i} for i in range(rows)], {"n": rows}), {})
    return cache, cache.path("judge", "k")


def _recomputes(cache, calls):
    return not cache.compute_once("judge", "k", lambda p: (calls.append(1) or [{"i": i} for i in range(3)], {"n": 3}), {})


def test_data_cut_at_a_line_boundary_is_quarantined_and_recomputed(tmp_path, caplog):
    cache, path = _committed(tmp_path)
    lines = (path / "data.jsonl").read_text().splitlines(keepends=True)
    (path / "data.jsonl").write_text("".join(lines[:2]))  # a whole line gone: still valid JSON lines
    fresh = StageCache(tmp_path / "cache")  # a new process: nothing verified yet
    calls = []
    assert _recomputes(fresh, calls) and calls == [1]
    assert len(fresh.rows("judge", "k")) == 3
    (aside,) = [p for p in (tmp_path / "cache" / "judge").iterdir() if ".bad-" in p.name]
    assert str(path / "data.jsonl") in caplog.text and aside.name in caplog.text


@pytest.mark.parametrize("damage", ["delete meta", "garble meta", "garble data", "delete data", "extra file"])
def test_damaged_final_directory_heals_instead_of_crash_looping(tmp_path, damage, caplog):
    cache, path = _committed(tmp_path)
    if damage == "delete meta":
        (path / "meta.json").unlink()
    elif damage == "garble meta":
        (path / "meta.json").write_text('{"stage": "judge", "fi')
    elif damage == "garble data":
        data = (path / "data.jsonl").read_bytes()
        (path / "data.jsonl").write_bytes(data[:5] + b"\xff" + data[6:])
    elif damage == "delete data":
        (path / "data.jsonl").unlink()
    else:
        (path / "stray.bin").write_bytes(b"x")
    for _ in range(2):  # twice: the second run must find the healed output, not loop
        fresh = StageCache(tmp_path / "cache")
        calls = []
        fresh.compute_once("judge", "k", lambda p: (calls.append(1) or [{"i": i} for i in range(3)], {"n": 3}), {})
        assert fresh.rows("judge", "k") == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert "meta.json" in caplog.text or "data.jsonl" in caplog.text or "stray.bin" in caplog.text


def test_unreadable_cache_rows_name_the_file(tmp_path):
    from src.cache import CacheError, read_jsonl_rows

    f = tmp_path / "data.jsonl"
    f.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(CacheError, match=r"data\.jsonl:2"):
        read_jsonl_rows(f)
    cache, path = _committed(tmp_path)
    (path / "meta.json").write_text("{nope")
    with pytest.raises(CacheError, match=r"meta\.json"):
        cache.meta("judge", "k")


# ------------------------------------------------------------------ a missing adapter is never the base model
def _run(job):
    from src.runner import Runner
    from src.plan import plan
    from src.tracking import Tracker

    runner = Runner.for_job(job, Tracker(job.tracking, job.results_dir))
    try:
        runner.run(plan(job))
    finally:
        runner.pool.close()
    return runner


def test_deleted_adapter_is_detected_and_retrained(make_cfg, caplog):
    from src.job import Job

    job = Job.from_config(make_cfg(*TINY, "eval.rewardbench.enabled=false"))
    _run(job)
    (train_dir,) = [p for p in (job.cache_dir / "train").iterdir() if p.is_dir()]
    meta = json.loads((train_dir / "meta.json").read_text())
    assert meta["stats"]["produced"] == "adapter"
    weights = sorted((train_dir / "adapter").iterdir())
    before = {p.name: p.read_bytes() for p in weights}
    shutil.rmtree(train_dir / "adapter")
    # The repro: change an evaluation key so the iteration-1 evaluation runs with the (missing) adapter.
    job2 = Job.from_config(make_cfg(*TINY, "eval.rewardbench.enabled=false", "eval.mtbench.max_keys=2"))
    runner = _run(job2)
    assert runner.hits["train_1"] == 0  # detected and retrained, not silently the base model
    assert {p.name: p.read_bytes() for p in sorted((train_dir / "adapter").iterdir())} == before  # deterministic
    assert f"{train_dir}/adapter" in caplog.text and "moved aside" in caplog.text


def test_no_training_data_is_recorded_and_a_recorded_adapter_must_exist(make_cfg, tmp_path):
    from src.cache import CacheError
    from src.job import Job
    from src.runner import Runner
    from src.tracking import Tracker

    job = Job.from_config(make_cfg(*TINY))
    runner = Runner.for_job(job, Tracker(job.tracking, job.results_dir))
    runner.cache.compute_once("train", "none", lambda p: (None, {"trained": False, "produced": "none"}), {})
    assert runner._adapter("none") is None  # explicitly recorded: the untrained model
    runner.cache.compute_once("train", "bad", lambda p: (None, {"trained": True, "produced": "adapter"}), {})
    with pytest.raises(CacheError, match=r"train/bad/adapter"):
        runner._adapter("bad")  # meta says adapter, there is none: an error, not the base model


# ------------------------------------------------------------------ a shared MLflow store
def _job_on_fresh_store(results, start_at, sweep):
    """One process: wait for the common start time, then do what a job's tracker does."""
    import time

    from src.tracking import Tracker, TrackingConfig

    time.sleep(max(0.0, start_at - time.time()))
    t = Tracker(TrackingConfig(), results)
    t.start(f"job-{os.getpid()}", {"p": 1}, {}, sweep)
    t.metrics({"m": 1.0}, 0)
    t.end("FINISHED")


def _concurrently(n, results, sweep=None):
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 8  # after every interpreter has imported mlflow
    procs = [ctx.Process(target=_job_on_fresh_store, args=(results, start_at, sweep)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return [p.exitcode for p in procs]


def _client(results):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{results / 'mlflow.db'}")


def test_parallel_jobs_on_a_fresh_store_share_one_schema_and_one_sweep_parent(tmp_path):
    results = tmp_path / "results"
    assert _concurrently(3, results, (str(tmp_path / "sweep"), "sweep-x")) == [0, 0, 0]
    client = _client(results)
    exp = client.get_experiment_by_name("ste")
    jobs = client.search_runs([exp.experiment_id], "tags.`ste.kind` = 'job'")
    parents = client.search_runs([exp.experiment_id], "tags.`ste.kind` = 'sweep'")
    assert len(jobs) == 3 and {r.info.status for r in jobs} == {"FINISHED"}
    assert len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parents[0].info.run_id}


def test_runs_left_running_by_a_dead_process_are_ended_as_killed(tmp_path):
    import subprocess
    import sys

    import mlflow

    from src.tracking import Tracker, TrackingConfig, ensure_experiment, process_id

    results = tmp_path / "results"
    cfg = TrackingConfig()
    exp = ensure_experiment(cfg, results)
    dead = subprocess.run([sys.executable, "-c", "from src.tracking import process_id; print(process_id())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    client = _client(results)
    stale = client.create_run(exp, tags={"ste.kind": "job", "ste.proc": dead})
    child = client.create_run(exp, tags={"ste.kind": "train", "mlflow.parentRunId": stale.info.run_id})
    alive = client.create_run(exp, tags={"ste.kind": "job", "ste.proc": process_id()})  # this very process
    t = Tracker(cfg, results)
    t.start("next job", {}, {}, None)
    t.end("FINISHED")
    status = lambda r: client.get_run(r.info.run_id).info.status  # noqa: E731
    assert status(stale) == "KILLED" and status(child) == "KILLED"
    assert status(alive) == "RUNNING"
    mlflow.set_tracking_uri(None)

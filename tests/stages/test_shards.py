"""Generation stages over workers (src/shards.py): the tiny model's generate and judge stages computed by 3 local
submitit workers give the bytes one in-process run gives, under the same keys; a worker SIGKILLed mid-shard leaves
the stage uncommitted and the rerun computes only that shard; the SLURM path with a fake sbatch/sacct on PATH; two
committers of one key."""
from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from tests.conftest import TINY

# Chunks of 1 prompt, shards of 2 chunks: enough shards for 3 workers from the tiny config's handful of items.
SHARDED = [*TINY, "pipeline.chunk_size=1", "pipeline.shard_size=2"]
STAGES = ("decontam", "select", "generate", "judge")


def run_stages(cfg, poll_s: float = 0.5):
    """decontam, select, generate and judge(iteration 1) of the job, through the Runner as src/job.py drives it."""
    from src import shards
    from src.job import Job
    from src.plan import plan
    from src.runner import Runner
    from src.tracking import Tracker

    job = Job.from_config(cfg)
    steps = [s for s in plan(job) if s.stage in STAGES and s.iteration <= 1]
    runner = Runner.for_job(job, Tracker(job.tracking, job.results_dir))
    if job.pipeline.sharded:
        runner.sharding = shards.Driver(job, runner.cache, runner.pool.close, poll_s=poll_s)
    try:
        runner.run(steps)
    finally:
        runner.pool.close()
    return job, {s.stage: s.key for s in steps}


def output(job, stage: str, key: str) -> tuple[bytes, dict, dict]:
    """(data.jsonl bytes, the manifest of every file, the stats) of a committed output."""
    path = job.cache_dir / stage / key
    meta = json.loads((path / "meta.json").read_text())
    return (path / "data.jsonl").read_bytes(), meta["files"], meta["stats"]


def test_three_workers_and_a_killed_one_give_the_in_process_bytes(make_cfg, tmp_path, monkeypatch, caplog):
    from src.runner import ModelPool
    from src.shards import ShardsFailed

    one, keys = run_stages(make_cfg(*SHARDED, "pipeline.workers=1", results=tmp_path / "one"))

    # 3 workers; the driver must never load a model (its stages' chunks are all the workers').
    def no_model(*a, **k):
        raise AssertionError("the driver loaded a model")

    monkeypatch.setattr(ModelPool, "get", no_model)
    judged = {(r["pair_id"], r["order"]) for r in map(json.loads, output(one, "judge", keys["judge"])[0].splitlines())}
    assert len(judged) >= 4, "the test needs at least 2 judge shards"
    # SIGKILL in whichever worker saves judge chunk 2: the first chunk of shard 1, so that shard is cut mid-way.
    monkeypatch.setenv("STE_FAULT_KILL", "judge:chunk2")
    cfg = make_cfg(*SHARDED, "pipeline.executor=local", "pipeline.workers=3", results=tmp_path / "three")
    with pytest.raises(ShardsFailed, match=r"judge\[iter 1\]: 1 of \d+ shard\(s\) not computed \(shards 1\)"):
        run_stages(cfg)
    from src.job import Job

    job = Job.from_config(cfg)
    assert (job.cache_dir / "generate" / keys["generate"] / "meta.json").exists()  # generate: 3 unbroken workers
    assert not (job.cache_dir / "judge" / keys["judge"]).exists()  # not committed
    partial = job.cache_dir / "judge" / f"{keys['judge']}.partial" / "chunks"
    saved = sorted(int(p.name[:6]) for p in partial.glob("*.jsonl"))
    assert 2 in saved and 3 not in saved

    # The rerun computes only shard 1 (its chunk 2 reused) and commits.
    monkeypatch.delenv("STE_FAULT_KILL")
    caplog.set_level(logging.INFO, logger="src.shards")
    three, keys3 = run_stages(cfg)
    assert keys3 == keys  # the worker count is in no key
    assert any("; 1 to compute by pipeline.executor=local pipeline.workers=3" in r.getMessage()
               for r in caplog.records if r.getMessage().startswith("judge[iter 1]"))
    logs = "".join(p.read_text() for p in (job.cache_dir / ".jobs").glob(f"judge-{keys['judge']}/*_log.err"))
    assert "worker computing shard(s) 1 " in logs

    for stage in ("generate", "judge"):
        assert output(three, stage, keys[stage]) == output(one, stage, keys[stage]), stage


def test_fake_slurm_array_has_the_size_parallelism_resources_and_requeue(make_cfg, tmp_path, monkeypatch):
    """submitit's SlurmExecutor against a fake sbatch/sacct/squeue/scontrol: the array it submits, the script it
    writes, and the driver's one line when the array ends with shards missing (the fake cluster computes nothing)."""
    from src import shards
    from src.job import Job
    from src.plan import plan
    from src.runner import Runner
    from src.tracking import Tracker

    bin_dir, record = tmp_path / "bin", tmp_path / "sbatch_calls"
    bin_dir.mkdir()
    scripts = {
        "sbatch": f'cp "${{@: -1}}" "{record}.$$" && echo "$@" >> "{record}" && echo "Submitted batch job 4242"',
        # every task of the array ended (COMPLETED) without a result: what a cluster that ran nothing reports
        "sacct": 'echo "JobID|State|NodeList"; for i in $(seq 0 63); do echo "4242_$i|COMPLETED|node1"; done',
        "squeue": "exit 0",
        "scontrol": "exit 0",
        "srun": "exit 0",  # submitit looks for it to tell it is on a cluster
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    cfg = make_cfg(*SHARDED, "++seed.min_gpus=2", "pipeline.executor=slurm", "pipeline.workers=2",
                   "pipeline.slurm.partition=gpu", "pipeline.slurm.account=lab", "pipeline.slurm.timeout_min=90")
    job = Job.from_config(cfg)
    steps = [s for s in plan(job) if s.stage in ("decontam", "select", "generate")]
    runner = Runner.for_job(job, Tracker(job.tracking, job.results_dir))
    runner.sharding = shards.Driver(job, runner.cache, runner.pool.close, poll_s=0.1)
    with pytest.raises(shards.ShardsFailed, match=r"generate\[iter 0\]: 3 of 3 shard\(s\) not computed \(shards 0, 1, 2\)"):
        runner.run(steps)
    (script,) = [p.read_text() for p in tmp_path.glob("sbatch_calls.*")]
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=24", "#SBATCH --mem=240GB",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=90", "#SBATCH --requeue",
                 "#SBATCH --signal=USR2@90", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --job-name=ste-generate"):
        assert line in script.splitlines(), (line, script)
    assert "submitit.core._submit" in script
    assert not (job.cache_dir / "generate" / next(s.key for s in steps if s.stage == "generate")).exists()


def test_a_second_committer_keeps_the_first_output(tmp_path, caplog):
    """Two drivers of one key (a re-submitted job on another node, where flock does not reach): the second finds
    the first's valid output, keeps it and discards its own; nothing is moved aside, nothing committed twice."""
    from src.cache import Partial, check

    final = tmp_path / "judge" / "k"
    a, b = Partial(final, "judge"), Partial(final, "judge")
    for p in (a, b):
        p.save(0, [{"x": 1}])
    a.commit([{"x": 1}], {"stats": {"who": "a"}})
    b = Partial(final, "judge")  # the second driver's partial directory, recreated after the first commit
    b.save(0, [{"x": 1}])
    b.commit([{"x": 1}], {"stats": {"who": "b"}})
    assert check(final) is None
    assert json.loads((final / "meta.json").read_text())["stats"] == {"who": "a"}
    assert not list(tmp_path.glob("judge/*.bad-*")) and not final.with_name("k.partial").exists()

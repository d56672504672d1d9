"""Shards as pure arithmetic (src/shards.py, src/costs/estimate.py): which shards are missing, the shard size's
check, and the dry run's budget, whose GPU-hours no worker count changes."""
from __future__ import annotations

import pytest

from conftest import TINY


def test_missing_shards_are_those_with_any_chunk_unsaved():
    from src.cache import ChunkPlan
    from src.shards import missing_shards, shard_count

    plan = ChunkPlan(total=7, saved={0, 1, 2, 4, 6}, items=70)
    assert shard_count(plan, 2) == 4 and missing_shards(plan, 2) == [1, 2]  # shard 3 is chunk 6 alone: saved
    assert missing_shards(plan, 1) == [3, 5]


def test_shard_size_must_hold_whole_chunks(make_cfg):
    from src.config import ConfigError
    from src.job import Job

    job = Job.from_config(make_cfg(*TINY, "pipeline.chunk_size=4", "pipeline.shard_size=10"))
    with pytest.raises(ConfigError, match=r"pipeline.shard_size=10: must be a multiple of the chunk of tiny_random \(4, pipeline.chunk_size\)"):
        job.pipeline.chunks_per_shard(job.seed)
    with pytest.raises(ConfigError, match=r"pipeline.executor='ray': use local or slurm"):
        Job.from_config(make_cfg(*TINY, "pipeline.executor=ray"))
    with pytest.raises(ConfigError, match=r"pipeline.workers=0: must be >= 1"):
        Job.from_config(make_cfg(*TINY, "pipeline.workers=0"))


def test_budget_gpu_hours_do_not_depend_on_workers_and_wall_clock_falls(make_cfg):
    from src.costs.estimate import shard_rows
    from src.job import Job

    base = ["+experiments=paper", "tracking=none", "pipeline.executor=slurm"]
    rows = {w: shard_rows(Job.from_config(make_cfg(*base, f"pipeline.workers={w}"))) for w in (1, 8)}
    assert [r["gpu_hours"] for r in rows[1]] == [r["gpu_hours"] for r in rows[8]]
    assert [r["shards"] for r in rows[1]] == [r["shards"] for r in rows[8]]
    judge1, judge8 = (next(r for r in rows[w] if r["stage"] == "judge (iter 1)") for w in (1, 8))
    assert judge8["wall_hours"] == pytest.approx(judge1["wall_hours"] * 5 / judge1["shards"])  # 38 shards: 5 waves of 8

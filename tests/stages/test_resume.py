"""A run killed mid-stage resumes from its saved chunks; a run killed between stages recomputes nothing done."""
import pytest

from src.cache import StageCache
from src.job import Job
from src.runner import Runner
from src.plan import plan
from src.records import Pair
from src.stages import judge
from src.judging import JudgingConfig
from src.tracking import Tracker
from tests.conftest import TINY, tiny_generator


class Crash(Exception):
    pass


class Counting:
    """Wraps a generator: counts prompts generated for, and crashes after `crash_after` generate calls."""

    def __init__(self, inner, crash_after=None):
        self.inner, self.crash_after, self.calls, self.prompts = inner, crash_after, 0, 0
        self.spec = inner.spec

    def generate(self, prompts, sampling):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise Crash("simulated kill")
        self.calls += 1
        self.prompts += len(prompts)
        return self.inner.generate(prompts, sampling)

    def choose(self, prompts, prefixes, options):
        return self.inner.choose(prompts, prefixes, options)

    def count_tokens(self, prompts):
        return self.inner.count_tokens(prompts)

    def close(self):
        pass


tiny = tiny_generator(batch_size=4)


PAIRS = [Pair(f"p{i}", f"Question {i}: why?", f"Because {i}.", f"Unrelated {i}.", f"Question {i}: how?", "train") for i in range(6)]


def test_judge_stage_resumes_after_a_kill_and_matches_an_unbroken_run(tiny, tmp_path):
    cfg = JudgingConfig(n=2, max_new_tokens=6)
    cache = StageCache(tmp_path)
    # Unbroken reference run.
    ref, _ = judge.run(cfg, PAIRS, Counting(tiny), seed=7, partial=cache.partial("judge", "ref"), chunk_size=4)
    # Killed after the first chunk (4 of 12 prompts), then resumed.
    with pytest.raises(Crash):
        judge.run(cfg, PAIRS, Counting(tiny, crash_after=1), seed=7, partial=cache.partial("judge", "k"), chunk_size=4)
    assert len(cache.partial("judge", "k").done()) == 4 * 2  # one chunk of 4 prompts x n=2 saved
    resumed_model = Counting(tiny)
    out, _ = judge.run(cfg, PAIRS, resumed_model, seed=7, partial=cache.partial("judge", "k"), chunk_size=4)
    assert resumed_model.prompts == 12 - 4  # only what was not saved
    assert [(j.pair_id, j.order, j.sample, j.text, j.verdict) for j in out] == [
        (j.pair_id, j.order, j.sample, j.text, j.verdict) for j in ref
    ]


def test_a_chunk_cut_by_a_kill_is_not_there(tmp_path):
    """A kill mid-write leaves only a temporary file: the chunk is not saved, the next attempt computes it."""
    p = StageCache(tmp_path).partial("judge", "x")
    p.save(0, [{"a": 1}, {"a": 2}])
    (p.chunk_dir / ".000001-0123456789abcdef.jsonl.host-1.tmp").write_text('{"a": 3, "trunc')
    assert p.done() == [{"a": 1}, {"a": 2}] and list(p.saved()) == [0]
    p.save(1, [{"a": 3}])
    assert p.done() == [{"a": 1}, {"a": 2}, {"a": 3}]


@pytest.mark.parametrize("edit", [('"tokens": ', '"tokens": 9'), ('"verdict": "', '"verdict": "C')])
def test_an_edited_saved_chunk_is_recomputed_not_merged(tiny, tmp_path, caplog, edit):
    """Issue 21: a value edited in a saved chunk was merged into the committed output under a fresh manifest (a
    token count), or failed every rerun naming no file (an invalid verdict). Each chunk's name carries its SHA-256:
    the edited one is moved aside with a warning naming it and computed again; the result is the unbroken run's."""
    import re

    cfg = JudgingConfig(n=2, max_new_tokens=6)
    cache = StageCache(tmp_path)
    ref, _ = judge.run(cfg, PAIRS, tiny, seed=7, partial=cache.partial("judge", "ref"), chunk_size=4)
    with pytest.raises(Crash):
        judge.run(cfg, PAIRS, Counting(tiny, crash_after=2), seed=7, partial=cache.partial("judge", "k"), chunk_size=4)
    partial = cache.partial("judge", "k")
    first, second = sorted(partial.chunk_dir.glob("*.jsonl"))
    text = second.read_text()
    key, new = edit
    edited = re.sub(re.escape(key) + r'[^,"]*' if key.endswith(": ") else re.escape(key) + r"[AB]", new, text, count=1)
    assert edited != text
    second.write_text(edited)
    resumed = Counting(tiny)
    with caplog.at_level("WARNING"):
        out, _ = judge.run(cfg, PAIRS, resumed, seed=7, partial=partial, chunk_size=4)
    assert resumed.prompts == 12 - 4  # the edited chunk and the one never saved; the intact first chunk reused
    assert str(second) in caplog.text and "damaged" in caplog.text
    assert [(j.pair_id, j.order, j.sample, j.text, j.verdict, j.tokens) for j in out] == [
        (j.pair_id, j.order, j.sample, j.text, j.verdict, j.tokens) for j in ref
    ]
    assert partial.problems() == []  # moved aside, not left to fail the next check


def test_pipeline_killed_in_training_reuses_finished_stages(make_cfg, monkeypatch):
    from src.stages import train

    job = Job.from_config(make_cfg(*TINY))
    real_train = train.run

    def killed(*a, **k):
        raise Crash("killed during training")

    monkeypatch.setattr(train, "run", killed)
    runner = Runner.for_job(job, Tracker(job.tracking, job.results_dir))
    with pytest.raises(Crash):
        runner.run(plan(job))
    runner.pool.close()
    status = {(s.stage, s.iteration): s.status for s in plan(job)}
    assert [status[s] for s in [("select", 0), ("generate", 0), ("synthetic", 0), ("judge", 1), ("filter", 1)]] == ["cached"] * 5
    assert status[("train", 1)] != "cached"

    monkeypatch.setattr(train, "run", real_train)
    runner = Runner.for_job(job, Tracker(job.tracking, job.results_dir))
    runner.run(plan(job))
    runner.pool.close()
    assert runner.hits == {"decontam_0": 1, "select_0": 1, "generate_0": 1, "synthetic_0": 1, "rewardbench_0": 1, "mtbench_0": 1,
                           "judge_1": 1, "filter_1": 1, "train_1": 0, "synthetic_1": 0, "rewardbench_1": 0, "mtbench_1": 0}


def test_chunks_saved_by_an_earlier_version_are_not_trusted(tmp_path, caplog):
    """Before chunks were verified, a stage appended them to one chunks.jsonl: such a file is set aside (its rows
    are computed again, with a warning) and not published with the output."""
    cache = StageCache(tmp_path)
    p = cache.partial("judge", "old")
    (p.dir / "chunks.jsonl").write_text('{"pair_id": "p0", "order": "chosen_first"}\n')
    with caplog.at_level("WARNING"):
        assert p.done() == []
    assert "without checksums" in caplog.text
    p.save(0, [{"a": 1}])
    final = p.commit([{"a": 1}], {"stage": "judge"})
    assert sorted(f.name for f in final.iterdir()) == ["data.jsonl", "meta.json"]

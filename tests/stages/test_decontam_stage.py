"""Decontamination and the held-out split as the loop runs them, on the real shared data (issue 8 §1).

The decontam stage finds exactly what an outside review counted (447 math-prm prompts in MATH, the HumanEval
problems that are hep-python prompts, 27 ShareGPT prompts identical to RewardBench rows), select drops them before
classification, the cache keys follow the setting and the benchmark files, and near-duplicate instructions never
straddle train and held-out. Each count is checked against an independent reading of the files.
"""
from __future__ import annotations

import itertools
import json
import re
import shutil

import pytest

from src.cache import StageCache
from src.rules.decontamination import near_duplicate_groups, normalise
from src.job import Job
from src.plan import plan
from src.stages import decontaminate, select
from src.stages.evaluate import decontam_benchmarks
from tests.conftest import DATA_ROOT, TINY, jsonl_rows, humaneval_by_docstring

MODELS = ["seed=tiny_random", "judge=tiny_random"]  # plans only: no model is loaded



@pytest.fixture(scope="module")
def rewardbench():
    return jsonl_rows(DATA_ROOT / "rewardbench/filtered.jsonl.gz")


@pytest.fixture
def job(make_cfg):
    return lambda *o: Job.from_config(make_cfg(*MODELS, *o))


def test_math_competition_drops_every_math_prm_prompt(job, rewardbench):
    j = job("dataset=math_competition")
    rows, stats = decontaminate.run(j.dataset, decontam_benchmarks(j.eval), j.data_root)
    math_prm = {str(r["id"]): normalise(r["prompt"]) for r in rewardbench if r["subset"] == "math-prm"}
    assert len(math_prm) == 447
    assert {r["benchmark_id"] for r in rows if r["how"] == "exact" and r["subset"] == "math-prm"} == set(math_prm)
    assert stats["exact"] == 447 and stats["rewardbench/math-prm"] == stats["rewardbench"] == stats["matched"] > 447
    assert stats["mtbench"] == 0 and stats["rows"] == 5000

    # independent of the stage: the pool select scans holds all 447 texts; decontaminated, none of them
    contaminated = {r["instruction_id"] for r in rows}
    texts = set(math_prm.values())
    kept, in_pool = select.scan_pool(j.dataset, j.data_root, j.random_seed, contaminated)
    full = select.scan_order(j.dataset, j.data_root, j.random_seed)
    assert sum(normalise(t) in texts for _, t, _ in full) == 447
    assert not any(normalise(t) in texts for _, t, _ in kept)
    assert len(full) - len(kept) == in_pool >= 447
    # dataset.decontaminate=false keeps them, and still counts them
    off = job("dataset=math_competition", "dataset.decontaminate=false")
    assert select.scan_pool(off.dataset, off.data_root, off.random_seed, contaminated) == (full, in_pool)


def test_code_prompts_drop_the_humaneval_problems_that_are_hep_python_prompts(job, rewardbench):
    j = job("dataset=code_prompts")
    rows, stats = decontaminate.run(j.dataset, decontam_benchmarks(j.eval), j.data_root)
    humaneval = jsonl_rows(DATA_ROOT / "code/HumanEval.jsonl.gz")
    by_docstring = humaneval_by_docstring(humaneval, rewardbench)
    assert len(by_docstring) == 159
    dropped = {r["instruction_id"] for r in rows if r["subset"] == "hep-python"}
    # the 159 and the 5 others (a helper before the task, or a task statement shorter than one 13-gram): all 164
    assert by_docstring <= dropped and len(dropped) == stats["rewardbench/hep-python"] == 164
    assert stats["signature_only"] == 3
    assert all(i.startswith("HumanEval/") for i in {r["instruction_id"] for r in rows})  # MBPP matches nothing
    kept, in_pool = select.scan_pool(j.dataset, j.data_root, j.random_seed, {r["instruction_id"] for r in rows})
    assert not {i for i, _, _ in kept} & dropped and in_pool > 0


def test_sharegpt_pool_prompts_identical_to_rewardbench_rows(job, rewardbench):
    j = job("dataset=code")  # the CPU default's pool
    rows, stats = decontaminate.run(j.dataset, decontam_benchmarks(j.eval), j.data_root)
    benchmark = {normalise(r["prompt"]) for r in rewardbench}
    pool = jsonl_rows(DATA_ROOT / "instructions/sharegpt_v3_first_turn_prompts.jsonl.gz")
    identical = {str(r["id"]) for r in pool if normalise(r["prompt"]) in benchmark}
    assert len(identical) == 27
    assert {r["instruction_id"] for r in rows if r["how"] == "exact"} == identical and stats["exact"] == 27
    assert stats["matched"] > 27  # near-copies (a typo fixed, a sentence added) share a 13-gram
    # every count is a metric name MLflow accepts, under decontam/<benchmark>/<subset>
    assert all(re.fullmatch(r"[A-Za-z0-9_\-./ ]+", k) for k in stats)
    assert any(k.startswith("rewardbench/llmbar-") for k in stats)


def test_mtbench_questions_both_turns_are_compared(job, tmp_path):
    """A pool holding an MT-Bench second turn (from the human-judgment file the run scores against) is caught."""
    q = jsonl_rows(DATA_ROOT / "mtbench/question.jsonl")
    pool = tmp_path / "pool.jsonl"
    rows = [{"id": "t1", "prompt": q[0]["turns"][0]}, {"id": "t2", "prompt": q[5]["turns"][1]},
            {"id": "clean", "prompt": "Name three rivers that flow through more than four countries, and say which is longest."}]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    j = job("dataset=reasoning", f"dataset.sources=[{{path: {pool}}}]")
    found, stats = decontaminate.run(j.dataset, decontam_benchmarks(j.eval), j.data_root)
    assert {(r["instruction_id"], r["benchmark_id"]) for r in found if r["benchmark"] == "mtbench"} == {
        ("t1", f"{q[0]['question_id']}/turn1"), ("t2", f"{q[5]['question_id']}/turn2")}
    assert stats["mtbench"] == 2 and stats["matched"] == 2  # (the first turn is also a RewardBench mt-bench-* prompt)
    j = job("dataset=reasoning", f"dataset.sources=[{{path: {pool}}}]", "eval.mtbench.enabled=false")
    assert "mtbench" not in decontaminate.run(j.dataset, decontam_benchmarks(j.eval), j.data_root)[1]  # only benchmarks the run evaluates on


def keys(job, *o):
    return {s.stage: s.key for s in plan(job(*TINY, *o)) if s.iteration == 0}


def test_keys_follow_the_setting_and_the_benchmark_files(job, tmp_path):
    on, off = keys(job), keys(job, "dataset.decontaminate=false")
    assert on["decontam"] == off["decontam"]  # the matches do not depend on whether they are dropped
    assert on["classify"] != off["classify"] and on["select"] != off["select"]
    assert keys(job, "eval.mtbench.enabled=false")["decontam"] != on["decontam"]

    root = tmp_path / "data"
    for rel in ["instructions/sharegpt_v3_first_turn_prompts.jsonl.gz", "rewardbench/filtered.jsonl.gz", "mtbench/human_judgments.jsonl.gz"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA_ROOT / rel, root / rel)
    a = keys(job, f"data_root={root}")
    assert a == on  # content, not paths
    rb = root / "rewardbench/filtered.jsonl.gz"
    rb.write_bytes(rb.read_bytes() + b"\n")  # the same rows, other bytes: another benchmark file
    b = keys(job, f"data_root={root}")
    assert all(a[s] != b[s] for s in ("decontam", "classify", "select", "generate"))
    # with decontamination off, the pool select reads does not depend on the benchmark files
    assert keys(job, f"data_root={root}", "dataset.decontaminate=false")["select"] == off["select"]


def test_select_drops_matches_before_classifying(job, tmp_path):
    """MATH (one label: no model needed) scanned 96 deep: with decontamination nothing kept is a RewardBench prompt;
    without it, the same scan keeps some."""
    base = ("dataset=math_competition", "dataset.limit=96", "dataset.max_scan=96")
    j = job(*base)
    rows, _ = decontaminate.run(j.dataset, decontam_benchmarks(j.eval), j.data_root)
    contaminated = {r["instruction_id"] for r in rows}
    cache = StageCache(tmp_path / "cache")
    out, stats = select.run(j.dataset, j.data_root, j.random_seed, lambda: None, select.cached_units(cache, "on", "-"), contaminated)
    assert len(out) == 96 and not {i.id for i in out} & contaminated
    assert stats["decontam_dropped"] == stats["contaminated"] >= 447
    off = job(*base, "dataset.decontaminate=false")
    out_off, stats_off = select.run(off.dataset, off.data_root, off.random_seed, lambda: None,
                                    select.cached_units(cache, "off", "-"), contaminated)
    assert {i.id for i in out_off} & contaminated and stats_off["decontam_dropped"] == 0
    # the reference solution travels with the instruction (the label-noise audit reads it)
    assert all(i.reference and "\\boxed" in i.reference for i in out)


# ------------------------------------------------------------------------------------------ held-out split
def test_near_duplicates_never_straddle_the_split_on_the_cpu_default_pool(job):
    """The CPU default's pool (ShareGPT first turns, 20-400 characters), 30% held out: drawn per instruction, about
    half of its two-member near-duplicate groups straddled the split (measured: 14 of 28, 44 of 120 pairs in all);
    drawn per group, none does."""
    j = job("dataset=code")
    d = j.dataset
    pool = [(i, t) for i, t, _ in select.load_pool(d, j.data_root)]
    groups = near_duplicate_groups(pool)
    members: dict[str, list[str]] = {}
    for i, g in groups.items():
        members.setdefault(g, []).append(i)
    pairs = [p for ms in members.values() if len(ms) > 1 for p in itertools.combinations(ms, 2)]
    assert len(pairs) > 20
    per_id = [a for a, b in pairs if select.split_of(a, d.heldout_fraction, j.random_seed) != select.split_of(b, d.heldout_fraction, j.random_seed)]
    assert len(per_id) > 0  # the rule select used before
    splits = select.assign_splits(pool, d.heldout_fraction, j.random_seed)
    assert all(splits[a] == splits[b] for a, b in pairs)
    share = sum(s == "heldout" for s in splits.values()) / len(splits)
    assert abs(share - d.heldout_fraction) < 0.03  # still the configured fraction


def test_select_splits_planted_near_duplicates_together(job, tmp_path):
    """Thirty distinct ShareGPT prompts, ten of them also present with a sentence appended (a near duplicate), half
    held out: select keeps all 40 and puts each pair on one side, for every seed tried (drawn per instruction, all
    ten pairs on one side would happen with probability 2^-10 per seed)."""
    sharegpt = jsonl_rows(DATA_ROOT / "instructions/sharegpt_v3_first_turn_prompts.jsonl.gz")[:400]
    base = [(str(r["id"]), r["prompt"].strip()) for r in sharegpt if 100 <= len(r["prompt"].strip()) <= 300]
    groups = near_duplicate_groups(base)
    distinct = [(i, t) for i, t in base if list(groups.values()).count(groups[i]) == 1][:30]
    assert len(distinct) == 30
    rows = [{"id": i, "prompt": t} for i, t in distinct] + [{"id": f"{i}+", "prompt": t + " Please keep it short."} for i, t in distinct[:10]]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for seed in range(3):
        j = job("dataset=reasoning", "dataset.categories=[reasoning]", f"dataset.sources=[{{path: {pool}}}]",
                "dataset.limit=40", "dataset.max_scan=40", "dataset.heldout_fraction=0.5", f"random_seed={seed}")
        out, _ = select.run(j.dataset, j.data_root, j.random_seed, lambda: None, select.cached_units(StageCache(tmp_path / f"c{seed}"), "k", "-"))
        split = {i.id: i.split for i in out}
        assert len(split) == 40
        assert all(split[i] == split[f"{i}+"] for i, _ in distinct[:10])
        assert 0 < sum(s == "heldout" for s in split.values()) < 40

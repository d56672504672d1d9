"""Whole stages fed to the vLLM engine in large calls (main env, no vllm needed), pairs independent of chunking, and
the dry run's GPU-hours estimate.

A recording stub stands in for the vLLM engine (vLLM does not run in the main env): it wraps the real tiny-model
generator and records every generate call; the pipeline picks the chunk from the job's model spec, as it would for
a real vLLM model. tests/stages/test_vllm_backend.py runs the real engine."""
import dataclasses

import pytest

from src.costs import estimate
from src.cache import StageCache
from src.costs.memory import SHAPES
from src.models import loading
from src.job import Job, run_job
from src.runner import Runner
from src.plan import plan
from src.records import Instruction
from src.stages import generate
from src.stages.generate import NegativesConfig
from src.tracking import Tracker
from tests.conftest import TINY, tiny_generator

REAL_LOAD, REAL_STAGE = loading.load_generator, Runner.stage
CHUNKED = ("generate", "judge", "synthetic", "mtbench")


def _run_recording(make_cfg, monkeypatch, *overrides):
    """Run a tiny loop; returns ({(stage, iteration): [prompts per generate call]}, the job's steps)."""
    calls: dict[tuple[str, int], list[int]] = {}
    current = {"stage": None}
    real_load, real_stage = REAL_LOAD, REAL_STAGE  # not the patched ones of an earlier call in the same test

    class RecordingEngine:
        def __init__(self, gen, spec):
            self.gen, self.spec = gen, spec

        def generate(self, prompts, sampling):
            calls.setdefault(current["stage"], []).append(len(prompts))
            return self.gen.generate(prompts, sampling)

        def __getattr__(self, attr):
            return getattr(self.gen, attr)

    def load(spec, adapter=None, cache_dir=None):  # the tiny model on the HF backend, under the vLLM spec
        return RecordingEngine(real_load(dataclasses.replace(spec, backend="hf"), adapter=adapter, cache_dir=cache_dir), spec)

    def stage(self, st, compute, *a, **k):
        current["stage"] = (st.stage, st.iteration)
        return real_stage(self, st, compute, *a, **k)

    monkeypatch.setattr(loading, "load_generator", load)
    monkeypatch.setattr(Runner, "stage", stage)
    job = Job.from_config(make_cfg(*TINY, "iterations=1", "eval.rewardbench.enabled=false", *overrides))
    steps = plan(job)
    Runner.for_job(job, Tracker(job.tracking, job.results_dir)).run(steps)
    return calls, steps


def test_vllm_takes_each_stage_in_one_call_per_step(make_cfg, monkeypatch):
    """pipeline.chunk_size=2 cuts every HF stage into calls of <= 2 prompts; with seed and judge on vLLM the same
    stages are one engine call per dependent step (generate: answer, x', answer to x'), whatever chunk_size says."""
    hf, _ = _run_recording(make_cfg, monkeypatch, "pipeline.chunk_size=2")
    assert all(max(n) <= 2 for (s, _), n in hf.items() if s in CHUNKED), hf
    vl, _ = _run_recording(make_cfg, monkeypatch, "pipeline.chunk_size=2", "seed.backend=vllm", "judge.backend=vllm",
                           "pipeline.vllm_chunk_size=1000")
    assert set(vl) == set(hf) and set(CHUNKED) <= {s for s, _ in vl}, vl
    assert len(vl[("generate", 0)]) == 3, vl  # the tiny model writes an x' for every instruction (TINY's settings)
    for (s, k), n in vl.items():  # the same prompts, one call per dependent step instead of one per chunk of 2
        if s in CHUNKED:
            assert sum(n) == sum(hf[(s, k)]) and len(n) < len(hf[(s, k)]), (s, k, n, hf[(s, k)])
            assert s == "generate" or len(n) == 1, (s, k, n)
    # a vLLM chunk smaller than a stage still cuts it (resume granularity), at its own size
    small, _ = _run_recording(make_cfg, monkeypatch, "seed.backend=vllm", "judge.backend=vllm", "pipeline.vllm_chunk_size=3")
    assert small[("mtbench", 0)] == small[("mtbench", 1)] == [3, 3, 2], small  # 4 keys x 2 orders


def test_keys_follow_the_chunk_of_the_backend_that_runs_the_stage(make_cfg):
    def keys(*o):
        return {(s.stage, s.iteration): s.key for s in plan(Job.from_config(make_cfg(*TINY, *o)))}

    hf = keys()
    assert keys("pipeline.vllm_chunk_size=7") == hf  # the HF keys do not see the vLLM chunk
    vl = ["seed.backend=vllm", "judge.backend=vllm"]
    base, other = keys(*vl), keys(*vl, "pipeline.vllm_chunk_size=7")
    changed = {k[0] for k in base if base[k] != other[k]}
    # generate and evaluate batch inside a chunk (their keys hold it); everything downstream of generate follows
    assert {"generate", "synthetic", "rewardbench", "mtbench"} <= changed and "classify" not in changed, changed
    assert keys(*vl, "pipeline.chunk_size=3") == base  # the HF chunk does not reach vLLM keys


tiny = tiny_generator(batch_size=8)


def test_sampled_pairs_do_not_depend_on_the_chunk(tiny, tmp_path):
    """With temperature > 0 every instruction's calls are seeded by its id: a pair is the same whether its chunk
    held 2 instructions (HF-sized) or all of them (vLLM-sized), and a different seed changes them."""
    many = [Instruction(f"s{k}", f"Why is the sky blue? Case {k}.", "test", "reasoning", "train") for k in range(5)]
    cfg = NegativesConfig(answer_max_new_tokens=6, modify_max_new_tokens=6, temperature=1.0, top_p=1.0)
    cache = StageCache(tmp_path)

    def pairs(chunk, key, seed=0):
        out, stats = generate.run(cfg, many, tiny, seed=seed, partial=cache.partial("generate", key), chunk_size=chunk)
        return [(p.id, p.chosen, p.rejected, p.modified) for p in out], stats

    small, s1 = pairs(2, "c2")
    whole, _ = pairs(len(many), "call")
    assert s1["pairs"] > 0 and small == whole
    assert pairs(len(many), "seed1", seed=1)[0] != whole


# ------------------------------------------------------------------ GPU-hours estimate
def test_gpu_hours_arithmetic():
    """2 FLOPs per parameter and token at 10% of an H100 in decode; training 8 per token (checkpointing) at 35%."""
    h = estimate.gpu_hours(estimate.Work(decode=1e9), 70e9)
    assert h == pytest.approx(2 * 70e9 * 1e9 / (989e12 * 0.10) / 3600)  # ~393 GPU-hours per billion 70B tokens
    assert estimate.gpu_hours(estimate.Work(train=1e9), 70e9) == pytest.approx(8 * 70e9 * 1e9 / (989e12 * 0.35) / 3600)
    lora = estimate.gpu_hours(estimate.Work(train=1e9), 70e9, full_finetune=False)
    assert lora == pytest.approx(estimate.gpu_hours(estimate.Work(train=1e9), 70e9) * 6 / 8)


def test_estimate_counts_follow_the_config(make_cfg):
    paper = ["+experiments=paper", "tracking=none"]
    base = estimate.estimate(Job.from_config(make_cfg(*paper)), False)
    twice_n = estimate.estimate(Job.from_config(make_cfg(*paper, "judging.n=30")), False)
    assert twice_n["judge (iteration 1)"]["gpu_hours"] > 1.9 * base["judge (iteration 1)"]["gpu_hours"]
    assert twice_n["train"] == base["train"] and twice_n["generate"] == base["generate"]
    # votes on the held-out pairs cost evaluation time, nothing else
    votes = estimate.estimate(Job.from_config(make_cfg(*paper, "eval.synthetic_maj_k=8")), False)
    assert votes["evaluate"]["gpu_hours"] > base["evaluate"]["gpu_hours"] and votes["judge (iteration 1)"] == base["judge (iteration 1)"]
    # an audit judge is one more stage, on its own model (here the paper's seed)
    audited = estimate.estimate(Job.from_config(make_cfg(*paper, "audit=judge", "model@audit.model=mixtral")), False)
    assert audited["audit judge"]["gpu_hours"] > 0 and {k: v for k, v in audited.items() if k != "audit judge"} == base
    # the paper's seed is a mixture of experts: a Mixtral token costs its 39B active parameters, not 141B
    llama = estimate.estimate(Job.from_config(make_cfg(*paper, "seed=llama")), False)
    ratio = base["generate"]["gpu_hours"] / llama["generate"]["gpu_hours"]
    assert ratio == pytest.approx(SHAPES["mistralai/Mixtral-8x22B-Instruct-v0.1"].active_b / 70.6, rel=1e-6)
    # 4 nodes x 8 GPUs train: wall-clock is GPU-hours / 32; generation on 8 GPUs (tensor parallel)
    assert base["train"]["wall_hours"] == pytest.approx(base["train"]["gpu_hours"] / 32)
    assert base["generate"]["wall_hours"] == pytest.approx(base["generate"]["gpu_hours"] / 8)
    upper = estimate.estimate(Job.from_config(make_cfg(*paper)), True)
    assert sum(v["gpu_hours"] for v in upper.values()) > 2 * sum(v["gpu_hours"] for v in base.values())
    assert estimate.estimate(Job.from_config(make_cfg(*TINY)), False) == {}  # CPU models: no GPU-hours


def test_dry_run_prints_the_gpu_hours(make_cfg, capsys):
    assert run_job(make_cfg("+experiments=gpu_small", "tracking=none", "pipeline.dry_run=true"), {}) == {}
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "gpu-hours" in x)
    assert "GPU-h" in line and "every generation at its max_new_tokens" in line, line
    run_job(make_cfg(*TINY, "pipeline.dry_run=true"), {})
    assert "gpu-hours: none (every stage runs on CPU)" in capsys.readouterr().out


def test_classify_estimate_counts_one_full_prefill_per_instruction_and_label():
    """select scores each scanned instruction (whole chunks of 20) and each content-free calibration input once per
    label, one row per (prompt, label); under prompt_logprobs vLLM reuses no prefix, so every row prefills the
    template, the label list, the instruction and the label. Hand count for the reasoning pool (8 labels)."""
    from omegaconf import OmegaConf

    from src.config import typed
    from src.pool import DatasetConfig
    from tests.conftest import CONF, REPO

    node = OmegaConf.to_container(OmegaConf.load(CONF / "dataset" / "reasoning.yaml"))
    d = typed(DatasetConfig, {**node, "max_scan": 30, "content_free": ["N/A", ""]}, "dataset")
    template = (REPO / "src" / "prompts" / "classify.txt").read_text()
    labels = ["reasoning", "code", "math", "writing", "persona", "extraction", "knowledge", "other"]
    assert d.categories == labels and d.max_chars == 400
    # chat overhead 20 + template + ", ".join(labels) + "Category: ", at 4 characters per token
    context = 20 + (len(template) + len(", ".join(labels)) + len("Category: ")) / 4
    label_tokens = sum(len(" " + c) for c in labels) / 4
    instr = 400 / 4  # min(250, max_chars / 4)
    scanned = 40  # max_scan 30 -> two whole chunks of 20
    expected = scanned * (8 * (context + instr) + label_tokens) + (8 * (context + 3 / 4) + label_tokens) + (8 * context + label_tokens)
    assert estimate.classify_work(d, instr).prefill == pytest.approx(expected)
    assert expected > 15 * d.max_scan * (instr + 100)  # the old count: one short prompt per instruction
    one_label = typed(DatasetConfig, {**node, "categories": ["reasoning"]}, "dataset")
    assert estimate.classify_work(one_label, instr).prefill == 0  # a one-label set needs no model
    anything = typed(DatasetConfig, {**node, "category": "any", "limit": 12, "max_scan": 1000}, "dataset")
    assert estimate.classify_work(anything, instr).prefill == pytest.approx(20 * (8 * (context + instr) + label_tokens))

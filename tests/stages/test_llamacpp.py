"""The llama.cpp CPU engine (src/models/llamacpp.py): its pure sampling rule, `backend: auto` with and without the
engine, and the engine itself against the HF reference on the same packaged model and the same judge prompts."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from src.models import base
from src.models.base import ModelSpec, SamplingConfig
from src.models.llamacpp import common_prefix, sample_token
from tests.conftest import DATA_ROOT

HAS_ENGINE = importlib.util.find_spec("llama_cpp") is not None
REWARDBENCH = DATA_ROOT / "rewardbench" / "filtered.jsonl.gz"


def hf_top_p_support(logits: np.ndarray, temperature: float, top_p: float) -> set[int]:
    """transformers' TopPLogitsWarper, transcribed: sort ascending, drop tokens whose cumulative mass <= 1-top_p,
    keep the most likely one."""
    import torch

    x = torch.tensor(logits, dtype=torch.float64) / temperature
    s, idx = torch.sort(x, descending=False)
    cum = s.softmax(-1).cumsum(-1)
    remove = cum <= (1 - top_p)
    remove[-1] = False
    return set(idx[~remove].tolist())


@pytest.mark.parametrize("top_p", [0.9, 0.5, 0.999])
def test_nucleus_is_transformers_rule_and_samples_follow_the_renormalised_distribution(top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=5000).astype(np.float32)
    support = hf_top_p_support(logits, 0.7, top_p)
    draws = [sample_token(logits, 0.7, top_p, np.random.default_rng([7, k])) for k in range(3000)]
    assert set(draws) <= support
    # the most frequent draws are the most probable tokens, in proportion (a sampler off by a rank fails this)
    p = np.exp((logits.astype(np.float64) - logits.max()) / 0.7)
    top = int(np.argmax(p))
    q = p[list(support)].sum()
    expected = p[top] / q
    assert abs(draws.count(top) / len(draws) - expected) < 4 * np.sqrt(expected * (1 - expected) / len(draws)) + 1e-3


def test_flat_distribution_takes_the_full_sort_and_greedy_is_argmax():
    logits = np.random.default_rng(2).normal(0, 0.01, size=4096).astype(np.float32)  # no ties: the rule is then exact
    logits[17] = 0.1  # the top 1,024 hold ~25 % of the mass: the nucleus needs the full vocabulary
    support = hf_top_p_support(logits, 1.0, 0.9)
    assert len(support) > 1024
    draws = {sample_token(logits, 1.0, 0.9, np.random.default_rng([1, k])) for k in range(400)}
    assert draws <= support and len([d for d in draws if d not in set(np.argsort(-logits)[:1024].tolist())]) > 0
    assert sample_token(logits, 0.0, 0.9, None) == 17


def test_sampling_is_a_function_of_the_seed_and_the_sample_index():
    logits = np.random.default_rng(3).normal(size=1000).astype(np.float32)
    a = [sample_token(logits, 0.7, 0.9, np.random.default_rng([5, j])) for j in range(20)]
    b = [sample_token(logits, 0.7, 0.9, np.random.default_rng([5, j])) for j in range(20)]
    c = [sample_token(logits, 0.7, 0.9, np.random.default_rng([6, j])) for j in range(20)]
    assert a == b and a != c


def test_common_prefix():
    assert common_prefix([1, 2, 3, 4], [1, 2, 3, 5]) == 3
    assert common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2], [3, 2]) == 0 and common_prefix([], [1]) == 0


def test_auto_backend_falls_back_to_hf_with_one_line_when_the_engine_is_missing(monkeypatch, caplog):
    """CI has the engine; its absence is simulated by hiding the module from find_spec (what a user without the
    [cpu] extra has). The HF fallback keys exactly as a spec that says backend hf."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    base._NOTED.clear()
    with caplog.at_level("INFO", logger="src.models.base"):
        spec = ModelSpec(name="smollm2_135m", source="packaged", package="smollm2_135m", backend="auto")
        ModelSpec(name="smollm2_135m", source="packaged", package="smollm2_135m", backend="auto")
    assert spec.backend == "hf"
    lines = [r.getMessage() for r in caplog.records if "backend auto" in r.getMessage()]
    assert len(lines) == 1 and "llama-cpp-python is not installed" in lines[0] and ".[cpu]" in lines[0]
    plain = ModelSpec(name="smollm2_135m", source="packaged", package="smollm2_135m", backend="hf")
    assert base.model_id(spec, None) == base.model_id(plain, None)
    # a hub model is never auto-routed to the engine, installed or not
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert ModelSpec(name="x", source="hf", path="org/x", backend="auto").backend == "hf"


@pytest.mark.skipif(not HAS_ENGINE, reason="llama-cpp-python not installed (pip install -e '.[cpu]')")
def test_auto_backend_uses_the_engine_and_the_plan_says_so(make_cfg):
    from src.job import Job
    from src.plan import describe, plan

    job = Job.from_config(make_cfg())
    assert job.seed.backend == "llamacpp" and job.judge.backend == "llamacpp"
    assert "backend llamacpp" in describe(job, plan(job), {}, [])
    # full fine-tuning cannot be worn by the engine: said before anything runs
    from src.job import preflight

    full = Job.from_config(make_cfg("train.peft=none"))
    assert any("wears LoRA adapters only" in p and "judge.backend=hf" in p for p in preflight(full))
    assert not any("LoRA adapters only" in p for p in preflight(Job.from_config(make_cfg("train.peft=none", "judge.backend=hf"))))
    assert base.model_id(job.judge, None)["engine"]["version.llama-cpp-python"] == "0.3.36"


def test_preflight_names_the_missing_engine(monkeypatch):
    from src.models import loading

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"needs llama-cpp-python.*not installed.*\.\[cpu\]"):
        loading.preflight(ModelSpec(name="smollm2_135m", source="packaged", package="smollm2_135m", backend="llamacpp"))
    with pytest.raises(RuntimeError, match="runs the packaged GGUF files"):
        monkeypatch.setattr(importlib.util, "find_spec", real)
        loading.preflight(ModelSpec(name="x", source="tiny_random", backend="llamacpp"))


# ------------------------------------------------------------------------------------- the engine itself
def judge_prompts(n: int) -> list[str]:
    from src.cli.bench_judge import judge_prompts as prompts

    return prompts(REWARDBENCH, n, response_chars=400, seed=1)


@pytest.fixture(scope="module")
def engines():
    """HF (the reference) and llama.cpp on SmolLM2-135M as conf/model/smollm2_135m.yaml runs them: HF on the Q4_1
    GGUF dequantised, llama.cpp on the same file re-encoded as f32 (extra.gguf_type)."""
    import dataclasses

    from src.cli.bench_judge import model_spec
    from src.models.loading import load_generator
    from tests.conftest import model_cache

    spec = dataclasses.replace(model_spec("smollm2_135m", 8), max_model_len=2048)
    assert spec.extra.get("gguf_type") == "f32"
    hf = load_generator(spec, cache_dir=model_cache())
    lc = load_generator(dataclasses.replace(spec, backend="llamacpp"), cache_dir=model_cache())
    yield hf, lc
    hf.close()
    lc.close()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ENGINE, reason="llama-cpp-python not installed (pip install -e '.[cpu]')")
def test_f32_re_encoding_holds_exactly_the_packaged_values(tmp_path):
    """extra.gguf_type=f32 is exact: every tensor of the re-encoded file equals the packaged tensor dequantised by
    the gguf package (what the HF conversion does), bit for bit; a second call reuses the file, and a damaged one is
    set aside and made again."""
    import gguf

    from src.models.llamacpp import engine_gguf
    from src.models.packaged import get_packaged, locate_gguf
    from tests.conftest import model_cache

    packaged = locate_gguf("smollm2_135m", model_cache())
    sha = get_packaged("smollm2_135m").sha256
    src = {t.name: t for t in gguf.GGUFReader(packaged).tensors}
    assert "Q4_1" in {t.tensor_type.name for t in src.values()}  # the check covers quantised tensors, not only norms

    def assert_exact(path):
        dst = {t.name: t for t in gguf.GGUFReader(path).tensors}
        assert set(src) == set(dst)
        for name, t in src.items():
            want = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            assert dst[name].tensor_type == gguf.GGMLQuantizationType.F32, name
            assert np.array_equal(np.asarray(dst[name].data).reshape(want.shape), want), name

    out = engine_gguf(packaged, "f32", tmp_path, sha)
    assert out.name.startswith(sha[:12])
    assert_exact(out)
    mtime = out.stat().st_mtime_ns
    assert engine_gguf(packaged, "f32", tmp_path, sha) == out and out.stat().st_mtime_ns == mtime
    with open(out, "r+b") as f:  # one flipped byte in the tensor data
        f.seek(out.stat().st_size - 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert engine_gguf(packaged, "f32", tmp_path, sha) == out
    assert_exact(out)
    assert len(list((tmp_path / "gguf").glob("*.f32.gguf*"))) == 3  # the file, its .sha256, the set-aside copy
    with pytest.raises(ValueError, match="gguf_type='q3'"):
        engine_gguf(packaged, "q3", tmp_path, sha)


def test_engine_settings_key_llamacpp_outputs_only():
    """extra.gguf_type enters a llama.cpp key (other weights, other outputs) and never an HF key; the engine's
    revision is part of every llama.cpp key."""
    from src.models.base import model_id

    plain = ModelSpec(name="m", source="packaged", package="smollm2_135m", backend="hf")
    typed = ModelSpec(name="m", source="packaged", package="smollm2_135m", backend="hf", extra={"gguf_type": "f32"})
    assert model_id(plain, None) == model_id(typed, None)
    lc_plain = ModelSpec(name="m", source="packaged", package="smollm2_135m", backend="llamacpp")
    lc_typed = ModelSpec(name="m", source="packaged", package="smollm2_135m", backend="llamacpp", extra={"gguf_type": "f32"})
    assert model_id(lc_plain, None) != model_id(lc_typed, None)
    assert model_id(lc_plain, None)["engine"]["llamacpp.engine_revision"] == str(base.LLAMACPP_ENGINE_REVISION)
    assert "llamacpp.engine_revision" not in model_id(plain, None)["engine"]


def test_preflight_names_a_bad_gguf_type_before_anything_runs():
    from src.models import loading

    with pytest.raises(RuntimeError, match=r"model 'm': extra\.gguf_type='q3': one of"):
        loading.preflight(ModelSpec(name="m", source="packaged", package="smollm2_135m", backend="llamacpp",
                                    extra={"gguf_type": "q3"}))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ENGINE, reason="llama-cpp-python not installed (pip install -e '.[cpu]')")
def test_prefix_cache_reads_equal_cold_reads(engines):
    """What the prefix cache serves equals a computation from nothing: a constrained read after `generate` (prompt +
    judgment reused across KV streams), and scores of prompts sharing the template preamble, match each prompt
    scored alone in an empty cache. Copies between slots move whole KV streams, then drop the tail: a wrong tail or
    a copy applied out of order would change these log-probs by far more than 1e-3."""
    _, lc = engines
    prompts = judge_prompts(4)
    judged = lc.generate(prompts, SamplingConfig(max_new_tokens=16, temperature=0.7, top_p=0.9, n=2, seeds=(1, 2, 3, 4)))
    prefixes = [r[1].text + "\n\nFinal verdict: [[" for r in judged]  # the second sample: its slot is a copy
    lc.reused_tokens = 0
    warm = lc._continuation_logprobs(
        [(lc._encode(lc.chat_text(p) + x), [[lc._encode("A")[0]], [lc._encode("B")[0]]]) for p, x in zip(prompts, prefixes)], "t")
    assert lc.reused_tokens > sum(lc.count_tokens(prompts))  # prompt and judgment were served from the cache
    cold = []
    for p, x in zip(prompts, prefixes):
        lc.reset_cache()
        cold += lc._continuation_logprobs([(lc._encode(lc.chat_text(p) + x), [[lc._encode("A")[0]], [lc._encode("B")[0]]])], "t")
    assert np.allclose(warm, cold, atol=1e-3), (warm, cold)
    together = lc.score_options(prompts, ["[["] * 4, ["A", "B"])
    alone = [lc.score_options([p], ["[["], ["A", "B"]) for p in prompts]
    assert np.allclose(together, [a[0] for a in alone], atol=1e-3), (together, alone)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ENGINE, reason="llama-cpp-python not installed (pip install -e '.[cpu]')")
def test_greedy_verdicts_agree_with_the_hf_reference(engines):
    """>= 95 % of greedy verdicts ([[A]] vs [[B]] right after the judge prompt) agree on 30 RewardBench prompts. The
    engines hold the same f32 weights and differ only in kernels (ggml's and torch's summation order, f16 KV cells);
    every disagreement must be a near-tie for HF (|log-prob margin| < 0.5), which is what that noise can flip.
    `choose` (the evaluation's constrained read) is checked to pick the larger score."""
    hf, lc = engines
    prompts = judge_prompts(30)
    hs = hf.score_options(prompts, ["[["] * len(prompts), ["A", "B"])
    ls = lc.score_options(prompts, ["[["] * len(prompts), ["A", "B"])
    a = ["A" if x[0] > x[1] else "B" for x in hs]
    b = ["A" if x[0] > x[1] else "B" for x in ls]
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            assert abs(hs[i][0] - hs[i][1]) < 0.5, (i, hs[i], ls[i])
    agree = sum(x == y for x, y in zip(a, b)) / len(a)
    assert agree >= 0.95, (agree, a, b)
    # the scores themselves are close (log-probs of the verdict letter), not just their argmax: the same f32 weights
    # measured a median |difference| of 0.0007 (max 0.004); the packaged Q4_1 file on llama.cpp 0.062 (max 0.31),
    # so this bound also fails if the engine stops running the re-encoded weights
    diff = np.abs(np.array(hs) - np.array(ls))
    assert float(np.median(diff)) < 0.01, diff
    assert lc.choose(prompts[:8], ["[["] * 8, ["A]]", "B]]"]) == [x + "]]" for x in b[:8]]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ENGINE, reason="llama-cpp-python not installed (pip install -e '.[cpu]')")
def test_generation_is_seeded_per_prompt_and_stops_like_hf(engines):
    hf, lc = engines
    prompts = judge_prompts(5)
    s = SamplingConfig(max_new_tokens=24, temperature=0.7, top_p=0.9, n=2, seeds=(11, 12, 13, 14, 15))
    together = lc.generate(prompts, s)
    assert all(len(r) == 2 for r in together) and together[0][0].text != together[0][1].text
    # A call's output is a function of its prompts and seeds (reruns and resumed chunks are identical), as on vLLM;
    # not of each prompt alone: ggml's kernels depend on how many rows a step decodes, which moves logits by ~1e-5.
    again = lc.generate(prompts, s)
    assert [[c.text for c in r] for r in again] == [[c.text for c in r] for r in together]
    other = lc.generate(prompts, SamplingConfig(max_new_tokens=24, temperature=0.7, top_p=0.9, n=2, seeds=(21, 22, 23, 24, 25)))
    assert [[c.text for c in r] for r in other] != [[c.text for c in r] for r in together]
    for r in together:
        for c in r:
            assert c.num_tokens <= 24 and (c.finished or c.num_tokens == 24)
            # the count is of the generated tokens the text was decoded from; re-encoding a decoded text may merge or
            # split a token at a boundary (BPE is not idempotent: measured 24 generated -> 25 re-encoded), never more
            assert abs(c.num_tokens - len(lc._encode(c.text))) <= 2 or not c.text
    # greedy: the first tokens of HF's and llama.cpp's continuations agree on most prompts
    g = SamplingConfig(max_new_tokens=8)
    h = [r[0].text for r in hf.generate(prompts, g)]
    l = [r[0].text for r in lc.generate(prompts, g)]
    assert sum(x.split()[:2] == y.split()[:2] for x, y in zip(h, l)) >= 4, (h, l)

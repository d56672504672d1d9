"""Classification: label scoring (HFGenerator.score_options), contextual calibration, and one shared
classification per (pool, model, prompt, label set) that every category's select reads."""
from __future__ import annotations

import math

import pytest

from src.cache import StageCache
from src.data import DataError
from src.models.base import ModelSpec
from src.models.prompts import option_ids
from src.job import Job
from src.plan import plan
from src.stages import select
from src import classification as classify

from tests.conftest import TINY, model_cache, tiny_generator

LABELS = ["reasoning", "code", "math", "writing", "persona", "extraction", "knowledge", "other"]


tiny = tiny_generator(batch_size=3)


def test_score_options_is_the_sum_of_the_option_token_logprobs(tiny):
    """Against a plain forward pass over context + option, token by token (multi-token options included)."""
    import torch

    prompts = ["Explain why the sky is blue.", "Write a function that returns the sum of a list."]
    options = ["reasoning", "code", "roleplay", "x"]
    got = tiny.score_options(prompts, ["Category: "] * 2, options)
    for p, row in zip(prompts, got):
        ctx_text = tiny.chat_text(p) + "Category:"
        ctx = tiny._encode(ctx_text)
        for o, score in zip(options, row):
            opt = option_ids(tiny._encode, ctx_text, ctx, " " + o)
            ids = torch.tensor([ctx + opt])
            with torch.inference_mode():
                logp = torch.log_softmax(tiny.model(input_ids=ids).logits[0].float(), -1)
            want = sum(float(logp[len(ctx) - 1 + t, tok]) for t, tok in enumerate(opt))
            assert score == pytest.approx(want, abs=1e-3)
    # the argmax agrees with the constrained choice when it compares first tokens of distinct options
    assert len({len(r) for r in got}) == 1


def test_calibration_divides_out_the_content_free_prior():
    # the model says "writing" to everything, a little less so when the input is a puzzle
    cats = ["reasoning", "writing"]
    content_free = [[math.log(0.1), math.log(0.9)], [math.log(0.2), math.log(0.8)]]
    prior = classify.label_prior(content_free)
    assert [math.exp(p) for p in prior] == pytest.approx([0.15, 0.85])
    puzzle = [math.log(0.4), math.log(0.6)]
    assert classify.pick(puzzle, None, cats) == "writing"
    assert classify.pick(puzzle, prior, cats) == "reasoning"  # 0.4/0.15 > 0.6/0.85
    poem = [math.log(0.05), math.log(0.95)]
    assert classify.pick(poem, prior, cats) == "writing"


def _job(make_cfg, category: str, *extra: str) -> Job:
    base = [o for o in TINY if not o.startswith(("dataset.categories", "dataset.max_scan", "dataset.limit"))]
    return Job.from_config(make_cfg(*base, f"dataset.category={category}", f"dataset.categories=[{','.join(LABELS)}]",
                                    "dataset.max_scan=40", "dataset.limit=2", *extra))


class Counting:
    """Wraps the tiny model and counts model loads (select's model factory) and label-scoring calls."""

    def __init__(self, inner):
        self.inner, self.calls, self.loads, self.spec = inner, 0, 0, inner.spec

    def count_tokens(self, prompts):
        return self.inner.count_tokens(prompts)

    def load(self):
        self.loads += 1
        return self

    def score_options(self, *a):
        self.calls += 1
        return self.inner.score_options(*a)


def _select(job: Job, model) -> tuple[list, dict]:
    steps = {s.stage: s for s in plan(job)}
    cached = select.cached_units(StageCache(job.cache_dir), steps["classify"].key, "tiny_random")
    return select.run(job.dataset, job.data_root, job.random_seed, model.load, cached)


def test_second_category_reuses_the_first_ones_classification(make_cfg, tiny):
    first = _job(make_cfg, "any")
    model = Counting(tiny)
    out, stats = _select(first, model)
    assert model.loads >= 1 and model.calls >= 1 and stats["new_chunks"] >= 1  # at least one chunk of labels
    assert sum(v for k, v in stats.items() if k.startswith("share/")) == pytest.approx(1.0, abs=0.01)
    labels = stats["label_counts"]

    # another category over the same pool, model, prompt and label set: same classify key, another select key
    present = max(labels, key=labels.get)
    second = _job(make_cfg, present)
    s1, s2 = ({s.stage: s for s in plan(j)} for j in (first, second))
    assert s1["classify"].key == s2["classify"].key and s1["select"].key != s2["select"].key
    assert "cached labels" in __import__("src.plan", fromlist=["describe"]).describe(second, plan(second), {}, [])

    again = Counting(tiny)
    out2, stats2 = _select(second, again)
    assert again.loads == 0 and again.calls == 0 and stats2["new_chunks"] == 0  # the seed is not even loaded
    assert out2 and all(i.category == present for i in out2)

    # a category the shared labels never gave: the error names the shares found, still without a model call
    absent = [c for c in LABELS if c not in labels]
    if absent:
        with pytest.raises(DataError, match=r"label shares: \{"):
            _select(_job(make_cfg, absent[0], f"dataset.max_scan={classify.CHUNK}"), again)  # the cached chunk only
        assert again.loads == 0 and again.calls == 0

    # a different label set is a different classification
    other = _job(make_cfg, "code", "dataset.categories=[code,writing]")
    assert {s.stage: s for s in plan(other)}["classify"].key != s1["classify"].key


def test_scan_stops_at_limit_and_extends_shared_chunks(make_cfg, tiny):
    """A job with a larger max_scan classifies only the chunks past those already cached."""
    job = _job(make_cfg, "any", "dataset.limit=1", "dataset.max_scan=200")
    model = Counting(tiny)
    _, stats = _select(job, model)
    assert stats["scanned"] == classify.CHUNK  # one chunk fills limit=1 for `any`
    job2 = _job(make_cfg, "any", "dataset.limit=40", "dataset.max_scan=200")
    _, stats2 = _select(job2, model)
    assert stats2["new_chunks"] == 1 and stats2["scanned"] == 2 * classify.CHUNK


def test_score_options_shared_prefix_path_matches_the_batched_one(tiny, monkeypatch):
    """Classify prompts share a long prefix (label descriptions, examples): computed once and reused, the scores
    must equal the batched, left-padded path's (spec.extra shared_prefill=False) for every option, multi-token
    options included."""
    from src.models.hf import HFGenerator

    head = "Which kind of task is the user instruction? " + " ".join(f"label{i}: a description of kind {i}." for i in range(12))
    prompts = [f'{head}\nInstruction: "{t}"' for t in ["Why is the sky blue?", "Sort a list in Python.", "N/A", ""]]
    options = ["reasoning", "code", "roleplay", "extraction"]
    ctx = [tiny._encode(tiny.chat_text(p)) for p in prompts]
    assert sum(a == b for a, b in zip(ctx[0], ctx[1])) >= 32  # the shared path is the one taken
    taken = []
    inner = type(tiny)._score_after_shared_prefix
    monkeypatch.setattr(type(tiny), "_score_after_shared_prefix", lambda self, *a: taken.append(inner(self, *a)) or taken[-1])
    shared = tiny.score_options(prompts, ["Category: "] * len(prompts), options)
    assert taken and taken[0] is not None  # the shared-prefix path answered
    monkeypatch.undo()
    plain = HFGenerator(ModelSpec(name="tiny_random", source="tiny_random", batch_size=3, extra={"shared_prefill": False}),
                        tiny.model_dir).score_options(prompts, ["Category: "] * len(prompts), options)
    assert any(len(option_ids(tiny._encode, "Category:", tiny._encode("Category:"), " " + o)) > 1 for o in options)
    for a, b in zip(shared, plain):
        assert a == pytest.approx(b, abs=1e-4)


def test_classify_eval_measures_all_80_mtbench_questions_and_caches(make_cfg, tmp_path, monkeypatch):
    """python -m src.cli.classify_eval's core on the tiny model: gold labels from MT-Bench's categories (10 per category,
    stem + humanities = 20 knowledge), precision/recall per label consistent with the predictions it saved, and a
    second call with the same classifier config reads the cache without loading a model."""
    import json

    from src.cli import classify_eval
    from src.config import typed
    from src.models import loading
    from src.pool import DatasetConfig
    from tests.conftest import DATA_ROOT

    cfg = make_cfg("seed=tiny_random", "dataset=reasoning", "dataset.max_chars=150")  # the tiny tokenizer: 1024 tokens
    spec, dataset = typed(ModelSpec, cfg.seed, "seed"), typed(DatasetConfig, cfg.dataset, "dataset")
    metrics, folder = classify_eval.evaluate(spec, dataset, str(DATA_ROOT), tmp_path / "cache", str(model_cache()))
    assert metrics["n"] == 80
    per = metrics["per_label"]
    assert {c: per[c]["gold"] for c in ("reasoning", "code", "math", "knowledge")} == {"reasoning": 10, "code": 10, "math": 10, "knowledge": 20}
    rows = [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 80 and sum(per[c]["predicted"] for c in per) == 80
    for c, m in per.items():
        tp = sum(r["pred"] == c == r["gold"] for r in rows)
        assert m["predicted"] == sum(r["pred"] == c for r in rows)
        assert m["precision"] == (tp / m["predicted"] if m["predicted"] else None)
    assert "| reasoning | reasoning | 10 |" in (folder / "table.md").read_text()

    monkeypatch.setattr(loading, "load_generator", lambda *a, **k: pytest.fail("cached: no model load"))
    again, folder2 = classify_eval.evaluate(spec, dataset, str(DATA_ROOT), tmp_path / "cache", str(model_cache()))
    assert folder2 == folder and again == metrics

"""Issue 9: no silent wrong result. Each test here failed before its fix (the item number is in its name)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from src.cache import StageCache
from src.records import Pair
from src.stages import judge
from src.stages.judge import JudgingConfig
from tests.conftest import TINY, model_cache


@pytest.fixture(scope="module")
def tiny():
    from src.models.base import ModelSpec
    from src.models.loading import load_generator

    gen = load_generator(ModelSpec(name="tiny_random", source="tiny_random", batch_size=4), cache_dir=model_cache())
    yield gen
    gen.close()


PAIRS = [Pair(f"p{i}", f"Question {i}: why {'so ' * i}?", f"Because {i}.", f"Unrelated {i}.", f"Question {i}: how?", "train")
         for i in range(7)]


def _judgments(tiny, tmp_path, chunk_size, key, verdict="parse"):
    cfg = JudgingConfig(n=2, max_new_tokens=6, temperature=1.0, verdict=verdict)
    out, _ = judge.run(cfg, PAIRS, tiny, seed=5, partial=StageCache(tmp_path).partial("judge", key), chunk_size=chunk_size)
    return [(j.pair_id, j.order, j.sample, j.text, j.verdict) for j in out]


@pytest.mark.parametrize("verdict", ["parse", "constrained"])
def test_item2_judgments_do_not_depend_on_chunk_size(tiny, tmp_path, verdict):
    a = _judgments(tiny, tmp_path, 3, "c3", verdict)
    b = _judgments(tiny, tmp_path, 16, "c16", verdict)
    assert len(a) == 7 * 2 * 2
    assert len({t for *_, t, _ in a}) > 3  # really sampled, not one constant text
    assert a == b

"""The plan is the single source of truth: every key it computes is pinned for the tiny config (so a refactor that
keeps them keeps every existing cache valid), and the standalone scorer keys a (model, adapter, benchmark) exactly
as the loop does."""
import json
from pathlib import Path

import pytest

from src import pipeline
from src.pipeline import Job, plan
from tests.conftest import TINY

PINNED = json.loads((Path(__file__).parent / "data" / "plan_keys.json").read_text())["cases"]


@pytest.fixture
def fixed_engines(monkeypatch):
    """The torch/transformers/peft versions are part of every model's key; fixed here so the pins survive upgrades."""
    monkeypatch.setattr(pipeline, "engine_versions",
                        lambda backend: {"torch": "T", "transformers": "X", "peft": "P", **({"vllm": "V"} if backend == "vllm" else {})})


def planned(make_cfg, overrides):
    return [[s.stage, s.iteration, s.key, s.model, s.adapter_of, s.init_of]
            for s in plan(Job.from_config(make_cfg(*TINY, *overrides)))]


@pytest.mark.parametrize("case", sorted(PINNED))
def test_plan_keys_are_pinned(make_cfg, fixed_engines, case):
    assert planned(make_cfg, PINNED[case]["overrides"]) == PINNED[case]["steps"]

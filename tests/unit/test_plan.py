"""The plan is the single source of truth: every key it computes is pinned for the tiny config (so a refactor that
keeps them keeps every existing cache valid), and the standalone scorer keys a (model, adapter, benchmark) exactly
as the loop does."""
import json
import os
from pathlib import Path

import pytest

from src.models import base
from src.job import Job
from src.plan import plan
from tests.conftest import TINY, REPO

PINS = REPO / "tests" / "data" / "plan_keys.json"
PINNED = json.loads(PINS.read_text())["cases"]


@pytest.fixture
def fixed_engines(monkeypatch):
    """The torch/transformers/peft versions are part of every model's key; fixed here so the pins survive upgrades."""
    monkeypatch.setattr(base, "engine_versions",
                        lambda backend: {"torch": "T", "transformers": "X", "peft": "P", **({"vllm": "V"} if backend == "vllm" else {})})


def planned(make_cfg, overrides):
    return [[s.stage, s.iteration, s.key, s.model, s.adapter, s.init]
            for s in plan(Job.from_config(make_cfg(*TINY, *overrides)))]


@pytest.mark.parametrize("case", sorted(PINNED))
def test_plan_keys_are_pinned(make_cfg, fixed_engines, case):
    steps = planned(make_cfg, PINNED[case]["overrides"])
    if os.environ.get("STE_REPIN") == "1":  # a change that is MEANT to change keys (a stage VERSION bump): rewrite the pins
        _repin(case, steps)
    assert steps == PINNED[case]["steps"]


def _repin(case: str, steps: list) -> None:
    PINNED[case]["steps"] = steps
    about = json.loads(PINS.read_text())["_about"]
    lines = [f' "_about": {json.dumps(about)},', ' "cases": {']
    for n, (name, c) in enumerate(PINNED.items()):
        lines.append(f'  {json.dumps(name)}: {{"overrides": {json.dumps(c["overrides"])}, "steps": [')
        lines += [f"   {json.dumps(s)}," for s in c["steps"][:-1]] + [f"   {json.dumps(c['steps'][-1])}"]
        lines.append("  ]}" + ("," if n < len(PINNED) - 1 else ""))
    PINS.write_text("{\n" + "\n".join(lines) + "\n }\n}\n")


EVAL = [o for o in TINY if o.startswith("eval.")]


def scorer_cfg(results, *overrides):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF, DATA_ROOT

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("evaluate", overrides=[f"data_root={DATA_ROOT}", f"results_dir={results}", "model=tiny_random", *EVAL, *overrides])


def test_standalone_scorer_keys_a_model_and_a_loop_adapter_as_the_loop_does(make_cfg, tmp_path):
    """The scorer's key for (model, adapter, benchmark) is the loop's: for the untrained judge, and for an adapter
    that is a loop train output (keyed by its train key, so the loop's evaluations are reused). The same bytes
    anywhere else, or a train output whose files no longer match its manifest, are keyed by content instead."""
    import shutil

    from src.cache import StageCache
    from src.config import typed
    from src.cli.evaluate import scorer_keys
    from src.models.base import ModelSpec
    from src.job import PipelineConfig
    from src.stages.evaluate import EvalConfig

    job = Job.from_config(make_cfg(*TINY, "iterations=1"))
    loop = {(s.stage, s.iteration): s.key for s in plan(job)}
    cache = StageCache(job.cache_dir)

    def scorer(adapter=None):
        cfg = scorer_cfg(job.results_dir)
        return scorer_keys(typed(ModelSpec, cfg.model, "model"), typed(EvalConfig, cfg.eval, "eval"), str(cfg.data_root), adapter, cache,
                           typed(PipelineConfig, cfg.pipeline, "pipeline").chunk_size)

    assert scorer() == {"rewardbench": loop[("rewardbench", 0)], "mtbench": loop[("mtbench", 0)]}

    def fake_training(p):  # the train stage's output as the cache commits it; its bytes do not matter to keys
        (p.dir / "adapter").mkdir()
        (p.dir / "adapter" / "adapter_config.json").write_text('{"r": 8}\n')
        (p.dir / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
        return None, {"trained": True, "produced": "adapter"}

    cache.compute_once("train", loop[("train", 1)], fake_training, {})
    adapter = cache.path("train", loop[("train", 1)]) / "adapter"
    assert scorer(adapter) == {"rewardbench": loop[("rewardbench", 1)], "mtbench": loop[("mtbench", 1)]}

    elsewhere = tmp_path / "copy" / "adapter"
    shutil.copytree(adapter, elsewhere)
    by_bytes = scorer(elsewhere)
    assert by_bytes["rewardbench"] not in (loop[("rewardbench", 0)], loop[("rewardbench", 1)])
    (adapter / "adapter_model.safetensors").write_bytes(b"tampered")
    tampered = scorer(adapter)
    assert tampered["rewardbench"] not in (loop[("rewardbench", 1)], by_bytes["rewardbench"])
    assert adapter.exists()  # keying inspects, it never moves a damaged output aside

"""Standalone judge evaluation: RewardBench and MT-Bench agreement for any model or adapter.

    python -m src.cli.evaluate model=smollm2_135m [adapter=DIR] [eval.rewardbench.per_subset=null]

A benchmark-only plan (`scorer_plan`) run by the loop's Runner: the same scoring, prompts, cache and logging as
the loop's evaluate steps (a model already scored by a run is not re-judged), as an MLflow run tagged ste.kind=eval.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from src.config import CONF_DIR

log = logging.getLogger("src.cli.evaluate")


def adapter_fingerprint(adapter: Path) -> str:
    """Identity of an adapter directory by content, so a retrained adapter at the same path is re-scored."""
    h = hashlib.sha256()
    for f in sorted(p for p in adapter.rglob("*") if p.is_file()):
        h.update(f.relative_to(adapter).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


def train_output(adapter: Path | None, cache) -> str | None:
    """The train key whose output `adapter` is, when it is an intact adapter output of this cache's train stage
    (`<cache>/train/<key>/adapter`), else None."""
    from src.cache import check
    from src.stages import train

    if adapter is None:
        return None
    out = adapter.parent
    if (out.parent == cache.root / "train" and adapter.name == train.PRODUCED["adapter"] and check(out) is None
            and cache.meta("train", out.name).get("stats", {}).get("produced") == "adapter"):
        return out.name
    return None


def adapter_key(adapter: Path | None, cache) -> str | None:
    """What the benchmark keys call the weights an adapter directory holds: the loop's train key when it is this
    cache's own train output (then the loop's evaluations of it are reused), otherwise a hash of its bytes."""
    if adapter is None:
        return None
    return train_output(adapter, cache) or adapter_fingerprint(adapter)


def scorer_keys(spec, ecfg, data_root: str, adapter: Path | None, cache, chunk_size: int) -> dict[str, str]:
    """Each enabled benchmark's key (synthetic excluded: it needs a run's pairs), by the stage's own key function,
    the one the loop's plan calls."""
    from src.stages import evaluate

    a = adapter_key(adapter, cache)
    return {b: evaluate.key(b, ecfg, data_root, spec, a, None, chunk_size)
            for b in ("rewardbench", "mtbench") if evaluate.BENCHMARKS[b].enabled(ecfg)}


def scorer_plan(spec, ecfg, data_root: str, adapter: Path | None, cache, chunk_size: int) -> list:
    """The standalone scorer's plan: one benchmark step per enabled benchmark (synthetic excluded: it needs a run's
    pairs), keyed by `scorer_keys`, run by the loop's Runner. An adapter that is this cache's own train output is
    worn by its train key (as the loop does); any other adapter directory by its path."""
    from src.plan import meta_config
    from src.step import Step

    own = train_output(adapter, cache)
    name = spec.name + (f"+{adapter.name}" if adapter else "")
    steps = [Step(b, 0, key, name, ecfg, spec, adapter=own, adapter_dir=None if own or adapter is None else str(adapter),
                  chunk=chunk_size)
             for b, key in scorer_keys(spec, ecfg, data_root, adapter, cache, chunk_size).items()]
    for s in steps:
        s.meta_config = meta_config(s)
    return steps


def evaluate_model(cfg: DictConfig) -> dict[str, float]:
    from src.cache import StageCache
    from src.config import ConfigError, typed
    from src.models.base import ModelSpec
    from src.models.loading import preflight
    from src.job import PipelineConfig
    from src.runner import Runner
    from src.stages import evaluate
    from src.judging import judge_template, prompt_params
    from src.tracking import Tracker, TrackingConfig, flatten

    spec = typed(ModelSpec, cfg.model, "model")
    ecfg = typed(evaluate.EvalConfig, cfg.eval, "eval")
    pcfg = typed(PipelineConfig, cfg.pipeline, "pipeline")
    results = Path(str(cfg.results_dir)).expanduser().resolve()
    adapter = Path(str(cfg.adapter)).expanduser().resolve() if cfg.adapter else None
    if adapter is not None and not (adapter / "adapter_config.json").exists():
        raise ConfigError(f"adapter={adapter}: not a PEFT adapter directory (no adapter_config.json)")
    cache_dir = Path(pcfg.cache_dir).expanduser().resolve() if pcfg.cache_dir else results / "cache"
    steps = scorer_plan(spec, ecfg, str(cfg.data_root), adapter, StageCache(cache_dir), pcfg.chunk_for(spec))
    if not steps:
        raise ConfigError("eval.rewardbench.enabled and eval.mtbench.enabled are both false: nothing to evaluate")
    preflight(spec)
    judge_template(ecfg.prompt, "eval.prompt")  # a bad prompt file fails before the model loads
    tracker = Tracker(typed(TrackingConfig, cfg.tracking, "tracking"), results)
    name = steps[0].model
    tracker.start(f"eval {name}", {"model.name": spec.name, "adapter": str(adapter), **flatten({"eval": dict(cfg.eval)}),
                                   **prompt_params(eval=ecfg.prompt)},
                  {"ste.kind": "eval", "choice.model": spec.name}, None)
    model_cache = Path(pcfg.model_cache_dir).expanduser() if pcfg.model_cache_dir else None
    runner = Runner(tracker, cache_dir, str(cfg.data_root), {"judge": spec}, model_cache)
    status = "FAILED"
    try:
        final = runner.run(steps)  # the model loads only if some benchmark is not cached yet
        status = "FINISHED"
    finally:
        runner.pool.close()
        tracker.end(status)
    out = {k.removesuffix("@iter0"): v for k, v in final.items()}
    for k in ("rewardbench/overall", "rewardbench/chat", "rewardbench/chat_hard", "rewardbench/safety", "rewardbench/reasoning",
              "mtbench/agreement_s1", "mtbench/agreement_s2"):
        if k in out:
            log.info("%s %s = %.3f", name, k, out[k])
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate_model(cfg)


if __name__ == "__main__":
    main()

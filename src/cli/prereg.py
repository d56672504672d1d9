"""The pre-registered analysis of experiments/prereg_cpu.md, fixed before any result existed.

    python -m src.cli.prereg [overrides]        # reads the preset's cached evaluations; writes the analysis

Composes `+experiments=prereg_cpu` (plus any overrides), plans it, reads the held-out synthetic and RewardBench
evaluations of iteration 0 and of the last iteration from the stage cache (verified), and prints and writes
`results/reports/prereg-cpu/analysis.md`: the primary (official rule, paired by held-out pair), S1 (constrained
reading), S2 (accuracy among stated verdicts), S3 (verdict rate), RewardBench paired by item. Nothing is computed
that the design does not name.
"""
from __future__ import annotations

import sys
from typing import Iterable, Mapping

from src.rules.stats import bootstrap_ci, paired_test


def pair_scores(rows: Iterable[Mapping], reading: str = "official") -> dict[str, float]:
    """Per held-out pair, the mean over its orders of 1 (the verdict names the chosen response), 0 (the other) or
    0.5 (no verdict): `rules.stats.item_scores`. `official`: the verdict the text states; `constrained`: that,
    else the next-token choice."""
    from src.rules.stats import item_scores

    if reading == "constrained":
        rows = [{**r, "verdict": r["verdict"] if r["verdict"] is not None else (r.get("extra") or {}).get("constrained")} for r in rows]
    return item_scores(list(rows))


def stated(rows: Iterable[Mapping]) -> dict[str, float]:
    """S2 and S3: accuracy among the judgments that state a verdict (with its 95% bootstrap interval) and the
    share of judgments that state one."""
    rows = list(rows)
    said = [float(r["verdict"] == r["chosen_label"]) for r in rows if r["verdict"] is not None]
    acc, lo, hi = bootstrap_ci(said) if said else (float("nan"),) * 3
    return {"n": float(len(rows)), "stated": float(len(said)), "verdict_rate": len(said) / len(rows) if rows else float("nan"),
            "accuracy_stated": acc, "lower": lo, "upper": hi}


def verdict(t: Mapping[str, float], alpha: float = 0.05) -> str:
    """The design's success rule: mean difference > 0 and two-sided p < alpha."""
    if t["n_items"] == 0:
        return "not tested (no paired items)"
    if t["delta"] > 0 and t["p_value"] < alpha:
        return "success: iteration K is more accurate than iteration 0"
    if t["delta"] < 0 and t["p_value"] < alpha:
        return "failure: iteration K is significantly less accurate than iteration 0"
    return "failure: no significant difference"


def _line(name: str, t: Mapping[str, float]) -> str:
    return (f"| {name} | {t['delta']:+.3f} | [{t['lower']:+.3f}, {t['upper']:+.3f}] | {t['p_value']:.4f} | "
            f"{int(t['n_items'])} |")


def analyse(first: list[dict], last: list[dict], rb_first: list[dict] | None, rb_last: list[dict] | None, k: int) -> str:
    from src.report.numbers import paired
    from src.rules.stats import item_scores

    primary = paired_test(pair_scores(first), pair_scores(last))
    s1 = paired_test(pair_scores(first, "constrained"), pair_scores(last, "constrained"))
    lines = ["# Pre-registered CPU experiment: analysis", "",
             "Design: [experiments/prereg_cpu.md](../../../experiments/prereg_cpu.md) (registered before any result).", "",
             f"**Primary** (held-out synthetic accuracy, official rule, iteration {k} − 0, paired by pair): "
             f"{primary['delta']:+.3f}, 95% CI [{primary['lower']:+.3f}, {primary['upper']:+.3f}], two-sided p = "
             f"{primary['p_value']:.4f}, n = {int(primary['n_items'])} pairs: **{verdict(primary)}**.", "",
             "| comparison | Δ (iteration K − 0) | 95% CI | p (two-sided) | n |", "|---|---|---|---|---|",
             _line("primary: official rule", primary), _line("S1: constrained reading", s1)]
    if rb_first and rb_last:
        key = lambda r: (r["extra"]["subset"], r["item_id"])  # noqa: E731
        t = paired("rewardbench/overall", item_scores(rb_first, key), item_scores(rb_last, key))
        if t is not None:
            lines.append(_line("RewardBench overall (official weights)", t))
    lines += ["", "| iteration | judgments | stated a verdict (S3) | accuracy among stated (S2) [95% CI] |", "|---|---|---|---|"]
    for it, rows in ((0, first), (k, last)):
        s = stated(rows)
        lines.append(f"| {it} | {int(s['n'])} | {s['verdict_rate']:.3f} | {s['accuracy_stated']:.3f} "
                     f"[{s['lower']:.3f}, {s['upper']:.3f}] |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    from src.cache import StageCache
    from src.config import CONF_DIR
    from src.job import Job
    from src.plan import plan

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        job = Job.from_config(compose("config", overrides=["+experiments=prereg_cpu", *argv]))
    cache, steps = StageCache(job.cache_dir), plan(job)
    k = job.iterations

    def rows(stage: str, iteration: int) -> list[dict] | None:
        step = next((s for s in steps if s.stage == stage and s.iteration == iteration), None)
        return cache.rows(stage, step.key) if step is not None and cache.valid(stage, step.key) else None

    first, last = rows("synthetic", 0), rows("synthetic", k)
    if first is None or last is None:
        raise SystemExit(f"the held-out evaluations of iterations 0 and {k} are not both in {job.cache_dir}: run "
                         f"python -m src.main +experiments=prereg_cpu {' '.join(argv)} first")
    text = analyse(first, last, rows("rewardbench", 0), rows("rewardbench", k), k)
    out = job.results_dir / "reports" / "prereg-cpu"
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.md").write_text(text)
    print(text + f"\nwritten: {out / 'analysis.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])

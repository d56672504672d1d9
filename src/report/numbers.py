"""A report's numbers from its jobs: the table rows (iteration-0 / final / selected values, deltas), bootstrap
intervals of the headline numbers (the official RewardBench overall recomputed on resamples with the run's section
weights, MT-Bench agreement pooled over comparisons), paired tests between jobs, seed replicates, vote-k series."""
from __future__ import annotations

import math
from typing import Any

from src.report.store import CONSTRAINED, HEADLINE, ITEM_BENCHMARKS, ITEM_METRICS, JobResult, MAJ, VOTE_K, VOTE_K_CURVES
from src.rules.stats import bootstrap_ci, paired_ratio_test, paired_stratified_test, paired_test, ratio_bootstrap, stratified_bootstrap
from src.benchmarks.rewardbench import WEIGHTS_DEFAULT


def _official_overall(weights: str):
    from src.benchmarks.rewardbench import overall, section_scores

    return lambda subset_means: overall(section_scores(subset_means, weights))


def _setup(metric: str) -> str | None:
    """"s1" / "s2" for an MT-Bench agreement metric, else None."""
    return metric.rsplit("_", 1)[1] if metric.startswith("mtbench/agreement_") else None


def interval(metric: str, items: dict, weights: str = WEIGHTS_DEFAULT) -> tuple[float, float] | None:
    """95% interval of a reported number (or of a benchmark's headline, given the benchmark's name): the official
    RewardBench overall (items resampled within their subsets, the official weighting recomputed), MT-Bench
    agreement pooled over comparisons (keys resampled within their turn), or the plain mean (synthetic accuracy).
    `weights`: the reward-bench version of the section weights the run's overall used (JobResult.rb_weights)."""
    metric = ITEM_BENCHMARKS.get(metric, metric)
    if _setup(metric):
        _, lo, hi = ratio_bootstrap({k: v[_setup(metric)] for k, v in items.items()})
        return None if math.isnan(lo) else (lo, hi)
    if metric == "rewardbench/overall":
        sizes = {}
        for subset, _ in items:
            sizes[subset] = sizes.get(subset, 0) + 1
        if min(sizes.values()) < 2:  # one item in a subset: resampling within it cannot vary, the interval would be 0 wide
            return None
        try:
            _, lo, hi = stratified_bootstrap(items, _official_overall(weights))
        except ValueError:  # a section with no subset in this slice: the official overall is undefined
            return None
        return lo, hi
    _, lo, hi = bootstrap_ci(list(items.values()))
    return lo, hi


def paired(metric: str, a: dict, b: dict, weights: str = WEIGHTS_DEFAULT) -> dict[str, float] | None:
    """The paired comparison of run b against run a on one reported number (or a benchmark's headline); None where
    the number is undefined for either run (an MT-Bench agreement with no decisive verdict). Where a RewardBench
    subset holds one item the interval cannot vary (as in `interval`): it is NaN, the swap test's p-value stays."""
    metric = ITEM_BENCHMARKS.get(metric, metric)
    if _setup(metric):
        s = _setup(metric)
        t = paired_ratio_test({k: v[s] for k, v in a.items()}, {k: v[s] for k, v in b.items()})
        return None if math.isnan(t["delta"]) else t
    if metric == "rewardbench/overall":
        try:
            t = paired_stratified_test(a, b, _official_overall(weights))
        except ValueError:
            return None
        sizes: dict[str, int] = {}
        for subset, _ in set(a) & set(b):
            sizes[subset] = sizes.get(subset, 0) + 1
        if sizes and min(sizes.values()) < 2:
            t = {**t, "lower": float("nan"), "upper": float("nan")}
        return t
    return paired_test(a, b)


def _paired_cell(t: dict[str, float]) -> str:
    ci = "" if math.isnan(t["lower"]) else f" [{t['lower']:+.3f}, {t['upper']:+.3f}]"
    return f"{t['delta']:+.3f}{ci} p={t['p_value']:.3f} (n={int(t['n_items'])})"


# ------------------------------------------------------------------------------------------ building
def differing_choices(jobs: list[JobResult]) -> list[str]:
    keys = sorted({k for j in jobs for k in j.choices})
    return [k for k in keys if len({j.choices.get(k) for j in jobs}) > 1] or keys[:1]


def axes(jobs: list[JobResult]) -> list[str]:
    """What tells a sweep's jobs apart: every override that differs between them (`iterations=1,3`,
    `random_seed=0,1,2`, `train.init_from=...` as much as a group choice), from the `ste.overrides` tag; runs
    logged before that tag existed fall back to the group choices."""
    if jobs and all(j.overrides is not None for j in jobs):
        keys = sorted({k for j in jobs for k in j.overrides})  # type: ignore[union-attr]
        differ = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]  # type: ignore[union-attr]
        if differ or len(jobs) == 1:
            return differ
    return differing_choices(jobs)


def value_of(job: JobResult, axis: str) -> str | None:
    if job.overrides is not None and (axis in job.overrides or axis not in job.choices):
        return job.overrides.get(axis, "(default)")
    return job.choices.get(axis)


def label(job: JobResult, names: list[str]) -> str:
    """A job named by the overrides that differ across the sweep (its run name holds every override)."""
    return " ".join(f"{a}={value_of(job, a)}" for a in names) or job.name


def other_readings(jobs: list[JobResult]) -> list[str]:
    """The constrained-choice and majority-vote metrics some job logged."""
    return [m for m in CONSTRAINED + sorted({m for j in jobs for m in j.history if MAJ.match(m)}) if any(m in j.history for j in jobs)]


def table_rows(jobs: list[JobResult]) -> list[dict[str, Any]]:
    names = axes(jobs)
    base = jobs[0] if jobs else None
    rows = []
    for j in jobs:
        sel = j.selected_iteration()
        row: dict[str, Any] = {"job": label(j, names), "run_id": j.run_id, "status": j.status, **{a: value_of(j, a) for a in names},
                               "iterations": j.final_iteration, "selected_iteration": sel}
        for m in HEADLINE:
            first, last = j.at(m, 0), j.final(m)
            row[f"{m}@0"], row[f"{m}@final"], row[f"{m}@selected"] = first, last, j.at(m, sel)
            row[f"{m} Δ"] = (last - first) if first is not None and last is not None else None
        for m in other_readings([j]):
            row[f"{m}@final"] = j.final(m)
        for metric, bench in ITEM_METRICS.items():
            if j.items.get(bench):
                ci = interval(metric, j.items[bench], j.rb_weights)
                if ci is not None:
                    row[f"{metric} 95% CI"] = f"[{ci[0]:.3f}, {ci[1]:.3f}]"
            if base is not None and j is not base and bench in j.items and bench in base.items:
                t = paired(metric, base.items[bench], j.items[bench], j.rb_weights)
                if t is not None and t["n_items"]:
                    row[f"{metric} vs first job"] = _paired_cell(t)
        rows.append(row)
    return rows


def replicates(jobs: list[JobResult], seed_axis: str = "random_seed") -> list[dict[str, Any]]:
    """One row per group of finished jobs that differ only in `random_seed` (two or more of them): per headline
    metric, mean ± sd [min, max] of the final value across the seeds, and the mean width of the item-bootstrap CI
    of one job (where per-item data exists), so the two kinds of uncertainty stand side by side."""
    names = axes(jobs)
    if seed_axis not in names:
        return []
    others = [a for a in names if a != seed_axis]
    groups: dict[str, list[JobResult]] = {}
    for j in jobs:
        if j.status == "FINISHED":
            groups.setdefault(label(j, others) if others else "all jobs", []).append(j)
    rows = []
    for name, group in groups.items():
        if len(group) < 2:
            continue
        group.sort(key=lambda j: str(value_of(j, seed_axis)))
        row: dict[str, Any] = {"jobs": name, "seeds": ",".join(str(value_of(j, seed_axis)) for j in group)}
        for m in HEADLINE:
            vals = [v for v in (j.final(m) for j in group) if v is not None]
            if len(vals) >= 2:
                mean = sum(vals) / len(vals)
                sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
                row[f"{m} across seeds"] = f"{mean:.3f} ± {sd:.3f} [{min(vals):.3f}, {max(vals):.3f}]"
            else:
                row[f"{m} across seeds"] = None
            widths = [ci[1] - ci[0] for j in group if m in ITEM_METRICS and j.items.get(ITEM_METRICS[m])
                      for ci in [interval(m, j.items[ITEM_METRICS[m]], j.rb_weights)] if ci is not None]
            row[f"{m} item CI width"] = sum(widths) / len(widths) if widths else None
        rows.append(row)
    return rows


def vote_k_benches(jobs: list[JobResult]) -> list[str]:
    """The benchmarks some job logged a vote-k curve for."""
    return [b for b in VOTE_K_CURVES if any(VOTE_K.match(m) and m.startswith(b + "/") for j in jobs for m in j.history)]


def vote_k_series(job: JobResult, bench: str) -> tuple[list[int], list[float], list[float | None]] | None:
    """(k values, the benchmark's number at each k, generated tokens per judgment at each k) at the job's final
    iteration, or None where the job logged no complete curve."""
    name, last = VOTE_K_CURVES[bench], job.final_iteration
    ks = sorted(int(VOTE_K.match(m).group(3)) for m in job.history if VOTE_K.match(m) and m.startswith(f"{bench}/vote_k/{name}_k"))
    acc = [job.at(f"{bench}/vote_k/{name}_k{k}", last) for k in ks]
    tok = [job.at(f"{bench}/vote_k/tokens_k{k}", last) for k in ks]
    return (ks, acc, tok) if ks and None not in acc else None

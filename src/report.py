"""Sweep reports, rebuilt from the MLflow store alone.

    python -m src.report                      # the latest sweep in results/mlflow.db
    python -m src.report <sweep dir | parent run id> [--store sqlite:///...] [--out DIR]

    python -m src.report --tag choice.filter=all  # any set of runs chosen by tag; no sweep in the store: the latest run

Writes report.md (one row per job: the overrides that differ, status, iteration-0 / final metrics,
delta vs iteration 0, bootstrap intervals, a paired test against the first job), report.csv and PNG plots, and
logs them to the sweep's parent run. Failed or unfinished jobs are listed with their status; a killed sweep
still reports. The Hydra callback `ReportCallback` runs this at the end of every multirun.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.rules.stats import (bootstrap_ci, item_scores, paired_ratio_test, paired_stratified_test, paired_test, ratio_bootstrap,
                    stratified_bootstrap)

log = logging.getLogger(__name__)

# Headline metrics: the judgment text under each benchmark's official rule (README "Benchmarks").
HEADLINE = ["synthetic/accuracy", "rewardbench/overall", "mtbench/agreement_s1", "mtbench/agreement_s2"]
# Other readings of the same judgments, shown in their own columns, never as the headline: the constrained-choice
# reading (eval.verdict=constrained) and majority vote over k samples (rewardbench/overall_maj<k>, found by name).
CONSTRAINED = ["synthetic/constrained/accuracy", "rewardbench/constrained/overall", "mtbench/constrained/agreement_s1",
               "mtbench/constrained/agreement_s2"]
MAJ = re.compile(r"^(rewardbench/(constrained/)?overall|synthetic/accuracy)_maj\d+$")
SECTIONS = ["rewardbench/chat", "rewardbench/chat_hard", "rewardbench/safety", "rewardbench/reasoning"]
# filter/keep_rate: kept examples per judged (pair, order); filter/examples_per_judgment: per sampled judgment (<= 1/n)
PROCESS = ["filter/keep_rate", "filter/examples_per_judgment", "judge/text_parse_fail", "judge/correct_rate", "synthetic/parse_fail", "rewardbench/parse_fail", "train/loss"]
ITEM_BENCHMARKS = {"synthetic": "synthetic/accuracy", "rewardbench": "rewardbench/overall", "mtbench": "mtbench/agreement_s1"}
# The reported numbers that get an interval from per-item data, and the benchmark whose items they resample.
ITEM_METRICS = {"synthetic/accuracy": "synthetic", "rewardbench/overall": "rewardbench", "mtbench/agreement_s1": "mtbench",
                "mtbench/agreement_s2": "mtbench"}
# Per iteration: position bias and verdict flips since the previous iteration; vote-k curves (final iteration).
DRIFT = re.compile(r"^(synthetic|rewardbench|mtbench)/position/(frac_A|flips|flips_to_correct|flips_to_wrong)$")
# (bench, accuracy metric) of each vote-k curve: RewardBench on its official overall, held-out synthetic pairs
VOTE_K_CURVES = {"rewardbench": "overall", "synthetic": "accuracy"}
VOTE_K = re.compile(r"^(rewardbench|synthetic)/vote_k/(overall|accuracy|tokens)_k(\d+)$")
# Checks of the training data, logged once per job (step 0) where the pool allows them: decontamination counts and
# the label-noise audit of the pairs (`audit/*`, exact: reference answers or unit tests; `audit/judge/*`, an audit
# judge's estimate where no reference exists).
DATA_CHECKS = re.compile(r"^(decontam/(matched|exact|ngram_only|signature_only|rows)|audit/(pairs|chosen_wrong|rejected_right|clean|inverted)"
                         r"|audit/judge/(pairs|prefers_rejected|undecided))$")
# Metrics older runs logged under names that said something else: the audit cells (`audit/neither` was the clean
# share, `audit/both` the inverted one) and, in a run without `filter/examples_per_judgment`, `filter/keep_rate`
# (then kept / judgments, not kept / judged pairs and orders). Such runs are read under the current names.
OLD_NAMES = {"audit/neither": "audit/clean", "audit/both": "audit/inverted"}


def current_names(metrics) -> dict[str, str]:
    """current name -> the name one run logged it under (`OLD_NAMES`; a run's old `filter/keep_rate`)."""
    names = {m: m for m in metrics if m not in OLD_NAMES}
    for old, new in OLD_NAMES.items():
        if old in metrics:
            names.setdefault(new, old)  # a run that logged both: the current name's number
    if "filter/keep_rate" in metrics and "filter/examples_per_judgment" not in metrics:
        names["filter/examples_per_judgment"] = names.pop("filter/keep_rate")
    return names


@dataclass
class JobResult:
    run_id: str
    name: str
    status: str
    choices: dict[str, str]
    history: dict[str, dict[int, float]]  # metric -> {iteration: value}
    items: dict[str, dict] = field(default_factory=dict)  # benchmark -> {item key: score}, final iteration
    overrides: dict[str, str] | None = None  # the job's command-line overrides (tag ste.overrides), when logged
    # the reward-bench version whose section weights its overall was logged with (param eval.rewardbench.weights;
    # runs from before the param existed were scored with v0.1.2's): intervals recompute that overall
    rb_weights: str = "v0.1.3"

    @property
    def final_iteration(self) -> int | None:
        steps = [s for h in self.history.values() for s in h]
        return max(steps) if steps else None

    def at(self, metric: str, iteration: int | None) -> float | None:
        return self.history.get(metric, {}).get(iteration) if iteration is not None else None

    def final(self, metric: str) -> float | None:
        h = self.history.get(metric, {})
        return h[max(h)] if h else None

    def selected_iteration(self) -> int | None:
        """The iteration a researcher would ship, chosen on validation data: the best held-out synthetic accuracy
        (latest on ties). Never on a benchmark score, which would make the benchmark a selection set."""
        h = self.history.get("synthetic/accuracy", {})
        return max(h, key=lambda s: (h[s], s)) if h else None


# ------------------------------------------------------------------------------------------ loading
def _client(store: str):
    import mlflow

    mlflow.set_tracking_uri(store)
    return mlflow.tracking.MlflowClient()


def find_sweep(client, experiment: str, sweep: str | None):
    """The sweep parent run: by run id, by sweep directory (tag ste.sweep_id), or the latest one (None when the
    store holds no sweep)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no MLflow experiment {experiment!r} in this store")
    runs = client.search_runs([exp.experiment_id], "tags.`ste.kind` = 'sweep'", order_by=["attributes.start_time DESC"])
    if sweep is None:
        return exp, (runs[0] if runs else None)
    for r in runs:
        if sweep in (r.info.run_id, r.data.tags.get("ste.sweep_id")) or str(Path(sweep).resolve()) == r.data.tags.get("ste.sweep_id"):
            return exp, r
    raise SystemExit(f"no sweep {sweep!r} (known: {', '.join(r.data.tags.get('ste.sweep_id', r.info.run_id) for r in runs[:10])})")


def job_runs(client, experiment_id: str, parent_id: str | None = None, tag: str | None = None) -> list:
    """Job runs: a sweep's (its parent's children), those carrying tag KEY=VALUE, or else the latest single run."""
    query = "tags.`ste.kind` = 'job'"
    if parent_id is not None:
        query += f" and tags.`mlflow.parentRunId` = '{parent_id}'"
    elif tag is not None:
        if "=" not in tag:
            raise SystemExit(f"--tag {tag!r}: use KEY=VALUE")
        key, value = tag.split("=", 1)
        query += f" and tags.`{key}` = '{value}'"
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], max_results=5000)
    if parent_id is None and tag is None:
        runs = runs[-1:]  # no sweep in the store: the latest run (what the quick start produces)
    return runs


def load_jobs(client, runs: list, with_items: bool = True) -> list[JobResult]:
    jobs = []
    for r in runs:
        history = {}
        logged = current_names(r.data.metrics)
        extra = sorted(m for m in logged if MAJ.match(m) or DRIFT.match(m) or VOTE_K.match(m) or DATA_CHECKS.match(m))
        for metric in [*HEADLINE, *SECTIONS, *PROCESS, *CONSTRAINED, *extra]:
            if metric in logged:
                history[metric] = {m.step: m.value for m in client.get_metric_history(r.info.run_id, logged[metric])}
        overrides = r.data.tags.get("ste.overrides")
        job = JobResult(
            run_id=r.info.run_id, name=r.info.run_name or r.info.run_id[:8], status=r.info.status,
            choices={k[len("choice."):]: v for k, v in r.data.params.items() if k.startswith("choice.")}, history=history,
            overrides=dict(o.lstrip("+~").split("=", 1) for o in json.loads(overrides)) if overrides else None,
            rb_weights=r.data.params.get("eval.rewardbench.weights", "v0.1.2"),
        )
        if with_items and job.final_iteration is not None:
            # each benchmark's last evaluated iteration (a job killed mid-iteration has the previous one's items)
            job.items = _items(client, r.info.run_id, {b: max(job.history[m]) for b, m in ITEM_BENCHMARKS.items() if job.history.get(m)})
        jobs.append(job)
    return jobs


def _items(client, run_id: str, iterations: dict[str, int]) -> dict[str, dict]:
    """Per-item scores of the final iteration, from the evaluation data logged as artifacts. RewardBench items are
    keyed (subset, item), so the official section-weighted overall can be recomputed on resamples; MT-Bench items
    are keyed (turn, key) with their (agreeing, total) expert comparisons per setup, so the pooled agreement can."""
    import mlflow

    out = {}
    for bench, iteration in iterations.items():
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"data/{bench}_iter{iteration}/data.jsonl")
        except Exception:  # not logged (benchmark disabled, or the job died before it)
            continue
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if bench == "rewardbench":
            out[bench] = item_scores(rows, key=lambda r: (r["extra"]["subset"], r["item_id"]))
        elif bench == "mtbench":
            out[bench] = mtbench_items(rows)
        else:
            out[bench] = item_scores(rows)
    return out


def mtbench_items(rows: list[dict]) -> dict[tuple[str, str], dict[str, tuple[int, int]]]:
    """{(turn, key): {"s1": (agree, total), "s2": (agree, total)}} from the MT-Bench evaluation rows (one per key and
    order, the expert votes in `extra`), the same votes the logged agreement counts (FastChat's rule)."""
    from src.benchmarks import mtbench

    meta = ("question_id", "model_a", "model_b", "turn")
    records = [{**{k: r["extra"][k] for k in meta}, "order": r["order"], "verdict": r["verdict"]} for r in rows]
    humans = mtbench.human_rows_from_keyed({**{k: r["extra"][k] for k in meta}, "human_votes": r["extra"]["human_votes"]}
                                           for r in rows if r["order"] == "ab")
    return {(f"turn{k[3]}", "/".join(map(str, k))): v for k, v in mtbench.agreement_by_key(records, humans).items()}


def _official_overall(weights: str):
    from src.benchmarks.rewardbench import overall, section_scores

    return lambda subset_means: overall(section_scores(subset_means, weights))


def _setup(metric: str) -> str | None:
    """"s1" / "s2" for an MT-Bench agreement metric, else None."""
    return metric.rsplit("_", 1)[1] if metric.startswith("mtbench/agreement_") else None


def interval(metric: str, items: dict, weights: str = "v0.1.3") -> tuple[float, float] | None:
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


def paired(metric: str, a: dict, b: dict, weights: str = "v0.1.3") -> dict[str, float] | None:
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


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


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


def markdown(title: str, jobs: list[JobResult], rows: list[dict[str, Any]], plots: list[str]) -> str:
    lines = [f"# Sweep report: {title}", ""]
    if not rows:
        return "\n".join(lines + ["No jobs were logged for this sweep."])
    cols = ["job", "status", *axes(jobs), "iterations"]
    for m in HEADLINE:
        cols += [f"{m}@0", f"{m}@final", f"{m} Δ"]
    lines += ["## Results (iteration 0 = untrained judge; final = last iteration)", "",
              "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    other = [f"{m}@final" for m in other_readings(jobs)]
    if other:
        lines += ["", "## Other readings of the same judgments (not the headline)", "",
                  "`constrained/`: a verdict read by next-token choice where the text names none; `_maj<k>`: majority "
                  "vote over k sampled judgments per item and order.", "",
                  "| job | " + " | ".join(other) + " |", "|" + "---|" * (len(other) + 1)]
        lines += ["| " + r["job"] + " | " + " | ".join(_fmt(r.get(c)) for c in other) + " |" for r in rows]
    unc = [c for c in rows[0].keys() | set().union(*map(set, rows)) if " CI" in c or " vs " in c]
    if unc:
        lines += ["", "## Uncertainty (final iteration, per-item scores; paired test against the first job)", "",
                  "| job | " + " | ".join(sorted(unc)) + " |", "|" + "---|" * (len(unc) + 1)]
        lines += ["| " + r["job"] + " | " + " | ".join(_fmt(r.get(c)) for c in sorted(unc)) + " |" for r in rows]
        lines += ["", "Final iteration, never a selected one. CI: 95% percentile bootstrap of the reported number itself: "
                      "for RewardBench the official overall, items resampled within their subsets and the section weighting "
                      "recomputed; for MT-Bench the agreement pooled over expert comparisons, (question, model pair, turn) "
                      "keys resampled within their turn; for synthetic pairs the mean over items. Paired: the same number's "
                      "difference vs the first job on the same resampled items, with a p-value from swapping the two jobs' "
                      "scores item by item. No RewardBench interval (nor paired interval: the p-value stays) where a subset holds one "
                      "item (`eval.rewardbench.per_subset=1`): resampling within it cannot vary, so it would read 0 wide; no "
                      "paired test where the number is undefined for a job (MT-Bench agreement with no decisive verdict)."]
    rep = replicates(jobs)
    if rep:
        lines += ["", "## Replicates: spread across whole training runs (`random_seed`)", "",
                  "| " + " | ".join(rep[0]) + " |", "|" + "---|" * len(rep[0])]
        lines += ["| " + " | ".join(_fmt(v) for v in r.values()) + " |" for r in rep]
        lines += ["", "Each row: the finished jobs that differ only in `random_seed` (every stage reseeded: data, judgments, "
                      "training). mean ± sd [min, max] of the final value across them, beside the mean width of one job's "
                      "item-bootstrap 95% CI: a seed spread as wide as the CI says the seeds move the number as much as the "
                      "choice of items does."]
    checks = sorted({m for j in jobs for m in j.history if DATA_CHECKS.match(m)})
    if checks:
        cols = checks + ["judge/correct_rate@1", "synthetic/accuracy@final"]
        lines += ["", "## Training-data checks (decontamination, label-noise audit of the pairs)", "",
                  "| job | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
        lines += ["| " + label(j, axes(jobs)) + " | " + " | ".join(_fmt(v) for v in [*(j.at(m, 0) for m in checks),
                  j.at("judge/correct_rate", 1), j.final("synthetic/accuracy")]) + " |" for j in jobs]
        lines += ["", "`audit/chosen_wrong`: share of pairs whose chosen answer is wrong by the reference; a judge that agrees "
                      "with such a label is counted correct (`judge/correct_rate`), so the audit bounds what the filter can trust. "
                      "`audit/clean`: chosen right and rejected wrong (the label the method assumes); `audit/inverted`: chosen "
                      "wrong and rejected right (the label backwards). "
                      "`audit/judge/prefers_rejected`: share of pairs an audit judge's majority (both orders, k votes each) "
                      "prefers the rejected answer on, an estimate of the same noise where no reference exists."]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


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


def plot(jobs: list[JobResult], out: Path) -> list[str]:
    axes_names = axes(jobs)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def curves(metrics: list[str], file: str, ylim: tuple[float, float] | None = None) -> str:
        """One panel per metric, one line per job (unfinished jobs marked in the legend)."""
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6))
        for ax, m in zip(axes, metrics):
            for j in jobs:
                h = j.history.get(m, {})
                if h:
                    status = "" if j.status == "FINISHED" else f" ({j.status})"
                    ax.plot(sorted(h), [h[s] for s in sorted(h)], marker="o", label=label(j, axes_names) + status)
            ax.set_title(m)
            ax.set_xlabel("iteration")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ylim:
                ax.set_ylim(*ylim)
            ax.grid(alpha=0.3)
        if axes[0].get_legend_handles_labels()[0]:  # a metric no job logged leaves the panel empty
            axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / file, dpi=110)
        plt.close(fig)
        return file

    files = [curves(HEADLINE, "metrics_vs_iteration.png")]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(len(jobs), 1)
    for i, j in enumerate(jobs):
        vals = [j.final(s) or 0.0 for s in SECTIONS]
        ax.bar([x + i * width for x in range(len(SECTIONS))], vals, width, label=label(j, axes_names))
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(SECTIONS))], [s.split("/")[1] for s in SECTIONS])
    ax.set_ylim(0, 1)
    ax.set_title("RewardBench sections, final iteration")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rewardbench_sections.png", dpi=110)
    plt.close(fig)
    files.append("rewardbench_sections.png")

    files.append(curves(["filter/keep_rate", "filter/examples_per_judgment", "judge/text_parse_fail", "synthetic/parse_fail"],
                        "keep_rate_and_parse_failures.png", (-0.05, 1.05)))
    drift = [m for m in ("synthetic/position/frac_A", "rewardbench/position/frac_A", "synthetic/position/flips", "rewardbench/position/flips")
             if any(m in j.history for j in jobs)]
    if drift:
        files.append(curves(drift, "position_bias_and_flips.png", (-0.05, 1.05)))
    benches = vote_k_benches(jobs)
    if benches:
        fig, axs = plt.subplots(1, len(benches), figsize=(6 * len(benches), 3.6), squeeze=False)
        for ax, bench in zip(axs[0], benches):
            for j in jobs:
                series = vote_k_series(j, bench)
                if series:
                    ks, acc, tok = series
                    ax.plot(ks, acc, marker="o", label=label(j, axes_names))
                    for k, a, t in zip(ks, acc, tok):
                        ax.annotate(f"{t:.0f} tok" if t is not None else "", (k, a), fontsize=6, textcoords="offset points", xytext=(0, 5))
            ax.set_xscale("log", base=2)
            ax.set_xlabel("k (majority vote over the first k samples)")
            ax.set_title(f"{bench}/{VOTE_K_CURVES[bench]} vs votes (final iteration; tokens per judgment)", fontsize=9)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "vote_k.png", dpi=110)
        plt.close(fig)
        files.append("vote_k.png")
    return files


def build(store: str, sweep: str | None = None, out: Path | None = None, experiment: str = "ste", results_dir: Path = Path("results"),
          tag: str | None = None) -> Path:
    """Write the report of one sweep, of the runs carrying `tag` (KEY=VALUE), or (a store with no sweep) of the
    latest run, from the store alone; return its directory."""
    client = _client(store)
    exp, parent = find_sweep(client, experiment, sweep) if tag is None else (client.get_experiment_by_name(experiment), None)
    if exp is None:
        raise SystemExit(f"no MLflow experiment {experiment!r} in this store")
    runs = job_runs(client, exp.experiment_id, parent.info.run_id if parent else None, tag)
    if not runs and parent is None:
        raise SystemExit(f"no job run{' tagged ' + tag if tag else ''} in this store: run one with python -m src.main")
    jobs = load_jobs(client, runs)
    if parent is not None:
        sweep_id = parent.data.tags.get("ste.sweep_id", parent.info.run_id)
        name = parent.data.tags.get("ste.sweep_name") or "-".join(Path(sweep_id).parts[-2:])
        title = f"{name} ({len(jobs)} jobs, sweep {sweep_id})"
    else:
        name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", tag) if tag else f"run-{runs[0].info.run_id[:8]}"
        title = f"{'runs tagged ' + tag if tag else 'run ' + runs[0].info.run_name} ({len(jobs)} jobs)"
    out = Path(out) if out else results_dir / "reports" / name
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(jobs)
    plots = plot(jobs, out) if jobs else []
    (out / "report.md").write_text(markdown(title, jobs, rows, plots))
    with open(out / "report.csv", "w", newline="") as f:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    if parent is not None:
        client.log_artifacts(parent.info.run_id, str(out), "report")
        # Close the parent run: the sweep is over once its report exists (a killed sweep stays RUNNING until then).
        statuses = {j.status for j in jobs}
        client.set_terminated(parent.info.run_id, "FINISHED" if statuses <= {"FINISHED"} else "FAILED")
    log.info("report: %s (%d jobs)", out / "report.md", len(jobs))
    return out


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]


class ReportCallback(Callback):
    """Builds the sweep report when a multirun ends (Hydra passes no job results: it reads the store)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from omegaconf import OmegaConf

        if not config.tracking.enabled or config.pipeline.dry_run:
            return
        from src.tracking import TrackingConfig, store_uri
        from src.config import typed

        tcfg = typed(TrackingConfig, config.tracking, "tracking")
        results = Path(str(config.results_dir)).expanduser().resolve()
        sweep_dir = str(Path(OmegaConf.select(config, "hydra.sweep.dir")).resolve())
        try:
            build(store_uri(tcfg, results), sweep_dir, experiment=tcfg.experiment, results_dir=results)
        except SystemExit as e:  # every job failed before logging: nothing to report, not an error of its own
            log.warning("report: %s", e)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", nargs="?", help="sweep directory (hydra.sweep.dir) or parent run id; default: the latest sweep, "
                   "or the latest run when the store holds no sweep")
    p.add_argument("--tag", default=None, help="report the job runs carrying this tag, KEY=VALUE (e.g. choice.filter=all)")
    p.add_argument("--results-dir", default="results", help="where mlflow.db lives and reports/ is written")
    p.add_argument("--store", default=None, help="MLflow tracking URI (default: sqlite:///<results-dir>/mlflow.db)")
    p.add_argument("--experiment", default="ste")
    p.add_argument("--out", default=None, help="output directory (default: <results-dir>/reports/<sweep name>)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = Path(a.results_dir).expanduser().resolve()
    store = a.store or f"sqlite:///{results / 'mlflow.db'}"
    print(build(store, a.sweep, Path(a.out) if a.out else None, a.experiment, results, a.tag) / "report.md")


if __name__ == "__main__":
    main()

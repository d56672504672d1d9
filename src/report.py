"""Sweep reports, rebuilt from the MLflow store alone.

    python -m src.report                      # the latest sweep in results/mlflow.db
    python -m src.report <sweep dir | parent run id> [--store sqlite:///...] [--out DIR]

Writes report.md (one row per job: the choices that differ, status, iteration-0 / final / best metrics,
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

from .stats import bootstrap_ci, item_scores, paired_test

log = logging.getLogger(__name__)

# Headline metrics: the judgment text under each benchmark's official rule (README "Benchmarks").
HEADLINE = ["synthetic/accuracy", "rewardbench/overall", "mtbench/agreement_s1", "mtbench/agreement_s2"]
# Other readings of the same judgments, shown in their own columns, never as the headline: the constrained-choice
# reading (eval.verdict=constrained) and majority vote over k samples (rewardbench/overall_maj<k>, found by name).
CONSTRAINED = ["synthetic/constrained/accuracy", "rewardbench/constrained/overall", "mtbench/constrained/agreement_s1",
               "mtbench/constrained/agreement_s2"]
MAJ = re.compile(r"^rewardbench/(constrained/)?overall_maj\d+$")
SECTIONS = ["rewardbench/chat", "rewardbench/chat_hard", "rewardbench/safety", "rewardbench/reasoning"]
PROCESS = ["filter/keep_rate", "judge/text_parse_fail", "synthetic/parse_fail", "rewardbench/parse_fail", "train/loss"]
ITEM_BENCHMARKS = {"synthetic": "synthetic/accuracy", "rewardbench": "rewardbench/overall"}


@dataclass
class JobResult:
    run_id: str
    name: str
    status: str
    choices: dict[str, str]
    history: dict[str, dict[int, float]]  # metric -> {iteration: value}
    items: dict[str, dict[str, float]] = field(default_factory=dict)  # benchmark -> per-item score, final iteration

    @property
    def final_iteration(self) -> int | None:
        steps = [s for h in self.history.values() for s in h]
        return max(steps) if steps else None

    def at(self, metric: str, iteration: int | None) -> float | None:
        return self.history.get(metric, {}).get(iteration) if iteration is not None else None

    def final(self, metric: str) -> float | None:
        h = self.history.get(metric, {})
        return h[max(h)] if h else None

    def best(self, metric: str) -> float | None:
        h = self.history.get(metric, {})
        return max(h.values()) if h else None


# ------------------------------------------------------------------------------------------ loading
def _client(store: str):
    import mlflow

    mlflow.set_tracking_uri(store)
    return mlflow.tracking.MlflowClient()


def find_sweep(client, experiment: str, sweep: str | None):
    """The sweep parent run: by run id, by sweep directory (tag ste.sweep_id), or the latest one."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no MLflow experiment {experiment!r} in this store")
    runs = client.search_runs([exp.experiment_id], "tags.`ste.kind` = 'sweep'", order_by=["attributes.start_time DESC"])
    if sweep is None:
        if not runs:
            raise SystemExit("no sweep in this store: run one with python -m src.main -m ...")
        return exp, runs[0]
    for r in runs:
        if sweep in (r.info.run_id, r.data.tags.get("ste.sweep_id")) or str(Path(sweep).resolve()) == r.data.tags.get("ste.sweep_id"):
            return exp, r
    raise SystemExit(f"no sweep {sweep!r} (known: {', '.join(r.data.tags.get('ste.sweep_id', r.info.run_id) for r in runs[:10])})")


def load_jobs(client, experiment_id: str, parent_id: str, with_items: bool = True) -> list[JobResult]:
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`ste.kind` = 'job'",
                              order_by=["attributes.start_time ASC"])
    jobs = []
    for r in runs:
        history = {}
        for metric in [*HEADLINE, *SECTIONS, *PROCESS, *CONSTRAINED, *sorted(m for m in r.data.metrics if MAJ.match(m))]:
            if metric in r.data.metrics:
                history[metric] = {m.step: m.value for m in client.get_metric_history(r.info.run_id, metric)}
        job = JobResult(
            run_id=r.info.run_id, name=r.info.run_name or r.info.run_id[:8], status=r.info.status,
            choices={k[len("choice."):]: v for k, v in r.data.params.items() if k.startswith("choice.")}, history=history,
        )
        if with_items and job.final_iteration is not None:
            job.items = _items(client, r.info.run_id, job.final_iteration)
        jobs.append(job)
    return jobs


def _items(client, run_id: str, iteration: int) -> dict[str, dict[str, float]]:
    """Per-item scores of the final iteration, from the evaluation data logged as artifacts."""
    import mlflow

    out = {}
    for bench in ITEM_BENCHMARKS:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"data/{bench}_iter{iteration}/data.jsonl")
        except Exception:  # not logged (benchmark disabled, or the job died before it)
            continue
        with open(path) as f:
            out[bench] = item_scores([json.loads(line) for line in f if line.strip()])
    return out


# ------------------------------------------------------------------------------------------ building
def differing_choices(jobs: list[JobResult]) -> list[str]:
    keys = sorted({k for j in jobs for k in j.choices})
    return [k for k in keys if len({j.choices.get(k) for j in jobs}) > 1] or keys[:1]


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def label(job: JobResult, axes: list[str]) -> str:
    """A job named by the choices that differ across the sweep (run names hold every override)."""
    return " ".join(f"{a}={job.choices.get(a)}" for a in axes) or job.name


def other_readings(jobs: list[JobResult]) -> list[str]:
    """The constrained-choice and majority-vote metrics some job logged."""
    return [m for m in CONSTRAINED + sorted({m for j in jobs for m in j.history if MAJ.match(m)}) if any(m in j.history for j in jobs)]


def table_rows(jobs: list[JobResult]) -> list[dict[str, Any]]:
    axes = differing_choices(jobs)
    base = jobs[0] if jobs else None
    rows = []
    for j in jobs:
        row: dict[str, Any] = {"job": label(j, axes), "run_id": j.run_id, "status": j.status, **{a: j.choices.get(a) for a in axes},
                               "iterations": j.final_iteration}
        for m in HEADLINE:
            first, last = j.at(m, 0), j.final(m)
            row[f"{m}@0"], row[f"{m}@final"], row[f"{m}@best"] = first, last, j.best(m)
            row[f"{m} Δ"] = (last - first) if first is not None and last is not None else None
        for m in other_readings([j]):
            row[f"{m}@final"] = j.final(m)
        for bench in ITEM_BENCHMARKS:
            scores = list(j.items.get(bench, {}).values())
            if scores:
                _, lo, hi = bootstrap_ci(scores)
                row[f"{bench} 95% CI"] = f"[{lo:.3f}, {hi:.3f}]"
            if base is not None and j is not base and bench in j.items and bench in base.items:
                t = paired_test(base.items[bench], j.items[bench])
                row[f"{bench} vs first job"] = f"{t['delta']:+.3f} [{t['lower']:+.3f}, {t['upper']:+.3f}] p={t['p_value']:.3f} (n={int(t['n_items'])})"
        rows.append(row)
    return rows


def markdown(title: str, jobs: list[JobResult], rows: list[dict[str, Any]], plots: list[str]) -> str:
    lines = [f"# Sweep report: {title}", ""]
    if not rows:
        return "\n".join(lines + ["No jobs were logged for this sweep."])
    axes = differing_choices(jobs)
    cols = ["job", "status", *axes, "iterations"]
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
        lines += ["", "CI: 95% percentile bootstrap over items. Paired: mean per-item difference vs the first job with a "
                      "paired-bootstrap 95% interval and a sign-flip permutation p-value."]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(jobs: list[JobResult], out: Path) -> list[str]:
    axes_names = differing_choices(jobs)
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

    files.append(curves(["filter/keep_rate", "judge/text_parse_fail", "synthetic/parse_fail"], "keep_rate_and_parse_failures.png", (-0.05, 1.05)))
    return files


def build(store: str, sweep: str | None = None, out: Path | None = None, experiment: str = "ste", results_dir: Path = Path("results")) -> Path:
    """Write the report of one sweep from the store alone; return its directory."""
    client = _client(store)
    exp, parent = find_sweep(client, experiment, sweep)
    jobs = load_jobs(client, exp.experiment_id, parent.info.run_id)
    sweep_id = parent.data.tags.get("ste.sweep_id", parent.info.run_id)
    name = parent.data.tags.get("ste.sweep_name") or "-".join(Path(sweep_id).parts[-2:])
    out = Path(out) if out else results_dir / "reports" / name
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(jobs)
    plots = plot(jobs, out) if jobs else []
    (out / "report.md").write_text(markdown(f"{name} ({len(jobs)} jobs, sweep {sweep_id})", jobs, rows, plots))
    with open(out / "report.csv", "w", newline="") as f:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
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
        from .tracking import TrackingConfig, store_uri
        from .config import typed

        tcfg = typed(TrackingConfig, config.tracking, "tracking")
        results = Path(str(config.results_dir)).expanduser().resolve()
        sweep_dir = str(Path(OmegaConf.select(config, "hydra.sweep.dir")).resolve())
        try:
            build(store_uri(tcfg, results), sweep_dir, experiment=tcfg.experiment, results_dir=results)
        except SystemExit as e:  # every job failed before logging: nothing to report, not an error of its own
            log.warning("report: %s", e)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", nargs="?", help="sweep directory (hydra.sweep.dir) or parent run id; default: the latest sweep")
    p.add_argument("--results-dir", default="results", help="where mlflow.db lives and reports/ is written")
    p.add_argument("--store", default=None, help="MLflow tracking URI (default: sqlite:///<results-dir>/mlflow.db)")
    p.add_argument("--experiment", default="ste")
    p.add_argument("--out", default=None, help="output directory (default: <results-dir>/reports/<sweep name>)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = Path(a.results_dir).expanduser().resolve()
    store = a.store or f"sqlite:///{results / 'mlflow.db'}"
    print(build(store, a.sweep, Path(a.out) if a.out else None, a.experiment, results) / "report.md")


if __name__ == "__main__":
    main()

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
import logging
import math
import re
from pathlib import Path
from typing import Any

from src.report.store import _client, DATA_CHECKS, find_sweep, HEADLINE, job_runs, JobResult, load_jobs, SECTIONS, VOTE_K_CURVES
from src.report.numbers import axes, label, other_readings, replicates, table_rows, vote_k_benches, vote_k_series

log = logging.getLogger(__name__)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


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

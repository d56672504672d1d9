"""Sweep reports, rebuilt from the MLflow store alone: reading the runs (store), the numbers (numbers), and the
markdown, CSV and plots (render).

    python -m src.report                      # the latest sweep in results/mlflow.db
    python -m src.report <sweep dir | parent run id> [--store sqlite:///...] [--out DIR]
    python -m src.report --tag choice.filter=all  # any set of runs chosen by tag; no sweep in the store: the latest run

The Hydra callback `ReportCallback` runs it at the end of every multirun. The names below are the package's API
(the notebook and the callback use them).
"""
from src.report.numbers import (axes, differing_choices, interval, label, other_readings, paired, replicates, table_rows,
                                value_of, vote_k_benches, vote_k_series)
from src.report.render import ReportCallback, build, main, markdown, plot
from src.report.store import (CONSTRAINED, DATA_CHECKS, DRIFT, HEADLINE, ITEM_BENCHMARKS, ITEM_METRICS, MAJ, PROCESS, SECTIONS,
                              VOTE_K, VOTE_K_CURVES, JobResult, current_names, find_sweep, job_runs, load_jobs, mtbench_items)

__all__ = [name for name in dir() if not name.startswith("_")]

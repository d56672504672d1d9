"""Reading a report's runs from the MLflow store: which runs (a sweep's jobs, a tag, the latest run), each job's
metric histories and choices (`JobResult`), and the per-item scores of its last evaluated iteration. The metric
names a report reads are declared here; old names are read under the current ones."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from src.benchmarks import HEADLINE_METRIC
from src.rules.stats import item_scores
from src.benchmarks.rewardbench import WEIGHTS_DEFAULT

# Headline metrics: the judgment text under each benchmark's official rule (docs/benchmarks.md).
HEADLINE = [*HEADLINE_METRIC.values(), "mtbench/agreement_s2"]

# Other readings of the same judgments, shown in their own columns, never as the headline: the constrained-choice
# reading (eval.verdict=constrained) and majority vote over k samples (rewardbench/overall_maj<k>, found by name).
CONSTRAINED = ["synthetic/constrained/accuracy", "rewardbench/constrained/overall", "mtbench/constrained/agreement_s1",
               "mtbench/constrained/agreement_s2"]

MAJ = re.compile(r"^(rewardbench/(constrained/)?overall|synthetic/accuracy)_maj\d+$")

SECTIONS = ["rewardbench/chat", "rewardbench/chat_hard", "rewardbench/safety", "rewardbench/reasoning"]

# filter/keep_rate: kept examples per judged (pair, order); filter/examples_per_judgment: per sampled judgment (<= 1/n)
PROCESS = ["filter/keep_rate", "filter/examples_per_judgment", "judge/text_parse_fail", "judge/correct_rate", "synthetic/parse_fail", "rewardbench/parse_fail", "train/loss"]

ITEM_BENCHMARKS = HEADLINE_METRIC

# The reported numbers that get an interval from per-item data, and the benchmark whose items they resample.
ITEM_METRICS = {**{m: b for b, m in HEADLINE_METRIC.items()}, "mtbench/agreement_s2": "mtbench"}

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
    rb_weights: str = WEIGHTS_DEFAULT

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

"""Sweep reports are built from the MLflow store alone, failed and unfinished jobs included."""
import json

from src.report import build


def _fake_sweep(store_dir):
    """A sweep as the pipeline logs it: a parent run, two finished jobs and one that died after iteration 0."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{store_dir / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment("ste", artifact_location=(store_dir / "art").as_uri())
    parent = client.create_run(exp, run_name="filters-x", tags={"ste.kind": "sweep", "ste.sweep_id": "/sweeps/x", "ste.sweep_name": "filters-x"})
    pid = parent.info.run_id
    for filt, accs, status in [("correct", [0.5, 0.7], "FINISHED"), ("all", [0.5, 0.6], "FINISHED"), ("consistent", [0.5], "FAILED")]:
        run = client.create_run(exp, run_name=f"filter={filt}", tags={"ste.kind": "job", "mlflow.parentRunId": pid})
        rid = run.info.run_id
        client.log_param(rid, "choice.filter", filt)
        client.log_param(rid, "choice.seed", "tiny_random")
        for step, acc in enumerate(accs):
            client.log_metric(rid, "synthetic/accuracy", acc, step=step)
            client.log_metric(rid, "rewardbench/overall", acc - 0.1, step=step)
            client.log_metric(rid, "rewardbench/chat", acc, step=step)
            client.log_metric(rid, "rewardbench/constrained/overall", 0.9, step=step)  # another reading
            client.log_metric(rid, "rewardbench/overall_maj32", 0.55, step=step)
        final = len(accs) - 1
        rows = [{"item_id": f"i{k}", "order": o, "verdict": "A" if (k < 10 * accs[-1]) == (o == "chosen_first") else "B",
                 "chosen_label": "A" if o == "chosen_first" else "B"} for k in range(10) for o in ("chosen_first", "chosen_second")]
        path = store_dir / f"{filt}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        client.log_artifact(rid, str(path), f"data/synthetic_iter{final}")
        # log_artifact keeps the file name; the pipeline's file is data.jsonl
        (store_dir / "data.jsonl").write_text(path.read_text())
        client.log_artifact(rid, str(store_dir / "data.jsonl"), f"data/synthetic_iter{final}")
        client.set_terminated(rid, status)
    return pid


def test_report_from_store_lists_failed_jobs_and_compares(tmp_path):
    pid = _fake_sweep(tmp_path)
    out = build(f"sqlite:///{tmp_path / 'mlflow.db'}", "/sweeps/x", tmp_path / "report")
    md = (out / "report.md").read_text()
    assert "filter=correct | FINISHED" in md and "filter=consistent | FAILED" in md
    assert "| 0.500 | 0.700 | 0.200 |" in md  # correct: iteration 0, final, delta
    assert "synthetic/accuracy vs first job" in md and "p=" in md
    # the constrained and majority-vote readings have their own table, after the headline one
    headline, other = md.split("## Other readings")
    assert "0.900" not in headline and "constrained" not in headline.split("## Results")[1]
    assert "rewardbench/constrained/overall@final | rewardbench/overall_maj32@final" in other and "| 0.900 | 0.550 |" in other
    assert {"metrics_vs_iteration.png", "rewardbench_sections.png", "keep_rate_and_parse_failures.png", "report.csv"} <= {p.name for p in out.iterdir()}
    # Rebuilding gives the same report; the sweep's parent run carries it and is closed as FAILED (one job failed).
    again = build(f"sqlite:///{tmp_path / 'mlflow.db'}", pid, tmp_path / "report2")
    assert (again / "report.md").read_text() == md
    import mlflow

    client = mlflow.tracking.MlflowClient()
    assert client.get_run(pid).info.status == "FAILED"
    assert "report" in {a.path for a in client.list_artifacts(pid)}


def _job(client, exp, name, overrides, accs, parent=None, rb_scores=None, tmp=None):
    """A job run as the pipeline logs it: choices as params, overrides as the ste.overrides tag, metrics per step,
    and optionally RewardBench per-item rows (subset in `extra`) for its final iteration."""
    tags = {"ste.kind": "job", "ste.overrides": json.dumps(overrides)}
    if parent:
        tags["mlflow.parentRunId"] = parent
    rid = client.create_run(exp, run_name=name, tags=tags).info.run_id
    client.log_param(rid, "choice.filter", "correct")
    for step, acc in enumerate(accs):
        client.log_metric(rid, "synthetic/accuracy", acc, step=step)
        client.log_metric(rid, "rewardbench/overall", 1 - acc, step=step)
    if rb_scores is not None:
        d = tmp / rid
        d.mkdir()
        rows = [{"item_id": f"{s}-{k}", "order": "chosen_first", "verdict": "A" if ok else "B", "chosen_label": "A",
                 "extra": {"subset": s}} for s, oks in rb_scores.items() for k, ok in enumerate(oks)]
        (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        client.log_artifact(rid, str(d / "data.jsonl"), f"data/rewardbench_iter{len(accs) - 1}")
    client.set_terminated(rid, "FINISHED")
    return rid


def test_jobs_are_labelled_by_every_differing_override(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment("ste", artifact_location=(tmp_path / "art").as_uri())
    pid = client.create_run(exp, run_name="s", tags={"ste.kind": "sweep", "ste.sweep_id": "/s", "ste.sweep_name": "s"}).info.run_id
    # a sweep over non-group axes: iterations x random_seed (the group choices are identical)
    for it in (1, 3):
        for seed in (0, 1):
            _job(client, exp, f"it{it}-s{seed}", [f"iterations={it}", f"random_seed={seed}", "dataset.limit=6"],
                 [0.5] * (it + 1), parent=pid)
    md = (build(f"sqlite:///{tmp_path / 'mlflow.db'}", "/s", tmp_path / "r") / "report.md").read_text()
    results = md.split("## Results")[1].split("\n## ")[0]
    labels = {line.split(" | ")[0].lstrip("| ") for line in results.splitlines() if line.startswith("| iterations=")}
    assert labels == {"iterations=1 random_seed=0", "iterations=1 random_seed=1", "iterations=3 random_seed=0", "iterations=3 random_seed=1"}
    assert "dataset.limit" not in md  # the same in every job: not an axis


def test_selection_is_on_synthetic_never_on_the_benchmark(tmp_path):
    import mlflow

    from src.report import load_jobs, table_rows

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment("ste", artifact_location=(tmp_path / "art").as_uri())
    # synthetic accuracy peaks at iteration 1, the benchmark (1 - acc) at iteration 0
    rid = _job(client, exp, "one", [], [0.5, 0.9, 0.6])
    (row,) = table_rows(load_jobs(client, [client.get_run(rid)], with_items=False))
    assert row["selected_iteration"] == 1
    assert abs(row["rewardbench/overall@selected"] - 0.1) < 1e-9 and abs(row["rewardbench/overall@final"] - 0.4) < 1e-9
    assert not any(k.endswith("@best") for k in row)


def test_single_run_store_and_tag_selection(tmp_path):
    """No sweep in the store (the quick start): the latest run is reported; --tag picks any set of runs. RewardBench
    intervals are on the official section-weighted overall."""
    import mlflow

    from src.benchmarks.rewardbench import overall, section_scores

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment("ste", artifact_location=(tmp_path / "art").as_uri())
    subsets = {"alpacaeval-easy": [1, 1, 0, 1], "llmbar-natural": [0, 1, 0, 0], "donotanswer": [1, 1, 1, 0],
               "math-prm": [1, 0, 1, 1], "hep-python": [0, 0, 1, 0]}
    first = _job(client, exp, "first", [], [0.5, 0.6], rb_scores=subsets, tmp=tmp_path)
    flipped = {s: [1 - x for x in v] for s, v in subsets.items()}
    last = _job(client, exp, "last", ["filter=all"], [0.5, 0.7], rb_scores=flipped, tmp=tmp_path)
    client.set_tag(first, "team", "a")
    client.set_tag(last, "team", "a")

    md = (build(store, None, tmp_path / "single") / "report.md").read_text()
    assert "run last (1 jobs)" in md
    row = md.split("## Uncertainty")[1]
    lo, hi = [float(x) for x in row.split("[", 1)[1].split("]", 1)[0].split(",")]
    official = overall(section_scores({s: sum(v) / len(v) for s, v in flipped.items()}))
    plain = sum(sum(v) for v in flipped.values()) / 20
    assert lo <= official <= hi and abs(official - plain) > 0.05  # the interval is around the official number

    md = (build(store, None, tmp_path / "tagged", tag="team=a") / "report.md").read_text()
    assert "runs tagged team=a (2 jobs)" in md and "rewardbench/overall vs first job" in md


def _mtbench_rows(seed: int, n_keys: int = 12) -> list[dict]:
    """MT-Bench evaluation rows as the evaluate stage writes them (one per key and order, expert votes in `extra`),
    on real expert votes, with seeded arbitrary verdicts."""
    import random

    from src.benchmarks import mtbench
    from tests.conftest import DATA_ROOT

    rows = mtbench.load_mtbench_human(str(DATA_ROOT / "mtbench" / "human_judgments.jsonl.gz"), require_conversations=False)
    rng = random.Random(seed)
    out = []
    for r in mtbench.stratified_slice(rows, n_keys, seed=0):
        key = f"{r['question_id']}/{r['model_a']}/{r['model_b']}/t{r['turn']}"
        extra = {**{k: r[k] for k in ("question_id", "model_a", "model_b", "turn")}, "human_votes": r["human_votes"]}
        for order in ("ab", "ba"):
            out.append({"benchmark": "mtbench", "item_id": key, "order": order, "verdict": rng.choice(["A", "B", None]),
                        "chosen_label": "", "extra": extra})
    return out


def test_mtbench_intervals_and_seed_replicates(tmp_path):
    """A `random_seed=0,1,2` sweep: MT-Bench agreement gets an interval and a paired test (keys resampled, pooled
    over comparisons), and the replicate section shows the spread across seeds beside the item-bootstrap width."""
    import statistics

    import mlflow

    from src.benchmarks import mtbench
    from src.report import load_jobs, mtbench_items, replicates

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment("ste", artifact_location=(tmp_path / "art").as_uri())
    pid = client.create_run(exp, run_name="seeds", tags={"ste.kind": "sweep", "ste.sweep_id": "/seeds", "ste.sweep_name": "seeds"}).info.run_id
    logged = {}
    for seed in (0, 1, 2):
        rid = _job(client, exp, f"s{seed}", [f"random_seed={seed}", "iterations=1"], [0.5, 0.5 + 0.1 * seed], parent=pid)
        rows = _mtbench_rows(seed)
        humans = mtbench.human_rows_from_keyed({**{k: r["extra"][k] for k in ("question_id", "model_a", "model_b", "turn")},
                                                "human_votes": r["extra"]["human_votes"]} for r in rows if r["order"] == "ab")
        m = mtbench.mtbench_metrics([{**r["extra"], "order": r["order"], "verdict": r["verdict"]} for r in rows], humans)
        client.log_metric(rid, "mtbench/agreement_s1", m["mtbench/agreement_s1"], step=1)
        logged[seed] = m["mtbench/agreement_s1"]
        d = tmp_path / f"mt{seed}"
        d.mkdir()
        (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        client.log_artifact(rid, str(d / "data.jsonl"), "data/mtbench_iter1")
        # the per-key counts the interval resamples pool to the logged agreement
        items = mtbench_items(rows)
        assert len(items) == 12 and {k[0] for k in items} == {"turn1", "turn2"}
        agree, total = (sum(v["s1"][i] for v in items.values()) for i in (0, 1))
        assert agree / total == logged[seed]

    out = build(store, "/seeds", tmp_path / "r")
    md = (out / "report.md").read_text()
    unc = md.split("## Uncertainty")[1].split("## Replicates")[0]
    assert "mtbench/agreement_s1 95% CI" in unc and "mtbench/agreement_s2 95% CI" in unc
    assert "mtbench/agreement_s1 vs first job" in unc and "(n=12)" in unc
    first = [line for line in unc.splitlines() if line.startswith("| random_seed=0 |")][0]
    header = [line for line in unc.splitlines() if line.startswith("| job |")][0].split(" | ")
    lo, hi = (float(x) for x in first.split(" | ")[header.index("mtbench/agreement_s1 95% CI")].strip("[] ").split(","))
    assert lo <= logged[0] <= hi and hi - lo > 0.05

    rep = md.split("## Replicates")[1]
    (row,) = replicates(load_jobs(client, [client.get_run(r.info.run_id) for r in client.search_runs(
        [exp], f"tags.`mlflow.parentRunId` = '{pid}'")]))
    assert row["seeds"].split(",") == sorted(row["seeds"].split(","))
    vals = list(logged.values())
    expect = f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]"
    assert row["mtbench/agreement_s1 across seeds"] == expect and expect in rep
    assert row["mtbench/agreement_s1 item CI width"] > 0.05
    syn = [0.5, 0.6, 0.7]
    assert row["synthetic/accuracy across seeds"] == f"{statistics.mean(syn):.3f} ± {statistics.stdev(syn):.3f} [0.500, 0.700]"


def test_no_replicate_section_without_a_seed_axis(tmp_path):
    pid = _fake_sweep(tmp_path)
    md = (build(f"sqlite:///{tmp_path / 'mlflow.db'}", pid, tmp_path / "report") / "report.md").read_text()
    assert "## Replicates" not in md


def test_training_data_checks_are_shown_beside_judge_accuracy(tmp_path):
    """decontam/* and audit/* (logged once, at step 0, where the pool allows) get their own table."""
    import mlflow

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment("ste", artifact_location=(tmp_path / "art").as_uri())
    rid = _job(client, exp, "gsm8k", ["dataset=gsm8k"], [0.5, 0.75])
    for name, value in {"decontam/matched": 3, "audit/pairs": 8, "audit/chosen_wrong": 0.25, "audit/clean": 0.625}.items():
        client.log_metric(rid, name, value, step=0)
    client.log_metric(rid, "judge/correct_rate", 0.6875, step=1)
    md = (build(store, None, tmp_path / "r") / "report.md").read_text()
    table = md.split("## Training-data checks")[1].split("\n## ")[0]
    assert "| audit/chosen_wrong | audit/clean | audit/pairs | decontam/matched | judge/correct_rate@1 |" in table
    assert "| 0.250 | 0.625 | 8.000 | 3.000 | 0.688 | 0.750 |" in table
    plain = _job(client, exp, "code", ["dataset=code"], [0.5, 0.6])
    assert plain and "## Training-data checks" not in (build(store, None, tmp_path / "r2") / "report.md").read_text()


def test_audit_judge_estimates_are_shown_with_the_training_data_checks(tmp_path):
    """audit/judge/* (audit=judge, pools without references) get columns of their own beside judge accuracy."""
    import mlflow

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment("ste", artifact_location=(tmp_path / "art").as_uri())
    rid = _job(client, exp, "code", ["dataset=code", "audit=judge"], [0.5, 0.75])
    for name, value in {"audit/judge/pairs": 6, "audit/judge/prefers_rejected": 0.5, "audit/judge/undecided": 1 / 6,
                        "audit/judge/votes": 36}.items():
        client.log_metric(rid, name, value, step=0)
    client.log_metric(rid, "judge/correct_rate", 0.625, step=1)
    table = (build(store, None, tmp_path / "r") / "report.md").read_text().split("## Training-data checks")[1].split("\n## ")[0]
    assert "| audit/judge/pairs | audit/judge/prefers_rejected | audit/judge/undecided | judge/correct_rate@1 |" in table
    assert "| 6.000 | 0.500 | 0.167 | 0.625 | 0.750 |" in table


def test_paired_is_honest_where_the_number_or_its_interval_is_undefined():
    """One item per RewardBench subset: the paired interval cannot vary, so it is NaN (the p-value stays); an MT-Bench
    agreement with no decisive verdict in one run: no paired test (was printed as '+nan [+nan, +nan] p=nan')."""
    import math

    from src.benchmarks.rewardbench import SUBSET_SIZES as SUBSET_COUNTS
    from src.report.numbers import _paired_cell, paired

    a = {(s, "1"): 1.0 for s in SUBSET_COUNTS}
    b = {(s, "1"): (0.0 if s.startswith("hep") else 1.0) for s in SUBSET_COUNTS}
    t = paired("rewardbench/overall", a, b)
    assert t["delta"] < 0 and math.isnan(t["lower"]) and math.isnan(t["upper"]) and 0 < t["p_value"] <= 1
    assert "[" not in _paired_cell(t) and "p=" in _paired_cell(t)
    two = {**a, **{(s, "2"): 1.0 for s in SUBSET_COUNTS}}
    t2 = paired("rewardbench/overall", two, {**b, **{(s, "2"): 0.0 for s in SUBSET_COUNTS}})
    assert not math.isnan(t2["lower"]) and "[" in _paired_cell(t2)
    decided = {("turn1", "q1"): {"s1": (1, 1), "s2": (1, 1)}, ("turn1", "q2"): {"s1": (0, 1), "s2": (1, 1)}}
    undecided = {k: {"s1": (0, 0), "s2": (0, 0)} for k in decided}
    assert paired("mtbench/agreement_s1", decided, undecided) is None
    assert paired("mtbench/agreement_s1", decided, decided)["delta"] == 0.0


def test_rewardbench_intervals_use_the_runs_own_section_weights(tmp_path):
    """The report recomputes the overall on resamples with the weights the run logged (eval.rewardbench.weights):
    with xstest refuse/respond scoring apart, v0.1.2's swapped counts move the Safety section, so the intervals
    differ; a run logged before the param existed was scored with v0.1.2's."""
    import mlflow

    from src.benchmarks.rewardbench import SUBSET_SIZES
    from src.report import interval, load_jobs, paired

    items = {(s, str(i)): float(s != "xstest-should-respond" and (i + len(s)) % 3 > 0) for s in SUBSET_SIZES for i in range(4)}
    new, old = interval("rewardbench/overall", items, "v0.1.3"), interval("rewardbench/overall", items, "v0.1.2")
    assert new != old
    worse = {**items, **{k: 0.0 for k in items if k[0] == "xstest-should-refuse"}}
    assert paired("rewardbench/overall", items, worse, "v0.1.2")["delta"] < paired("rewardbench/overall", items, worse, "v0.1.3")["delta"] < 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment("ste", artifact_location=(tmp_path / "art").as_uri())
    logged, unlogged = _job(client, exp, "logged", [], [0.5]), _job(client, exp, "unlogged", [], [0.5])
    client.log_param(logged, "eval.rewardbench.weights", "v0.1.3")
    jobs = load_jobs(client, [client.get_run(logged), client.get_run(unlogged)], with_items=False)
    assert [j.rb_weights for j in jobs] == ["v0.1.3", "v0.1.2"]


def test_runs_logged_under_the_old_names_are_read_under_the_new_ones(tmp_path):
    """Before the renames, `audit/neither` held the clean share and `audit/both` the inverted one, and
    `filter/keep_rate` was kept examples / judgments. A run that logged them is read as `audit/clean`,
    `audit/inverted` and `filter/examples_per_judgment` (what the numbers are), and shows no `filter/keep_rate`;
    a new run's numbers are read as logged."""
    import mlflow

    from src.report.store import _client, load_jobs

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    client = mlflow.tracking.MlflowClient()
    exp = client.create_experiment("ste", artifact_location=(tmp_path / "art").as_uri())
    old = _job(client, exp, "old", ["dataset=gsm8k"], [0.5, 0.75])
    for name, value in {"audit/pairs": 8, "audit/both": 0.125, "audit/neither": 0.625}.items():
        client.log_metric(old, name, value, step=0)
    client.log_metric(old, "filter/keep_rate", 0.25, step=1)
    new = _job(client, exp, "new", ["dataset=math"], [0.5, 0.75])
    for name, value in {"audit/pairs": 8, "audit/inverted": 0.25, "audit/clean": 0.5}.items():
        client.log_metric(new, name, value, step=0)
    client.log_metric(new, "filter/keep_rate", 0.5, step=1)
    client.log_metric(new, "filter/examples_per_judgment", 0.25, step=1)
    jobs = {j.name: j for j in load_jobs(_client(store), [client.get_run(old), client.get_run(new)], with_items=False)}
    assert jobs["old"].at("audit/clean", 0) == 0.625 and jobs["old"].at("audit/inverted", 0) == 0.125
    assert jobs["old"].at("filter/examples_per_judgment", 1) == 0.25 and "filter/keep_rate" not in jobs["old"].history
    assert not {"audit/both", "audit/neither"} & set(jobs["old"].history)
    assert jobs["new"].at("audit/clean", 0) == 0.5 and jobs["new"].at("audit/inverted", 0) == 0.25
    assert jobs["new"].at("filter/keep_rate", 1) == 0.5 and jobs["new"].at("filter/examples_per_judgment", 1) == 0.25
    md = (build(store, None, tmp_path / "r", tag="ste.kind=job") / "report.md").read_text()
    table = md.split("## Training-data checks")[1].split("\n## ")[0]
    assert "| audit/clean | audit/inverted | audit/pairs |" in table and "audit/neither" not in md

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
    assert "synthetic vs first job" in md and "p=" in md
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

"""Tracking at the edge: MLflow store layout, params, and the wandb mirror in offline mode."""
from src.tracking import Tracker, TrackingConfig, flatten


def test_flatten_nested_config():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": [{"e": 3}]}) == {"a.b": 1, "a.c": [1, 2], "d.0.e": 3}


def test_mlflow_run_and_wandb_offline_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = Tracker(TrackingConfig(wandb=True, wandb_mode="offline"), tmp_path)
    t.start("job", {"choice.filter": "correct", "long": "x" * 900}, {"choice.filter": "correct"}, sweep=("/sweep/a", "sweep a"))
    t.metrics({"synthetic/accuracy": 0.5, "skipped": None, "nan": float("nan")}, step=0)
    t.metrics({"synthetic/accuracy": 0.75}, step=1)
    with t.child("train-iter1") as active:
        assert active
    run_id = t.run_id
    t.end()

    import mlflow

    client = mlflow.tracking.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and len(run.data.params["long"]) == 500  # params are capped, not dropped
    assert [m.value for m in client.get_metric_history(run_id, "synthetic/accuracy")] == [0.5, 0.75]
    assert "nan" not in run.data.metrics and "skipped" not in run.data.metrics
    parent = run.data.tags["mlflow.parentRunId"]
    assert client.get_run(parent).data.tags["ste.kind"] == "sweep"
    exp = run.info.experiment_id
    (child,) = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert child.data.tags["ste.kind"] == "train"
    assert (tmp_path / "mlflow.db").exists()
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].glob("*.wandb"))

"""Tracking at the edge: MLflow store layout, params, and the wandb mirror in offline mode."""
import pytest

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


def test_inputs_are_logged_as_datasets_whose_digest_follows_the_slice_not_the_judge(tmp_path):
    from src.tracking import input_rows

    def rows(verdict, items=("a", "b")):
        return [{"benchmark": "rewardbench", "item_id": i, "order": "chosen_first", "verdict": verdict, "chosen_label": "A",
                 "extra": {"subset": "donotanswer", "section": "Safety", "text": f"judgment {verdict}", "tokens": 7}} for i in items]

    assert input_rows(rows("A"))[0] == {"item_id": "a", "order": "chosen_first", "chosen_label": "A", "subset": "donotanswer",
                                        "section": "Safety"}
    t = Tracker(TrackingConfig(), tmp_path)
    t.start("job", {}, {}, sweep=None)
    for verdict, items, name in [("A", ("a", "b"), "rb-judge1"), ("B", ("a", "b"), "rb-judge2"), ("A", ("a", "c"), "rb-other")]:
        t.dataset(input_rows(rows(verdict, items)), name, "/data/rewardbench/filtered.jsonl.gz", "evaluation")
    run_id = t.run_id
    t.end()
    import mlflow

    inputs = {d.dataset.name: d.dataset for d in mlflow.tracking.MlflowClient().get_run(run_id).inputs.dataset_inputs}
    assert inputs["rb-judge1"].digest == inputs["rb-judge2"].digest != inputs["rb-other"].digest
    assert "filtered.jsonl.gz" in inputs["rb-other"].source


def test_model_weights_as_tags_and_an_adapter_as_artifact(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    t = Tracker(TrackingConfig(), tmp_path)
    t.start("job", {}, {}, sweep=None)
    t.model("judge", tmp_path / "base", "0123abcd")
    t.model("iter1", adapter, "4567ef00", artifact=True)
    run_id = t.run_id
    t.end()
    import mlflow

    client = mlflow.tracking.MlflowClient()
    tags = client.get_run(run_id).data.tags
    assert tags["weights.judge"] == "0123abcd" and tags["weights.judge.path"] == str(tmp_path / "base")
    assert tags["weights.iter1"] == "4567ef00"
    assert [a.path for a in client.list_artifacts(run_id, "models/iter1/adapter")] == ["models/iter1/adapter/adapter_model.safetensors"]
    assert not client.list_artifacts(run_id, "models/judge")  # a base model is recorded, never copied


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "KILLED"), (ValueError, "FAILED"), (None, "FINISHED")])
def test_a_training_child_run_ends_as_its_parent_does(tmp_path, error, status):
    """Issue 21: after SIGTERM (which unwinds like Ctrl-C) the training child run was FAILED while its parent was
    KILLED; an interrupted child is KILLED, an error FAILED, a normal end FINISHED."""
    import mlflow

    t = Tracker(TrackingConfig(), tmp_path)
    t.start("job", {}, {}, None)
    parent = t.run_id
    try:
        with t.child("train-iter1") as active:
            assert active
            child = mlflow.active_run().info.run_id
            if error is not None:
                raise error()
    except (KeyboardInterrupt, ValueError):
        pass
    assert mlflow.active_run().info.run_id == parent  # the parent is active again
    t.end("KILLED" if error is KeyboardInterrupt else "FINISHED")
    client = mlflow.tracking.MlflowClient()
    assert client.get_run(child).info.status == status

"""notebooks/analysis.ipynb runs headless against a small fake sweep and draws its tables and plots."""
from pathlib import Path

import pytest

from tests.e2e.test_report import _fake_sweep
from tests.conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"


@pytest.fixture
def python3_kernel(tmp_path, monkeypatch):
    """A `python3` kernelspec that runs this interpreter, first on the Jupyter path.

    Nothing is installed globally: on a clean machine (only `pip install -e .[dev]`) this works as well as on one
    where a user-level `python3` kernelspec points at some other Python.
    """
    from ipykernel.kernelspec import write_kernel_spec

    jupyter_dir = tmp_path / "jupyter"
    write_kernel_spec(jupyter_dir / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # a non-inline backend (e.g. Agg in CI) would draw no outputs
    return "python3"


def _text(outputs) -> str:
    parts = []
    for o in outputs:
        if o["output_type"] == "stream":
            parts.append(o["text"])
        elif o["output_type"] in ("display_data", "execute_result"):
            parts.append(o["data"].get("text/plain", ""))
            parts.append(o["data"].get("text/html", ""))
    return "\n".join(parts)


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_on_fake_sweep(tmp_path, monkeypatch, python3_kernel):
    store = tmp_path / "store"
    store.mkdir()
    _fake_sweep(store)
    # The process plot needs one logged process metric; the parse-failure metrics stay absent (tolerated).
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ste")
    for run in client.search_runs([exp.experiment_id], "tags.`ste.kind` = 'job'"):
        for step in range(len(client.get_metric_history(run.info.run_id, "synthetic/accuracy"))):
            client.log_metric(run.info.run_id, "filter/keep_rate", 0.5 + 0.1 * step, step=step)
            client.log_metric(run.info.run_id, "rewardbench/position/frac_A", 0.6 + 0.1 * step, step=step)
        # the training-data checks (step 0) and a vote-k curve at the final iteration
        client.log_metric(run.info.run_id, "audit/chosen_wrong", 0.25, step=0)
        client.log_metric(run.info.run_id, "decontam/matched", 37, step=0)
        last = len(client.get_metric_history(run.info.run_id, "synthetic/accuracy")) - 1
        for k, acc in ((1, 0.5), (2, 0.625)):
            client.log_metric(run.info.run_id, f"synthetic/vote_k/accuracy_k{k}", acc, step=last)
            client.log_metric(run.info.run_id, f"synthetic/vote_k/tokens_k{k}", 10.0 * k, step=last)

    monkeypatch.setenv("STE_STORE", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.setenv("STE_SWEEP", "/sweeps/x")
    monkeypatch.setenv("STE_EXPERIMENT", "ste")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name=python3_kernel,
                            resources={"metadata": {"path": str(REPO)}}).execute()  # raises CellExecutionError on failure

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o["output_type"] == "error"]
    text = _text(outputs)
    assert "filters-x" in text
    for lab in ("filter=correct", "filter=all", "filter=consistent"):
        assert lab in text
    assert "FAILED" in text and "FINISHED" in text
    assert "mtbench/agreement_s1" in text  # listed as not logged, not an error
    assert "vs_first_delta" in text and "p_value" in text  # the uncertainty table
    assert "audit/chosen_wrong" in text and "decontam/matched" in text  # the training-data checks table
    images = [o for o in outputs if o["output_type"] in ("display_data", "execute_result") and "image/png" in o["data"]]
    assert len(images) >= 5  # headline, sections, process, position bias, vote-k

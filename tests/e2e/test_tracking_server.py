"""Logging through a real `mlflow server --serve-artifacts` on 127.0.0.1: a team sharing one tracking server can
open every artifact over the server's proxy, and every run records the code and packages that made it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from src.tracking import Tracker, TrackingConfig, artifact_location
from tests.conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--serve-artifacts",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_user_tracking_uri_from_the_environment(tmp_path):
    """$MLFLOW_TRACKING_URI as the user set it when the job started (mlflow itself rewrites the variable later)."""
    code = "from pathlib import Path; from src.tracking import store_uri, TrackingConfig; print(store_uri(TrackingConfig(), Path('/r')))"
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:5999"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "http://127.0.0.1:5999"
    env.pop("MLFLOW_TRACKING_URI")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "sqlite:////r/mlflow.db"


def test_artifacts_are_served_through_the_proxy(server, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    cfg = TrackingConfig(tracking_uri=server)
    results = tmp_path / "results"
    assert artifact_location(cfg, results) is None  # the server picks the (proxied) artifact root
    t = Tracker(cfg, results)
    t.start("job", {"choice.seed": "tiny_random"}, {"choice.seed": "tiny_random"}, sweep=None)
    t.text("iterations: 1\n", "config.yaml")
    t.dataset([{"id": "a", "text": "x"}, {"id": "b", "text": "y"}], "pool", "instructions/pool.jsonl", "select")
    run_id = t.run_id
    t.end()

    client = MlflowClient(tracking_uri=server)
    run = client.get_run(run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # not a file:// path only this machine can read
    # Through the server's artifact proxy, as the UI and every other client read it.
    exp = run.info.experiment_id
    with urllib.request.urlopen(f"{server}/api/2.0/mlflow-artifacts/artifacts/{exp}/{run_id}/artifacts/config.yaml", timeout=10) as r:
        assert r.read().decode() == "iterations: 1\n"
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml", tracking_uri=server, dst_path=str(tmp_path / "dl"))
    assert open(local).read() == "iterations: 1\n"
    # provenance
    tags = run.data.tags
    assert len(tags["git.commit"]) in (40, 7) or tags["git.commit"] == "unknown"
    assert tags["git.dirty"] in ("true", "false", "unknown")
    assert tags["version.torch"] and tags["version.mlflow"]
    # the pool as an MLflow dataset input with its digest
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "pool" and inp.dataset.digest
    assert [t.value for t in inp.tags if t.key == "mlflow.data.context"] == ["select"]


def _hung_server():
    """A socket that accepts connections and never answers (what a wedged server looks like from outside)."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    return srv, f"http://127.0.0.1:{srv.getsockname()[1]}"


def test_a_tracking_server_that_never_answers_stops_the_job_at_start_with_one_line(tmp_path, monkeypatch):
    """Issue 21: a server down or hung at start cost 4 and 7+ minutes of retries ending in a chain of tracebacks.
    Now the start-up check fails within its timeout with one line naming the URI and what to do."""
    import time

    import src.tracking as tracking
    from src.config import ConfigError

    for k, v in tracking.HTTP_LIMITS.items():  # what start sets for mid-run calls, undone after the test
        monkeypatch.setenv(k, v)
    srv, uri = _hung_server()
    try:
        monkeypatch.setattr(tracking, "SERVER_TIMEOUT_S", 1.0)
        t0 = time.time()
        with pytest.raises(ConfigError, match=rf"tracking server {uri} did not answer within 1 s: start it"):
            tracking.Tracker(tracking.TrackingConfig(tracking_uri=uri), tmp_path).start("job", {}, {}, None)
        assert time.time() - t0 < 10
    finally:
        srv.close()
    with pytest.raises(ConfigError, match=rf"tracking server {uri} is unreachable"):  # now closed: refused at once
        tracking.check_server(uri, timeout=1.0)

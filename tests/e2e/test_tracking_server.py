"""Logging through a real `mlflow server --serve-artifacts` on 127.0.0.1: a team sharing one tracking server can
open every artifact over the server's proxy, and every run records the code and packages that made it."""
from __future__ import annotations

import json
import os
import signal
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


def _start_server(tmp_path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on 127.0.0.1 (its store and artifacts under tmp_path), once it answers /health."""
    port = port or _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--serve-artifacts",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
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
            _stop_server(proc)
            pytest.fail(f"mlflow server did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.5)
    return proc, url


def _stop_server(proc: subprocess.Popen, how: int = signal.SIGTERM) -> None:
    """The server and its worker processes (its own session): SIGKILL is a server that dies."""
    try:
        os.killpg(proc.pid, how)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def server(tmp_path):
    proc, url = _start_server(tmp_path)
    yield url
    _stop_server(proc)


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


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_tracking_server_lost_mid_run_stops_the_job_with_one_line_and_keeps_every_stage(tmp_path, fault):
    """A server that died mid-run cost 8 minutes of retries ending in a chain of up to 10 tracebacks; one that hung
    (accepting connections, never answering) 7 minutes and more. The real CLI on the tiny model logs to a real
    server on 127.0.0.1, which is SIGKILLed (dies) or SIGSTOPped (hangs: its listening socket still accepts, nothing
    answers) once the first stage is in the cache: the job stops within a bounded time with one line (no
    traceback) and the run is noted in results_dir for the next job. For the dead server, also: every stage
    computed before is reused by a rerun without tracking, and a job on the server once it is back ends that run
    (KILLED) and clears the note."""
    from mlflow.tracking import MlflowClient

    from src.tracking import UNFINISHED
    from tests.conftest import DATA_ROOT, TINY, model_cache

    results = tmp_path / "results"
    job = [o for o in TINY if o != "tracking=none"] + ["iterations=0", "eval.rewardbench.enabled=false",
                                                       "pipeline.chunk_size=4", f"pipeline.model_cache_dir={model_cache()}"]
    env = {**os.environ, "STE_DATA_ROOT": str(DATA_ROOT), "STE_RESULTS_DIR": str(results), "WANDB_MODE": "offline",
           "HYDRA_FULL_ERROR": "0"}
    for k in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
              "MLFLOW_TRACKING_URI", "STE_FAULT_KILL"):
        env.pop(k, None)  # the job's own bounds, not the test runner's
    proc, url = _start_server(tmp_path)
    port = int(url.rsplit(":", 1)[1])
    main = [sys.executable, "-m", "src.main", *job]
    running = subprocess.Popen([*main, f"tracking.tracking_uri={url}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not list((results / "cache" / "select").glob("*/meta.json")):
            assert running.poll() is None, running.communicate()
            assert time.time() < deadline, "select never finished"
            time.sleep(0.1)
        before = {(m.parent.parent.name, m.parent.name): m.read_bytes() for m in (results / "cache").glob("*/*/meta.json")}
        if fault == "dies":
            _stop_server(proc, signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGSTOP)
        killed_at = time.time()
        out, err = running.communicate(timeout=400)  # MLflow's own defaults would retry for 8+ minutes per call
        took = time.time() - killed_at
    finally:
        if running.poll() is None:
            running.kill()
            running.communicate()
        _stop_server(proc, signal.SIGKILL)  # a stopped process group takes SIGKILL too

    assert running.returncode != 0, out[-2000:] + err[-2000:]
    # does not hang: a refused connection fails in seconds; an unanswered call after its bounded retries (30 s x 3
    # plus back-off) and the 5 s /health probe
    assert took < 300, took
    assert "Traceback" not in err and "Traceback" not in out, err[-4000:]
    lines = [line for line in (out + err).splitlines() if "stopped answering mid-run" in line]
    assert len(lines) == 1 and url in lines[0] and "rerun with tracking=none" in lines[0], err[-4000:]
    (marker,) = (results / UNFINISHED).glob("*.json")
    note = json.loads(marker.read_text())
    assert note["tracking_uri"] == url and note["run_id"] == marker.stem and note["run_id"] in lines[0]
    if fault == "hangs":
        assert "did not answer within" in lines[0], lines[0]
        return

    # The next job, without tracking: every stage committed before the death is a cache hit, and it names the run.
    rerun = subprocess.run([*main, "tracking=none"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    log = rerun.stdout + rerun.stderr
    assert "select" in {stage for stage, _ in before}
    # each step computed before the death is a cache hit (classify/<key>-<unit> are select's own units, not steps),
    # and nothing committed then was computed again (its meta.json, with its time and seconds, is the same)
    assert all(f"cached (key {key}), reused" in log for stage, key in before if stage != "classify"), (list(before), log[-3000:])
    assert all((results / "cache" / stage / key / "meta.json").read_bytes() == meta for (stage, key), meta in before.items())
    assert f"MLflow run {note['run_id']} on {url} was cut off" in log and marker.exists()

    # The server back (same store, same address): the next job tracking there ends the cut-off run and clears the note.
    proc, _ = _start_server(tmp_path, port)
    try:
        back = subprocess.run([*main, f"tracking.tracking_uri={url}"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        assert back.returncode == 0, back.stderr[-4000:]
        assert MlflowClient(url).get_run(note["run_id"]).info.status == "KILLED"
        assert not marker.exists()
    finally:
        _stop_server(proc)


def test_a_failed_call_is_called_a_lost_server_only_when_the_server_no_longer_answers(tmp_path):
    """The classification behind the one line: the server is asked (/health). One that answers means the error is
    something else (raised as it is, nothing noted); one that is gone gives TrackingLost and the note."""
    import http.server
    import threading

    import src.tracking as tracking

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{httpd.server_address[1]}"
    t = tracking.Tracker(tracking.TrackingConfig(tracking_uri=uri), tmp_path)
    t.run_id = "r1"
    try:
        err = ValueError("a bug, not the server")
        assert t._lost(err) is err and t.lost is None and t.active
    finally:
        httpd.shutdown()
        httpd.server_close()
    lost = t._lost(ConnectionError("refused"))
    assert isinstance(lost, tracking.TrackingLost) and "stopped answering mid-run (is unreachable" in str(lost)
    assert not t.active  # nothing more is sent there
    ((marker, note),) = tracking.unfinished_runs(tmp_path)
    assert marker.name == "r1.json" and note["tracking_uri"] == uri and "refused" in note["error"]

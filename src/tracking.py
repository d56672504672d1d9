"""MLflow (and optionally wandb) tracking: the only module that talks to them. Reads the `tracking` group.

One MLflow run per Hydra job; jobs of one multirun are children of a sweep parent run (tag ste.sweep_id);
training gets its own nested child run so TRL's MLflowCallback logs there and not into the job run.

Concurrency: parallel jobs (joblib sweeps, two terminals) share one store. Everything that creates shared
state (the SQLite schema, the experiment, a sweep's parent run) happens under one file lock beside the store,
so exactly one process creates each and the others find it. A job run records its host, pid and process start
time; a RUNNING run whose process is gone (kill -9, out-of-memory kill) is ended as KILLED when the next job
starts on that store.

A tracking server that stops answering mid-run (dead, or hung past the bounded HTTP retries) stops the job with one
line (`TrackingLost`); every stage computed so far is already in the cache, and the run is noted in
`<results_dir>/unfinished-runs/<run id>.json`, which the next job names at its start (and clears once that run is
ended on the server).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from src.config import knob

log = logging.getLogger(__name__)


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str | None = None
    artifact_root: str | None = None
    experiment: str = "ste"
    sample_rows: int = knob(20, "rows of each stage output logged as a sample table (0 = none)", min=0)
    wandb: bool = False
    wandb_project: str = "ste"
    wandb_mode: str = "offline"


# The user's MLFLOW_TRACKING_URI, read once at import: mlflow.set_tracking_uri() exports that variable itself, so
# read later it would name whatever store this process used last (another job's, another test's).
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def store_uri(cfg: TrackingConfig, results_dir: Path) -> str:
    """tracking.tracking_uri, else the user's $MLFLOW_TRACKING_URI (a team's `mlflow server`), else the offline
    SQLite store. Absolute: a relative sqlite:/// path would split the store per working directory."""
    return cfg.tracking_uri or _USER_TRACKING_URI or f"sqlite:///{(results_dir / 'mlflow.db').resolve()}"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


SERVER_TIMEOUT_S = 10  # the start-up check: a server that answers /health later than this is treated as down
# Mid-run, every MLflow request through a server: MLflow's defaults (120 s per request, 7 retries with backoff) turn a
# dead or hung server into 8+ minutes of retries per call; these bound a call to ~1.5 min, then the job fails with
# every computed stage kept in the cache (the user's own MLFLOW_HTTP_* settings win).
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def server_problem(uri: str, timeout: float) -> str | None:
    """Why the tracking server at `uri` is not usable now (its /health endpoint within `timeout`), or None."""
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            if r.status == 200:
                return None
            return f"answered HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"answered HTTP {e.code}"
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        return "did not answer within %g s" % timeout if isinstance(reason, (TimeoutError, socket.timeout)) else f"is unreachable ({reason})"


def check_server(uri: str, timeout: float | None = None) -> None:
    """A tracking server must answer its /health endpoint now, within `timeout`: down, refusing, or accepting
    connections and never answering, the job stops with one line before anything runs."""
    from src.config import ConfigError

    timeout = SERVER_TIMEOUT_S if timeout is None else timeout
    why = server_problem(uri, timeout)
    if why is not None:
        raise ConfigError(f"tracking server {uri} {why}: start it (mlflow server ...), point tracking.tracking_uri / "
                          f"MLFLOW_TRACKING_URI at a live one, or log to the local store (unset MLFLOW_TRACKING_URI) or not at all (tracking=none)")


class TrackingLost(Exception):
    """The tracking server stopped answering mid-run: the job stops (one line), its computed stages kept. Not an
    OSError or RuntimeError, so that no handler meant for a file or a model swallows it."""


UNFINISHED = "unfinished-runs"  # under results_dir: one <run id>.json per run a lost server left unfinished
LOST_PROBE_S = 5.0  # after a failed call through a server: is it the server (no /health within this) or the call?


def unfinished_runs(results_dir: Path) -> list[tuple[Path, dict]]:
    """The runs earlier jobs left unfinished when their tracking server stopped answering (marker file, its note)."""
    found = []
    for f in sorted((Path(results_dir) / UNFINISHED).glob("*.json")):
        try:
            found.append((f, json.loads(f.read_text())))
        except (OSError, ValueError):
            found.append((f, {"run_id": f.stem, "tracking_uri": "?", "cut_at": "?", "reason": "its note is unreadable"}))
    return found


def _tracked(method):
    """A Tracker call that talks to the store: when it fails through a server that no longer answers, the job stops
    with `TrackingLost` (one line) instead of the call's own error, and nothing more is sent there."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - classified by asking the server, re-raised as is unless it is gone
            lost = self._lost(e)
            if lost is e:
                raise
            raise lost from None

    return call


def store_error(uri: str, e: BaseException) -> Exception:
    """One line for a store that cannot be opened or written (a corrupt, read-only or full SQLite file, or an
    error a server answered), naming the store and what to do; anything else unchanged (it is a bug: traceback)."""
    from src.config import ConfigError

    cause = e
    while getattr(cause, "orig", None) is not None:  # sqlalchemy wraps the sqlite3 error
        cause = cause.orig
    text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    if type(cause).__name__ in ("DatabaseError", "OperationalError") or "database" in text.lower():
        if uri.startswith("sqlite:///"):
            path = uri[len("sqlite:///"):]
            return ConfigError(f"MLflow store {path}: {text}. Move it aside (mv {path} {path}.bad) to start a new store, "
                               f"or free the disk / fix its permissions; the stage cache is kept, a rerun reuses it")
        return ConfigError(f"MLflow store {uri}: {text}")
    return e


def artifact_location(cfg: TrackingConfig, results_dir: Path) -> str | None:
    """Where a new experiment's artifacts go. Through a tracking server: None, so the server's own root
    (`mlflow server --serve-artifacts`: mlflow-artifacts:/, proxied) serves them to every client; a file:// root
    would be readable only on the machine that logged. Offline: a folder beside the SQLite store."""
    if cfg.artifact_root:
        return cfg.artifact_root
    if is_server(store_uri(cfg, results_dir)):
        return None
    return (results_dir / "mlartifacts").resolve().as_uri()


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and any(isinstance(x, (dict, list)) for x in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out


def store_lock(results_dir: Path):
    """Exclusive across processes on this machine: held while shared tracking state is created."""
    from src.cache import file_lock

    return file_lock(Path(results_dir) / ".mlflow.lock")


def ensure_experiment(cfg: TrackingConfig, results_dir: Path) -> str:
    """Create (once, under the lock) the store's schema and the experiment; returns the experiment id.
    The first client on a fresh SQLite file runs MLflow's schema migrations: two at once collide."""
    import mlflow
    from mlflow.tracking import MlflowClient

    with store_lock(results_dir):
        mlflow.set_tracking_uri(store_uri(cfg, results_dir))
        client = MlflowClient()  # creates/migrates the schema of a fresh store
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        return client.create_experiment(cfg.experiment, artifact_location=artifact_location(cfg, results_dir))


def sweep_parent(experiment_id: str, sweep_id: str, name: str, results_dir: Path) -> str:
    """The run that groups one multirun's jobs: found or created under the store lock, so parallel jobs
    of one sweep agree on a single parent."""
    from mlflow.tracking import MlflowClient

    with store_lock(results_dir):
        client = MlflowClient()
        found = client.search_runs([experiment_id], f"tags.`ste.sweep_id` = '{sweep_id}' and tags.`ste.kind` = 'sweep'")
        if found:
            return min(found, key=lambda r: r.info.start_time).info.run_id
        run = client.create_run(experiment_id, run_name=name, tags={"ste.sweep_id": sweep_id, "ste.kind": "sweep", "ste.sweep_name": name})
        return run.info.run_id


def process_id(pid: int | None = None) -> str:
    """host:pid:start-time of a process: a pid alone can be reused by an unrelated process."""
    pid = pid or os.getpid()
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{socket.gethostname()}:{pid}:{start}"


def _gone(proc: str) -> bool:
    """Whether the process a run recorded has ended (only decidable on the host that ran it)."""
    host, pid, _ = proc.split(":", 2)
    if host != socket.gethostname():
        return False
    return not pid.isdigit() or process_id(int(pid)) != proc


def end_stale_runs(experiment_id: str) -> list[str]:
    """End RUNNING runs whose process is gone (and their nested runs) as KILLED; returns their ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=5000)
    stale = [r for r in running if "ste.proc" in r.data.tags and _gone(r.data.tags["ste.proc"])]
    ids = {r.info.run_id for r in stale}
    ids |= {r.info.run_id for r in running if r.data.tags.get("mlflow.parentRunId") in ids}
    for run_id in sorted(ids):
        client.set_tag(run_id, "ste.ended_by", "its process was gone at the next job's start (kill -9 or OOM)")
        client.set_terminated(run_id, status="KILLED")
        log.warning("tracking: run %s was left RUNNING by a process that is gone: marked KILLED", run_id)
    return sorted(ids)


# What identifies a stage's input rows (for `Tracker.dataset`): an instruction's id, text, origin and split; a
# benchmark item's id, order, correct label and where it sits in the benchmark. Not the judgments.
INPUT_FIELDS = ("id", "text", "source", "category", "split", "item_id", "order", "chosen_label")
INPUT_EXTRA = ("subset", "section", "question_id", "model_a", "model_b", "turn")


def input_rows(rows: list[dict]) -> list[dict]:
    """The input part of a stage's rows: the selected instructions, or a benchmark slice without its judgments, so
    the dataset digest changes when the slice does and not when the judge does."""
    out = []
    for r in rows:
        row = {k: r[k] for k in INPUT_FIELDS if k in r}
        row.update({k: r["extra"][k] for k in INPUT_EXTRA if k in (r.get("extra") or {})})
        out.append(row)
    return out


class Tracker:
    """Everything a job logs. With tracking disabled every method is a no-op, so stages never branch on it."""

    def __init__(self, cfg: TrackingConfig, results_dir: Path):
        self.cfg, self.results_dir = cfg, Path(results_dir)
        self.run_id: str | None = None
        self.lost: str | None = None  # why the tracking server stopped answering mid-run: nothing more is sent there
        self._wandb = None

    @property
    def active(self) -> bool:
        return self.cfg.enabled and self.run_id is not None and self.lost is None

    def _lost(self, e: Exception) -> Exception:
        """`TrackingLost` when `e` came from a tracking server that no longer answers (asked directly, within
        LOST_PROBE_S), else `e` itself (a bug or a store error: as it is). Notes the run in results_dir for the next
        job, and takes it off MLflow's active-run stack, so neither this job's end nor MLflow's exit hook calls the
        dead server again (each call would cost its retries)."""
        uri = store_uri(self.cfg, self.results_dir)
        if isinstance(e, TrackingLost) or self.run_id is None or not is_server(uri):
            return e
        why = server_problem(uri, LOST_PROBE_S)
        if why is None:
            return e
        self.lost = why
        note = {"run_id": self.run_id, "tracking_uri": uri, "cut_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "reason": f"the server {why}", "error": (str(e).splitlines() or [type(e).__name__])[0][:300],
                "process": process_id()}
        marker = self.results_dir / UNFINISHED / f"{self.run_id}.json"
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(note, indent=1) + "\n")
            noted = f"noted in {marker} for the next job"
        except OSError as err:
            noted = f"could not be noted in {marker} ({err.strerror})"
        with contextlib.suppress(Exception):  # mlflow's private stack; if it moved, exit costs one bounded retry
            from mlflow.tracking import fluent

            fluent._active_run_stack.get().clear()
        return TrackingLost(
            f"tracking server {uri} stopped answering mid-run ({why}): every stage computed so far is in the cache "
            f"and a rerun reuses it; MLflow run {self.run_id} is left unfinished ({noted}); start the server again "
            f"and rerun, or rerun with tracking=none")

    def _unfinished(self, uri: str | None) -> None:
        """Name the runs earlier jobs left unfinished when their server stopped answering; on that server (now
        answering: this job got past its start) a run no longer RUNNING (the stale-run sweep ends it) is cleared."""
        for marker, note in unfinished_runs(self.results_dir):
            if uri is not None and note.get("tracking_uri") == uri:
                from mlflow.tracking import MlflowClient

                try:
                    status = MlflowClient().get_run(note["run_id"]).info.status
                except Exception:  # noqa: BLE001 - not on this server (a new store): the note stays
                    status = "RUNNING"
                if status != "RUNNING":
                    marker.unlink(missing_ok=True)
                    log.info("tracking: run %s, cut off at %s when its server stopped answering, is now ended (%s)",
                             note["run_id"], note.get("cut_at"), status)
                    continue
            log.warning("tracking: an earlier job's MLflow run %s on %s was cut off at %s (%s) and may still say "
                        "RUNNING there; the stages it computed are in the cache. A job tracking to that server ends it; "
                        "or delete %s", note.get("run_id"), note.get("tracking_uri"), note.get("cut_at"),
                        note.get("reason"), marker)

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str], sweep: tuple[str, str] | None) -> None:
        if not self.cfg.enabled:
            self._unfinished(None)
            return
        import mlflow

        uri = store_uri(self.cfg, self.results_dir)
        if is_server(uri):
            for k, v in HTTP_LIMITS.items():
                os.environ.setdefault(k, v)
            check_server(uri)
        try:
            exp = ensure_experiment(self.cfg, self.results_dir)
        except Exception as e:  # noqa: BLE001 - a store that cannot be opened: one line, before any run is created
            err = store_error(uri, e)
            if err is e:
                raise  # not a store problem: the error as it is, with its context
            raise err from None
        mlflow.set_experiment(experiment_id=exp)  # nested runs (training) land in the active experiment
        end_stale_runs(exp)
        self._unfinished(uri)
        parent = sweep_parent(exp, *sweep, self.results_dir) if sweep else None
        from src.provenance import git_state, package_versions

        # Which code and libraries made these numbers (a dirty tree is flagged: its commit alone does not say).
        provenance = {**git_state(), **package_versions()}
        run = mlflow.start_run(experiment_id=exp, run_name=run_name, parent_run_id=parent,
                               tags={"ste.kind": "job", "ste.proc": process_id(), **provenance, **tags})
        self.run_id = run.info.run_id
        # Params are immutable and capped at 500 characters; anything longer is in config.yaml (artifact).
        items = [(k, str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        if self.cfg.wandb:
            import wandb

            self._wandb = wandb.init(
                project=self.cfg.wandb_project, name=run_name, mode=self.cfg.wandb_mode,
                dir=str(self.results_dir), config=params, tags=[f"{k}={v}" for k, v in tags.items()][:20],
            )
            # Metrics are logged per iteration: plot them against it, not against wandb's call counter.
            self._wandb.define_metric("iteration")
            self._wandb.define_metric("*", step_metric="iteration")
        log.info("tracking: MLflow run %s in %s", self.run_id, store_uri(self.cfg, self.results_dir))

    @_tracked
    def metrics(self, values: dict[str, float | int | None], step: int) -> None:
        clean = {k: float(v) for k, v in values.items() if v is not None and not (isinstance(v, float) and v != v)}
        if not clean:
            return
        if self.active:
            import mlflow

            mlflow.log_metrics(clean, step=step)
        if self._wandb is not None:
            self._wandb.log({**clean, "iteration": step})

    @_tracked
    def tags(self, values: dict[str, str]) -> None:
        if self.active:
            import mlflow

            mlflow.set_tags(values)

    @_tracked
    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active and Path(path).exists():
            import mlflow

            mlflow.log_artifact(str(path), artifact_path)

    @_tracked
    def text(self, text: str, artifact_file: str) -> None:
        if self.active:
            import mlflow

            mlflow.log_text(text, artifact_file)

    @_tracked
    def table(self, rows: list[dict], artifact_file: str) -> None:
        """A sample of a stage's rows as an MLflow table (the full data is the jsonl artifact)."""
        if not self.active or not rows or self.cfg.sample_rows <= 0:
            return
        import mlflow
        import pandas as pd

        sample = [{k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()} for r in rows[: self.cfg.sample_rows]]
        mlflow.log_table(pd.DataFrame(sample), artifact_file=artifact_file)

    @_tracked
    def dataset(self, rows: list[dict], name: str, source: str, context: str) -> None:
        """An input of the run (the instruction pool it selected, a benchmark slice) as an MLflow dataset: the
        UI's "Datasets used" column, with a digest that changes when the rows do."""
        if not self.active or not rows:
            return
        import mlflow
        import pandas as pd

        flat = pd.DataFrame([{k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()} for r in rows])
        from mlflow.exceptions import MlflowException

        data = mlflow.data.from_pandas(flat, source=source, name=name)
        try:
            mlflow.log_input(data, context=context)
        except MlflowException as e:
            # Two jobs of one experiment logging the same dataset at once race in the SQL store's get-or-create
            # (UNIQUE constraint on experiment, name, digest); the loser's retry finds the winner's row and links it.
            if "UNIQUE constraint" not in str(e):
                raise
            mlflow.log_input(data, context=context)

    @_tracked
    def model(self, role: str, path: Path, digest: str, artifact: bool = False) -> None:
        """Which weights a run used: `weights.<role>` (hash, `models.weights.weights_hash`) and `weights.<role>.path` as
        tags; with `artifact`, the directory itself under models/<role>/ (a LoRA adapter: megabytes, and the only
        copy outside this machine's stage cache)."""
        if not self.active:
            return
        import mlflow

        mlflow.set_tags({f"weights.{role}": digest, f"weights.{role}.path": str(path)})
        if artifact:
            mlflow.log_artifacts(str(path), f"models/{role}/{Path(path).name}")

    @contextlib.contextmanager
    def child(self, name: str, tags: dict[str, str] | None = None) -> Iterator[bool]:
        """A nested run (training): yields whether one is active."""
        if not self.active:
            yield False
            return
        import mlflow

        self._call(mlflow.start_run, run_name=name, nested=True, tags={"ste.kind": "train", "ste.proc": process_id(), **(tags or {})})
        status = "FAILED"
        try:
            yield True
            status = "FINISHED"
        except BaseException as e:
            # SIGTERM (job.Terminated) and Ctrl-C end the child as its parent ends: KILLED, not FAILED (mlflow's own
            # context manager calls any exception FAILED)
            status = "FAILED" if isinstance(e, Exception) else "KILLED"
            lost = self._lost(e) if isinstance(e, Exception) else e  # TRL's MLflowCallback logs to the server too
            if lost is not e:
                raise lost from None
            raise
        finally:
            if self.lost is None:
                self._call(mlflow.end_run, status=status)

    @_tracked
    def _call(self, fn, *args, **kwargs):
        """An MLflow call outside the logging methods (a child run's start and end, the run's end)."""
        return fn(*args, **kwargs)

    def end(self, status: str = "FINISHED") -> None:
        try:
            if self.active:  # not after the server was lost: the end would only cost its retries
                import mlflow

                self._call(mlflow.end_run, status=status)
        finally:
            if self._wandb is not None:
                self._wandb.finish(exit_code=0 if status == "FINISHED" else 1)
                self._wandb = None
            self.run_id = None

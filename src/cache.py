"""The stage cache: content-addressed outputs, atomic commits, chunk-level resume.

Layout: <cache_dir>/<stage>/<key>/{data.jsonl, meta.json, ...}. A stage writes into <key>.partial/ and
renames it to <key>/ when complete, so a directory named by a key is always a finished output; a killed run
leaves only .partial/, whose saved chunks (each verified by its SHA-256) the next attempt reuses.

Every committed directory's meta.json lists each file it holds with its byte size, SHA-256 and (jsonl) row
count. A read checks that listing first (`verify`, once per process); a directory that fails it (a file cut,
deleted or garbled, meta.json itself missing or unreadable) is moved aside to <key>.bad-<time>/ with a
warning naming it, and the stage is computed again. Nothing damaged is ever read as a result.

A key hashes everything that changes a stage's result (its own typed config, its inputs' keys, the model,
the iteration index, the stage's VERSION) and nothing that doesn't (the total iteration count, paths,
timestamps). Bump a stage's VERSION when its logic changes, so old outputs are not reused.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
META = "meta.json"


class CacheError(RuntimeError):
    """A cached output is damaged; the message names the file."""


class ChunkPlan(Exception):
    """Raised by `run_chunked` on a probing partial (`Partial.probe`) before it computes anything: how many chunks
    the stage has, which are saved and verified, and how many items it has (src/shards.py sizes its work by it)."""

    def __init__(self, total: int, saved: set[int], items: int):
        super().__init__(f"{total} chunks, {len(saved)} saved")
        self.total, self.saved, self.items = total, saved, items


class ChunksDone(Exception):
    """Raised by `run_chunked` on a partial restricted to some chunks (`Partial.only`, a shard worker) once those are
    saved: the stage's own post-processing needs every chunk, and the worker never commits."""


def fault_point(stage: str, point: str) -> None:
    """Fault injection for the test suite: STE_FAULT_KILL=<stage>:<point> SIGKILLs this process there
    (STE_FAULT_RAISE=... raises an unexpected error instead, STE_FAULT_ENOSPC=... a full disk)
    (points: `chunk`, after a chunk is saved, and `chunk<index>` after chunk <index> is saved, which kills only the
    shard worker saving it; `commit`, when the output is complete but not yet published)."""
    if os.environ.get("STE_FAULT_KILL") == f"{stage}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("STE_FAULT_RAISE") == f"{stage}:{point}":  # an unexpected error, for the error-report test
        raise RuntimeError(f"injected fault at {stage}:{point}")
    if os.environ.get("STE_FAULT_ENOSPC") == f"{stage}:{point}":  # the disk filling up, for the disk-full test
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<injected at {stage}:{point}>")


def make_key(stage: str, version: int, config: Any, inputs: dict[str, Any] | None = None, **extra: Any) -> str:
    payload = {"stage": stage, "version": version, "config": config, "inputs": inputs or {}, **extra}
    blob = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def file_fingerprint(path: Path) -> str:
    """SHA-256 of a data file's bytes: a pool edited in place must invalidate what was built from it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:20]


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl_rows(path: Path) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    rows.append(json.loads(line))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path}:{lineno}: unreadable cached row ({e})") from None
    return rows


def manifest(directory: Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256[, rows]}} of every file a committed output holds (meta.json aside)."""
    out = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != META):
        entry: dict[str, Any] = {"bytes": f.stat().st_size, "sha256": file_fingerprint(f)}
        if f.suffix == ".jsonl":
            with open(f, "rb") as fh:
                entry["rows"] = sum(1 for line in fh if line.strip())
        out[f.relative_to(directory).as_posix()] = entry
    return out


class Partial:
    """An output under construction. Chunks saved here survive a kill; `commit` publishes them.

    Chunk c (items [c*size, (c+1)*size) of the stage's item order) is one file, chunks/<c>-<sha>.jsonl, written to a
    temporary name, fsynced and renamed, its name carrying the SHA-256 of its bytes: a chunk is either there whole
    and verified or not there, nothing is appended to a shared file and no lock is needed, so any number of
    processes (on any machine sharing the directory) may save chunks side by side. A chunk whose bytes no longer
    match its name (edited, cut, garbled) is moved aside with a warning naming it and computed again."""

    def __init__(self, final: Path, stage: str = ""):
        self.final, self.stage = final, stage
        self.dir = final.with_name(final.name + ".partial")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.chunk_dir = self.dir / "chunks"
        # Set by src/shards.py: `only` restricts `run_chunked` to these chunk indices (a shard worker), `probe` makes
        # it report the stage's chunks (ChunkPlan) and compute nothing (the driver sizing the work).
        self.only: frozenset[int] | None = None
        self.probe = False

    def _files(self) -> list[Path]:
        return sorted(self.chunk_dir.glob("[0-9]*-*.jsonl")) if self.chunk_dir.exists() else []

    @staticmethod
    def _read(path: Path) -> tuple[list[dict] | None, str | None]:
        """(rows, None) of a saved chunk that passes its check, else (None, why): one read of its bytes."""
        index, _, sha = path.stem.partition("-")
        try:
            data = path.read_bytes()
        except OSError as e:
            return None, f"unreadable ({e})"
        got = hashlib.sha256(data).hexdigest()[:16]
        if not index.isdigit() or got != sha:
            return None, f"its SHA-256 {got} does not match its name"
        try:
            return [json.loads(line) for line in data.decode("utf-8").splitlines()], None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return None, f"unreadable rows ({e})"

    def problems(self) -> list[str]:
        """Saved chunks that fail their check (nothing is moved: the dry run reports them)."""
        return [f"{f}: {why}" for f in self._files() for why in [self._read(f)[1]] if why]

    def saved(self) -> dict[int, list[dict]]:
        """{chunk index: rows} of every verified chunk an earlier attempt (or another worker) saved."""
        legacy = self.dir / "chunks.jsonl"  # before chunks were verified (one appended file): not trusted
        if legacy.exists():
            os.replace(legacy, legacy.with_name("chunks.jsonl.unverified"))
            log.warning("cache: %s was saved by an earlier version without checksums; its chunks are computed again", legacy)
        out: dict[int, list[dict]] = {}
        for f in self._files():
            rows, why = self._read(f)
            if why is not None:
                aside = f.with_name(f.name + f".bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
                os.replace(f, aside)
                log.warning("cache: saved chunk %s is damaged (%s); moved aside to %s, it will be computed again", f, why, aside.name)
                continue
            out.setdefault(int(f.stem.partition("-")[0]), rows)
        return out

    def done(self) -> list[dict]:
        """Rows of every verified saved chunk, in chunk order."""
        return [r for _, rows in sorted(self.saved().items()) for r in rows]

    def has_saved(self) -> bool:
        return bool(self._files())

    def saved_indices(self) -> set[int]:
        """Indices of the chunk files present, by name only (progress counts; `saved` verifies)."""
        return {int(f.name.partition("-")[0]) for f in self._files()}

    def save(self, index: int, rows: list[dict]) -> Path:
        """Chunk `index`, whole or not at all (temporary name, fsync, rename, fsync of the directory)."""
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        path = self.chunk_dir / f"{index:06d}-{hashlib.sha256(data).hexdigest()[:16]}.jsonl"
        tmp = self.chunk_dir / f".{path.name}.{os.uname().nodename}-{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.chunk_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fault_point(self.stage, "chunk")
        fault_point(self.stage, f"chunk{index}")
        return path

    def commit(self, rows: Iterable[dict] | None, meta: dict) -> Path:
        """Publish the partial directory as the output. Two processes may commit the same key at once (a
        re-submitted driver on another node, where flock does not reach): files are replaced whole, never rewritten
        in place, and a directory rename onto a non-empty one fails; so the first rename wins, and the other finds a
        valid output there and discards its own, never moving a good output aside."""
        if rows is not None:
            meta = {**meta, "rows": _write_whole(self.dir / "data.jsonl", lambda p: write_jsonl(p, rows))}
        shutil.rmtree(self.chunk_dir, ignore_errors=True)  # merged into the output's own files
        (self.dir / "chunks.jsonl.unverified").unlink(missing_ok=True)  # an earlier version's, set aside by `saved`
        meta = {**meta, "files": manifest(self.dir)}
        _write_whole(self.dir / META, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str)))
        fault_point(self.stage, "commit")
        if self.final.exists() and self._committed_by_another():
            return self.final
        if self.final.exists():  # a damaged output that nobody quarantined: never merge into it
            quarantine(self.final, "replaced by a fresh computation")
        try:
            os.rename(self.dir, self.final)
        except OSError:
            if self.final.exists() and self._committed_by_another():
                return self.final
            raise
        return self.final

    def _committed_by_another(self) -> bool:
        """The output appeared while this process computed it: keep it (when valid) and drop this copy."""
        if check(self.final) is not None:
            return False
        shutil.rmtree(self.dir, ignore_errors=True)
        log.info("cache: %s was committed by another process meanwhile; its output is kept and this copy discarded", self.final)
        return True


def _write_whole(path: Path, write: Callable[[Path], Any]) -> Any:
    """`write(tmp)` then rename over `path`: a reader (or a second committer) never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.uname().nodename}-{os.getpid()}.tmp")
    out = write(tmp)
    os.replace(tmp, path)
    return out


def quarantine(path: Path, reason: str) -> Path:
    """Move a damaged output aside (kept for inspection, never read again) and say so."""
    aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, aside)
    log.warning("cache: %s is damaged (%s); moved aside to %s, it will be computed again", path, reason, aside.name)
    return aside


def check(directory: Path) -> str | None:
    """Why a committed output cannot be trusted, or None. Sizes and row counts are checked, and the SHA-256 of
    every file (a few MB of jsonl or adapter: milliseconds next to any stage)."""
    meta_path = directory / META
    if not meta_path.exists():
        return f"{meta_path} is missing"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        return f"{meta_path} is unreadable ({e})"
    if not isinstance(meta, dict):
        return f"{meta_path} is not a JSON object"
    files = meta.get("files")
    if files is None:  # written before manifests: at least the row count
        data = directory / "data.jsonl"
        if "rows" in meta and data.exists():
            with open(data, "rb") as fh:
                n = sum(1 for line in fh if line.strip())
            if n != meta["rows"]:
                return f"{data} has {n} rows, {meta_path} records {meta['rows']}"
        return None
    actual = manifest(directory)
    for name, want in sorted(files.items()):
        got = actual.get(name)
        if got is None:
            return f"{directory / name} is missing (listed in {meta_path})"
        if got != want:
            what = "rows" if got.get("rows") != want.get("rows") else ("bytes" if got["bytes"] != want["bytes"] else "sha256")
            return f"{directory / name} does not match {meta_path} ({what}: {got.get(what)} != {want.get(what)})"
    extra = sorted(set(actual) - set(files))
    if extra:
        return f"{directory / extra[0]} is not listed in {meta_path}"
    return None


def run_chunked(
    partial: Partial,
    items: Sequence[T],
    item_key: Callable[[T], Hashable],
    row_key: Callable[[dict], Hashable],
    process: Callable[[list[T]], list[dict]],
    chunk_size: int,
    desc: str,
    unit: str,
) -> list[dict]:
    """Rows for every item, in chunk order: chunk c is `process(items[c*chunk_size:(c+1)*chunk_size])`, saved as
    it completes. Chunks an earlier (killed) attempt saved and that pass their check are reused, so the others are
    computed at the same boundaries as in an unbroken run, whichever chunks are missing. A saved chunk whose rows
    name items outside it (saved under other item orders or sizes) is computed again.

    A shard worker's partial (`only`) computes just those chunks and raises ChunksDone; a probing one raises
    ChunkPlan before computing anything (src/shards.py)."""
    from tqdm import tqdm

    chunks = [list(items[start : start + chunk_size]) for start in range(0, len(items), chunk_size)]
    saved = {}
    for c, rows in partial.saved().items():
        if c < len(chunks) and {row_key(r) for r in rows} <= {item_key(it) for it in chunks[c]}:
            saved[c] = rows
        else:
            log.warning("cache: saved chunk %d of %s holds other items than chunk %d of this run; computed again", c, partial.dir, c)
    if partial.probe:
        raise ChunkPlan(len(chunks), set(saved), len(items))
    only = partial.only
    scope = [c for c in range(len(chunks)) if only is None or c in only]
    with tqdm(total=sum(len(chunks[c]) for c in scope), initial=sum(len(chunks[c]) for c in scope if c in saved), desc=desc, unit=unit) as bar:
        for c, chunk in enumerate(chunks):
            if c in saved or (only is not None and c not in only):
                continue
            saved[c] = process(chunk)
            partial.save(c, saved[c])
            bar.update(len(chunk))
    if only is not None:
        raise ChunksDone()
    return [r for c in range(len(chunks)) for r in saved[c]]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes on this machine (flock on `path`), held for the `with` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class StageCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._verified: set[Path] = set()

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def is_done(self, stage: str, key: str) -> bool:
        """A committed output is there (not verified: `plan` must stay cheap; `valid` verifies)."""
        return (self.path(stage, key) / META).exists()

    def valid(self, stage: str, key: str) -> bool:
        """The output is there and passes `check`; a damaged one is quarantined (and so no longer there)."""
        path = self.path(stage, key)
        if path in self._verified:
            return True
        if not path.exists():
            return False
        problem = check(path)
        if problem is not None:
            quarantine(path, problem)
            return False
        self._verified.add(path)
        return True

    def meta(self, stage: str, key: str) -> dict:
        path = self.path(stage, key) / META
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheError(f"{path}: unreadable ({e})") from None

    def rows(self, stage: str, key: str) -> list[dict]:
        return read_jsonl_rows(self.path(stage, key) / "data.jsonl")

    def has_partial(self, stage: str, key: str) -> bool:
        return self.path(stage, key).with_name(key + ".partial").exists()

    def partial(self, stage: str, key: str) -> Partial:
        return Partial(self.path(stage, key), stage)

    def lock(self, stage: str, key: str):
        """Exclusive while one process computes (stage, key): parallel sweep jobs wait instead of racing."""
        return file_lock(self.root / stage / f"{key}.lock")

    def compute_once(self, stage: str, key: str, compute: Callable[[Partial], tuple[Iterable[dict] | None, dict]], meta: dict) -> bool:
        """Run `compute(partial)` -> (rows, stats) and commit it as (stage, key), unless that output exists.
        Holds the lock meanwhile and checks again under it, so a parallel job that finished first is reused.
        Returns True when the output was already there (a cache hit)."""
        if self.valid(stage, key):
            return True
        with self.lock(stage, key):
            if self.valid(stage, key):
                return True
            partial = self.partial(stage, key)
            t0 = time.time()
            rows, stats = compute(partial)
            partial.commit(rows, {**meta, "stage": stage, "key": key, "stats": stats, "seconds": time.time() - t0, "created": time.time()})
            self._verified.add(self.path(stage, key))
            return False

    def discard(self, stage: str, key: str) -> None:
        shutil.rmtree(self.path(stage, key), ignore_errors=True)

"""The stage cache: content-addressed outputs, atomic commits, chunk-level resume.

Layout: <cache_dir>/<stage>/<key>/{data.jsonl, meta.json, ...}. A stage writes into <key>.partial/ and
renames it to <key>/ when complete, so a directory named by a key is always a finished output; a killed run
leaves only .partial/, whose saved chunks the next attempt reuses.

A key hashes everything that changes a stage's result (its own typed config, its inputs' keys, the model,
the iteration index, the stage's VERSION) and nothing that doesn't (the total iteration count, paths,
timestamps). Bump a stage's VERSION when its logic changes, so old outputs are not reused.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")


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
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Partial:
    """An output under construction. Chunks appended here survive a kill; `commit` publishes them."""

    def __init__(self, final: Path):
        self.final = final
        self.dir = final.with_name(final.name + ".partial")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.chunks = self.dir / "chunks.jsonl"

    def done(self) -> list[dict]:
        """Rows saved by earlier attempts. A line cut short by a kill is ignored (it is redone)."""
        if not self.chunks.exists():
            return []
        rows = []
        with open(self.chunks) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # only the last line can be torn; everything before it was fsynced
        # Rewrite without the torn tail so appends start on a clean line.
        write_jsonl(self.chunks, rows)
        return rows

    def append(self, rows: list[dict]) -> None:
        with open(self.chunks, "a") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def commit(self, rows: Iterable[dict] | None, meta: dict) -> Path:
        if rows is not None:
            meta = {**meta, "rows": write_jsonl(self.dir / "data.jsonl", rows)}
        if self.chunks.exists():
            self.chunks.unlink()
        (self.dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        os.replace(self.dir, self.final)
        return self.final


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
    """Rows for every item: those an earlier (killed) attempt saved, plus `process(chunk)` for the rest,
    appended and fsynced chunk by chunk. Saved chunks are a prefix of the work, so the remaining chunks
    start at the same boundaries as in an unbroken run. Rows come back saved first, then new."""
    from tqdm import tqdm

    saved = partial.done()
    done = {row_key(r) for r in saved}
    todo = [it for it in items if item_key(it) not in done]
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit=unit) as bar:
        for start in range(0, len(todo), chunk_size):
            chunk = list(todo[start : start + chunk_size])
            rows = process(chunk)
            partial.append(rows)
            saved.extend(rows)
            bar.update(len(chunk))
    return saved


class StageCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def is_done(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / "meta.json").exists()

    def meta(self, stage: str, key: str) -> dict:
        return json.loads((self.path(stage, key) / "meta.json").read_text())

    def rows(self, stage: str, key: str) -> list[dict]:
        return read_jsonl_rows(self.path(stage, key) / "data.jsonl")

    def has_partial(self, stage: str, key: str) -> bool:
        return self.path(stage, key).with_name(key + ".partial").exists()

    def partial(self, stage: str, key: str) -> Partial:
        return Partial(self.path(stage, key))

    @contextlib.contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Exclusive while one process computes (stage, key): parallel sweep jobs wait instead of racing."""
        lock_path = self.root / stage / f"{key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def compute_once(self, stage: str, key: str, compute: Callable[[Partial], tuple[Iterable[dict] | None, dict]], meta: dict) -> bool:
        """Run `compute(partial)` -> (rows, stats) and commit it as (stage, key), unless that output exists.
        Holds the lock meanwhile and checks again under it, so a parallel job that finished first is reused.
        Returns True when the output was already there (a cache hit)."""
        if self.is_done(stage, key):
            return True
        with self.lock(stage, key):
            if self.is_done(stage, key):
                return True
            partial = self.partial(stage, key)
            t0 = time.time()
            rows, stats = compute(partial)
            partial.commit(rows, {**meta, "stage": stage, "key": key, "stats": stats, "seconds": time.time() - t0, "created": time.time()})
            return False

    def discard(self, stage: str, key: str) -> None:
        shutil.rmtree(self.path(stage, key), ignore_errors=True)

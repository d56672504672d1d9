"""The weights a run used, by content: a digest of a model directory's weight files (memoised, or read from the
hub's blob names and the packaged manifests), and of a trained output's files as the stage cache lists them."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Mapping

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


DIGEST_CHARS = 20  # a per-file digest is compared on its first 20 hex digits (what the stage cache's manifests keep)


def weights_hash(model_dir: Path, known: Mapping[str, str] | None = None) -> str:
    """The identity of a model directory's weights: SHA-256 over "relative path:file SHA-256" lines of its weight
    files (*.safetensors, *.bin, *.gguf; sorted), first 16 hex digits. A tokenizer or config rewrite does not change
    it (the model spec in the cache keys covers those).

    Cheap where it can be: a file's SHA-256 comes from `known` ({relative path: hex digest}, e.g. a manifest that was
    verified against the bytes: the packaged models' `ste_source.json`, a train output's `meta.json`), from a hub
    cache blob's name (the hub names LFS blobs by their SHA-256), or from `file_sha256` (computed once per file
    version, remembered by size and mtime). The same bytes give the same hash whichever way each digest was found."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{model_dir}: no weight files (*.safetensors, *.bin, *.gguf)")
    known = known or {}
    h = hashlib.sha256()
    for p in files:
        rel = p.relative_to(model_dir).as_posix()
        digest = known.get(rel) or _hub_blob_digest(p) or file_sha256(p)
        h.update(f"{rel}:{digest[:DIGEST_CHARS]}\n".encode())
    return h.hexdigest()[:16]


def _hub_blob_digest(path: Path) -> str | None:
    """A hub snapshot file links to blobs/<sha256> (LFS files, i.e. weights): its name is its digest."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    return target.name if target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", target.name) else None


def file_sha256(path: Path, memo: Path | None = None) -> str:
    """SHA-256 of a file, remembered in `memo` (default: file-sha256.json in the model cache) by real path, size and
    mtime, so a 140 GB model is read once, not at every run. A failed memo write only costs a rehash next time."""
    from src.models.store import default_cache_dir, sha256_file

    memo = Path(memo or default_cache_dir() / "file-sha256.json")
    real, st = Path(path).resolve(), Path(path).stat()
    stamp = [st.st_size, st.st_mtime_ns]
    try:
        seen = json.loads(memo.read_text())
    except (OSError, ValueError):
        seen = {}
    entry = seen.get(str(real))
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = sha256_file(real)
    if time.time() - st.st_mtime < 2:
        # Written just now: a rewrite of the same size within the filesystem's timestamp granularity would keep this
        # stamp (git's "racy" case), so a digest is remembered only for files older than that.
        return digest
    seen[str(real)] = {"stamp": stamp, "sha256": digest}
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps(seen, indent=0, sort_keys=True))
        os.replace(tmp, memo)
    except OSError:
        pass
    return digest


def manifest_digests(model_dir: Path) -> dict[str, str]:
    """The per-file SHA-256 a packaged model's conversion recorded (`ste_source.json`; `materialize` checks them
    against the bytes before the model is used), or {} for a directory without one."""
    from src.models.store import MANIFEST

    try:
        files = json.loads((Path(model_dir) / MANIFEST).read_text()).get("files")
    except (OSError, ValueError):
        return {}
    return files if isinstance(files, dict) else {}


def model_weights(spec, cache_dir: Path | None = None) -> tuple[Path, str]:
    """(directory, weights hash) of a model spec's base weights. A packaged model already converted is read from its
    manifest without converting or rehashing 2.5 GB; anything else is resolved as loading would (convert, build or
    download once), then hashed (`weights_hash`)."""
    from src.models.loading import resolve_model_dir

    path = None
    if spec.source == "packaged":
        from src.models.packaged import materialized_dir

        path = materialized_dir(spec.package or spec.name, cache_dir)
        path = path if manifest_digests(path) else None
    path = path or resolve_model_dir(spec, cache_dir)
    return path, weights_hash(path, manifest_digests(path))


def train_output_digests(meta: Mapping, subdir: str) -> dict[str, str]:
    """The per-file digests a train stage's `meta.json` lists for its `adapter/` or `model/` directory, relative to
    that directory (the cache checks them against the bytes before the output is used)."""
    prefix = subdir.rstrip("/") + "/"
    return {k[len(prefix):]: v["sha256"] for k, v in (meta.get("files") or {}).items() if k.startswith(prefix) and "sha256" in v}

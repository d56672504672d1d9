"""The local model cache: where converted/built models live and how they are written and checked.

Shared by packaged.py (converted GGUF models) and tiny.py (the test model); loading.py reads from it. Its own
module so that none of those imports another just for these helpers."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

MANIFEST = "ste_source.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("STE_MODEL_CACHE") or Path.home() / ".cache" / "ste" / "models")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _payload_files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)


def save_atomically(model, tokenizer, out: Path, source: dict | None = None) -> Path:
    """`save_pretrained` model and tokenizer into `out`, all or nothing: written into a temporary sibling and
    renamed, so a killed conversion never leaves a half-written model that later loads. With `source`, a manifest
    (`ste_source.json`: `source` plus the SHA-256 of every file written) goes beside the weights, for
    `verify_manifest`. If another process finished the same directory first, its copy is kept."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        tmp.chmod(0o755)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if source is not None:
            files = {str(p.relative_to(tmp)): sha256_file(p) for p in _payload_files(tmp)}
            (tmp / MANIFEST).write_text(json.dumps({**source, "files": files}, indent=2))
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # not a concurrent winner: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def verify_manifest(d: Path, expect: dict) -> str | None:
    """Why directory `d` is not the model its manifest vouches for (None when it is): the manifest must exist,
    carry every key of `expect` with the same value, and list exactly the files present, each with its SHA-256.
    Guards against a planted or half-replaced copy in a shared cache, not against a forged manifest."""
    try:
        man = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST}"
    for k, v in expect.items():
        if man.get(k) != v:
            return f"{MANIFEST} has {k}={man.get(k)!r}, expected {v!r}"
    files = man.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MANIFEST} lists no file hashes"
    present = {str(p.relative_to(d)) for p in _payload_files(d)}
    if present != set(files):
        return f"files differ from {MANIFEST}: extra {sorted(present - set(files))}, missing {sorted(set(files) - present)}"
    for name, want in files.items():
        if sha256_file(d / name) != want:
            return f"SHA-256 of {name} differs from {MANIFEST}"
    return None


def set_aside(path: Path) -> Path:
    """Move an untrusted cache entry out of the way (kept for inspection, never loaded) so it can be rebuilt."""
    dest = path.with_name(f".untrusted-{path.name}-{int(time.time() * 1000)}")
    os.rename(path, dest)
    return dest

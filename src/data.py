"""Reading datasets: local jsonl / jsonl.gz / json / parquet files, or Hugging Face dataset ids.

Local files are first-class (this project's machines have no hub access); hub ids are real code paths for
users with internet. Every error names the file, the line and the key.
"""
from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any, Iterator
from src.cache import file_fingerprint


class DataError(ValueError):
    """Bad data; the message names file, line and key."""


def resolve(path: str | Path, root: str | Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(root).expanduser() / p


def _opener(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a malformed, undecodable or truncated line is an error
    naming it. Lines are decoded one by one so a bad byte is reported on its own line."""
    lineno = 0
    try:
        with _opener(path) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}:{lineno + 1}: corrupt or truncated gzip ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def check_readable(path: Path) -> None:
    """Cheap preflight: the file exists and its first line reads as the format its name says."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        for _ in iter_jsonl(path):
            return
        raise DataError(f"{path}: no rows")
    if name.endswith(".parquet"):
        with open(path, "rb") as f:
            if f.read(4) != b"PAR1":
                raise DataError(f"{path}: not a parquet file (bad magic bytes)")
    elif name.endswith(".json"):
        with open(path, "rb") as f:
            head = f.read(1 << 16).lstrip()
        if not head.startswith((b"[", b"{")):
            raise DataError(f"{path}:1: not JSON (starts with {head[:20]!r})")


def read_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(location "file:line", row) for a local file of any supported format."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        for lineno, obj in iter_jsonl(path):
            yield f"{path}:{lineno}", obj
    elif name.endswith(".json"):
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 (byte offset {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        for i, obj in enumerate(rows):
            yield f"{path}[{i}]", obj
    elif name.endswith(".parquet"):
        import pandas as pd

        try:
            table = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: unreadable parquet ({type(e).__name__}: {e})") from None
        for i, obj in enumerate(table.to_dict("records")):
            yield f"{path}[row {i}]", obj
    else:
        raise DataError(f"{path}: unsupported format (use .jsonl, .jsonl.gz, .json or .parquet)")


def read_hub(hf_id: str, split: str, revision: str | None) -> Iterator[tuple[str, dict]]:
    """Rows of a Hugging Face dataset (needs network, or a populated HF cache)."""
    import datasets

    ds = datasets.load_dataset(hf_id, split=split, revision=revision)
    for i, row in enumerate(ds):
        yield f"{hf_id}[{split}][{i}]", dict(row)


def require(row: dict, key: str, where: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: missing key {key!r} (has: {', '.join(sorted(row)) or 'nothing'})")
    if row[key] is None:
        raise DataError(f"{where}: key {key!r} is null")
    return row[key]


def benchmark_source(source: str, data_root: str) -> str:
    local = resolve(source, data_root)
    return str(local) if local.exists() else source  # otherwise a hub id


def source_fingerprint(source: str, revision: str | None, data_root: str) -> str:
    local = resolve(source, data_root)
    return file_fingerprint(local) if local.exists() else f"{source}@{revision or 'main'}"

"""Reading datasets: local jsonl / jsonl.gz / json / parquet files, or Hugging Face dataset ids.

Local files are first-class (this project's machines have no hub access); hub ids are real code paths for
users with internet. Every error names the file, the line and the key.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator


class DataError(ValueError):
    """Bad data; the message names file, line and key."""


def resolve(path: str | Path, root: str | Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(root).expanduser() / p


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a malformed line is an error naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(location "file:line", row) for a local file of any supported format."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        for lineno, obj in iter_jsonl(path):
            yield f"{path}:{lineno}", obj
    elif name.endswith(".json"):
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        for i, obj in enumerate(rows):
            yield f"{path}[{i}]", obj
    elif name.endswith(".parquet"):
        import pandas as pd

        for i, obj in enumerate(pd.read_parquet(path).to_dict("records")):
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
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing key {key!r} (has: {', '.join(sorted(row)) or 'nothing'})")
    return row[key]

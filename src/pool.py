"""Stage 1, select: keep the configured category from the pool, labelled by the shared classification (classify.py).

Reads the `dataset` config group.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Collection, Iterator


from src.cache import file_fingerprint
from src.config import ConfigError
from src.data import DataError, read_hub, read_records, require, resolve
from src.prompts import Template, load_template


@dataclass
class SourceConfig:
    path: str | None = None  # local file, relative to data_root or absolute
    hf_id: str | None = None  # or a Hugging Face dataset id
    split: str = "train"
    revision: str | None = None
    text_field: str = "prompt"
    id_field: str | None = "id"  # null: ids are made from the text
    reference_field: str | None = None  # the row's reference solution (GSM8K `answer`, MATH `solution`): label-noise audit


@dataclass
class DatasetConfig:
    name: str
    category: str
    categories: list[str] = field(default_factory=list)
    classify_prompt: str | None = None
    # Content-free inputs whose mean label distribution is the model's prior, divided out of every
    # classification (contextual calibration, Zhao et al. 2021); [] = no calibration, the default, since with the
    # committed prompt the prior hurts `reasoning` recall (docs/classification.md); e.g. ["N/A", "", "[MASK]"].
    content_free: list[str] = field(default_factory=list)
    sources: list[SourceConfig] = field(default_factory=list)
    limit: int = 12
    max_scan: int = 40
    max_chars: int = 400
    min_chars: int = 20
    heldout_fraction: float = 0.3
    shuffle: bool = True
    # Drop pool instructions that match a prompt of a benchmark the run evaluates on (stages/decontaminate.py);
    # false keeps them (the matches are still counted and logged).
    decontaminate: bool = True

    def validate(self, where: str) -> None:
        if self.category != "any" and self.category not in self.categories:
            raise ConfigError(
                f"{where}.category={self.category!r} is not one of {where}.categories {self.categories}"
            )
        if not self.sources:
            raise ConfigError(f"{where}.sources is empty: name at least one instruction pool")
        for i, s in enumerate(self.sources):
            if (s.path is None) == (s.hf_id is None):
                raise ConfigError(f"{where}.sources[{i}]: set exactly one of path / hf_id")
        if self.limit < 1 or self.max_scan < 1:
            raise ConfigError(f"{where}.limit and {where}.max_scan must be >= 1")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"{where}.heldout_fraction must be in [0, 1)")


def classify_template(cfg: DatasetConfig) -> Template:
    return load_template(cfg.classify_prompt, "classify.txt", ("input", "categories"), "dataset.classify_prompt")


def source_fingerprints(cfg: DatasetConfig, data_root: str) -> list[str]:
    """Identity of each pool for the cache key: file content hash, or hub id@revision."""
    out = []
    for i, s in enumerate(cfg.sources):
        if s.path is not None:
            p = resolve(s.path, data_root)
            if not p.exists():
                raise DataError(
                    f"dataset.sources[{i}].path: {p} not found (data_root={data_root}; set data_root= or "
                    f"STE_DATA_ROOT to the folder holding the shared datasets)"
                )
            out.append(file_fingerprint(p))
        else:
            out.append(f"{s.hf_id}@{s.revision or 'main'}:{s.split}")
    return out


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def source_rows(cfg: DatasetConfig, data_root: str) -> Iterator[tuple[str, str, str, int, dict]]:
    """(id, text, location, source index, row) for every pool row that holds an instruction, before the length
    filter and deduplication (what decontamination compares: the whole source)."""
    for i, s in enumerate(cfg.sources):
        rows = read_records(resolve(s.path, data_root)) if s.path else read_hub(s.hf_id, s.split, s.revision)
        for where, row in rows:
            text = require(row, s.text_field, f"{where} (dataset.sources[{i}].text_field)")
            if isinstance(text, list):  # a conversation (WildChat, LMSYS-Chat): its first user turn
                text = next((m.get("content") for m in text if isinstance(m, dict) and m.get("role") == "user"), None)
                if text is None:
                    continue
            if not isinstance(text, str):
                raise DataError(f"{where}: key {s.text_field!r} is not a string")
            text = text.strip()
            if s.id_field:
                rid = str(require(row, s.id_field, f"{where} (dataset.sources[{i}].id_field)"))
            else:
                rid = hashlib.sha256(_normalise(text).encode()).hexdigest()[:16]
            yield rid, text, where, i, row


def load_pool(cfg: DatasetConfig, data_root: str) -> list[tuple[str, str, str]]:
    """(id, text, location) for every usable pool row: deduplicated, length-filtered, in file order."""
    seen: set[str] = set()
    pool = []
    for rid, text, where, _, _ in source_rows(cfg, data_root):
        if not cfg.min_chars <= len(text) <= cfg.max_chars:
            continue
        norm = _normalise(text)
        if norm in seen:
            continue
        seen.add(norm)
        pool.append((rid, text, where))
    return pool


def references(cfg: DatasetConfig, data_root: str, ids: Collection[str]) -> dict[str, str]:
    """The reference solution of each of `ids` whose source names a `reference_field` (none: {})."""
    if not any(s.reference_field for s in cfg.sources):
        return {}
    out = {}
    for rid, _, where, i, row in source_rows(cfg, data_root):
        field_name = cfg.sources[i].reference_field
        if field_name and rid in ids and rid not in out:
            ref = require(row, field_name, f"{where} (dataset.sources[{i}].reference_field)")
            out[rid] = str(ref)
    return out

"""Stage 1, select: classify pool instructions with the seed model, keep the configured category.

Reads the `dataset` config group.
"""
from __future__ import annotations

import hashlib
import logging
import random
import re
from dataclasses import dataclass, field

from tqdm import tqdm

from ..cache import Partial, file_fingerprint
from ..config import ConfigError
from ..data import DataError, read_hub, read_records, require, resolve
from ..models.base import Generator
from ..prompts import Template, load_template
from ..records import Instruction

log = logging.getLogger(__name__)
VERSION = 1


@dataclass
class SourceConfig:
    path: str | None = None  # local file, relative to data_root or absolute
    hf_id: str | None = None  # or a Hugging Face dataset id
    split: str = "train"
    revision: str | None = None
    text_field: str = "prompt"
    id_field: str | None = "id"  # null: ids are made from the text


@dataclass
class DatasetConfig:
    name: str
    category: str
    categories: list[str] = field(default_factory=list)
    classify_prompt: str | None = None
    sources: list[SourceConfig] = field(default_factory=list)
    limit: int = 12
    max_scan: int = 40
    max_chars: int = 400
    min_chars: int = 20
    heldout_fraction: float = 0.3
    shuffle: bool = True

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


def load_pool(cfg: DatasetConfig, data_root: str) -> list[tuple[str, str, str]]:
    """(id, text, location) for every usable pool row: deduplicated, length-filtered, in file order."""
    seen: set[str] = set()
    pool = []
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
            if not cfg.min_chars <= len(text) <= cfg.max_chars:
                continue
            norm = _normalise(text)
            if norm in seen:
                continue
            seen.add(norm)
            if s.id_field:
                rid = str(require(row, s.id_field, f"{where} (dataset.sources[{i}].id_field)"))
            else:
                rid = hashlib.sha256(norm.encode()).hexdigest()[:16]
            pool.append((rid, text, where))
    return pool


def split_of(instruction_id: str, heldout_fraction: float, random_seed: int) -> str:
    """Deterministic per-id split, stable when the pool or limit changes."""
    h = int(hashlib.sha256(f"{random_seed}:{instruction_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if h < heldout_fraction else "train"


def run(cfg: DatasetConfig, data_root: str, random_seed: int, model: Generator, partial: Partial) -> tuple[list[Instruction], dict]:
    template = classify_template(cfg)
    pool = load_pool(cfg, data_root)
    if cfg.shuffle:
        random.Random(random_seed).shuffle(pool)
    scan = pool[: cfg.max_scan]
    labels = {row["id"]: row["category"] for row in partial.done()}  # saved by a killed attempt
    wanted = lambda label: cfg.category == "any" or label == cfg.category  # noqa: E731
    kept = lambda: sum(1 for rid, _, _ in scan if rid in labels and wanted(labels[rid]))  # noqa: E731
    chunk = 16
    bar = tqdm(total=len(scan), initial=len(labels), desc=f"select: classify (dataset={cfg.name})", unit="instr")
    for start in range(0, len(scan), chunk):
        if kept() >= cfg.limit:
            break  # stream the pool: classify only as much as it takes to fill the category
        todo = [r for r in scan[start : start + chunk] if r[0] not in labels]
        if not todo:
            continue
        prompts = [template.render(input=text, categories=", ".join(cfg.categories)) for _, text, _ in todo]
        if len(cfg.categories) == 1:
            # A pool of known category (GSM8K, HumanEval, ...) lists one label: nothing to classify.
            choices = list(cfg.categories) * len(prompts)
        else:
            choices = model.choose(prompts, ["Category: "] * len(prompts), cfg.categories)
        rows = [{"id": rid, "category": c} for (rid, _, _), c in zip(todo, choices)]
        partial.append(rows)
        labels.update({r["id"]: r["category"] for r in rows})
        bar.update(len(todo))
    bar.close()
    scanned = [r for r in scan if r[0] in labels]
    counts: dict[str, int] = {}
    for rid, _, _ in scanned:
        counts[labels[rid]] = counts.get(labels[rid], 0) + 1
    chosen = [r for r in scanned if wanted(labels[r[0]])][: cfg.limit]
    if not chosen:
        raise DataError(
            f"dataset={cfg.name}: none of the {len(scanned)} scanned instructions was classified as "
            f"{cfg.category!r} (labels: {counts}); raise dataset.max_scan or pick another dataset.category"
        )
    out = [
        Instruction(id=rid, text=text, source=where, category=labels[rid], split=split_of(rid, cfg.heldout_fraction, random_seed))
        for rid, text, where in chosen
    ]
    stats = {
        "pool_size": len(pool),
        "scanned": len(scanned),
        "kept": len(out),
        "heldout": sum(i.split == "heldout" for i in out),
        "label_counts": counts,
    }
    log.info("select: dataset=%s kept %d/%d scanned as %r (labels %s)", cfg.name, len(out), len(scanned), cfg.category, counts)
    return out, stats

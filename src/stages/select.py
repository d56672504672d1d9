"""Stage 1, select: keep the configured category from the pool, labelled by the shared classification (classify.py).

Reads the `dataset` config group.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
from typing import Callable, Collection, Iterable

from tqdm import tqdm

from src.cache import StageCache, make_key
from src.config import as_dict
from src.data import DataError, resolve
from src.rules.decontamination import near_duplicate_groups
from src.models.base import Generator, ModelSpec, model_id
from src.prompts import text_fingerprint
from src.records import Instruction
from src import classification as classify
from src.pool import classify_template, DatasetConfig, load_pool, references, source_fingerprints
from src.step import Context, Stage, Step, as_rows, prefixed, records

log = logging.getLogger(__name__)
VERSION = 3  # v3: benchmark matches dropped (dataset.decontaminate), held-out split per near-duplicate group, references


def split_of(instruction_id: str, heldout_fraction: float, random_seed: int) -> str:
    """Deterministic per-id split, stable when the pool or limit changes."""
    h = int(hashlib.sha256(f"{random_seed}:{instruction_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if h < heldout_fraction else "train"


def assign_splits(items: Iterable[tuple[str, str]], heldout_fraction: float, random_seed: int) -> dict[str, str]:
    """id -> split, drawn per near-duplicate group (decontaminate.near_duplicate_groups: same words, or word-trigram
    Jaccard >= 0.5) from the group's smallest id: near duplicates never straddle train and held-out, where a
    held-out pair whose twin was trained on would measure memory, not judgment."""
    groups = near_duplicate_groups(items)
    return {i: split_of(g, heldout_fraction, random_seed) for i, g in groups.items()}


# cached(unit, compute) -> rows: the caller's cache for the shared classification units ("prior", "0000", ...).
Cached = Callable[[str, Callable[[], tuple[list[dict], dict]]], list[dict]]


def cached_units(cache: StageCache, cls_key: str, model_name: str) -> Cached:
    """Classification units in the stage cache as classify/<cls_key>-<unit>: each computed once under a lock
    (parallel sweep jobs wait for each other) and read back by every later job."""

    def get(unit: str, compute: Callable[[], tuple[list[dict], dict]]) -> list[dict]:
        cache.compute_once("classify", f"{cls_key}-{unit}", lambda partial: compute(), {"model": model_name, "unit": unit})
        return cache.rows("classify", f"{cls_key}-{unit}")

    return get


def classify_config(cfg: DatasetConfig) -> dict:
    """What the classification depends on (its cache key): not the category, limit or max_scan, so every
    category of a sweep over the same pool reads the same labels."""
    return {
        "categories": list(cfg.categories), "content_free": list(cfg.content_free), "sources": [as_dict(s) for s in cfg.sources],
        "max_chars": cfg.max_chars, "min_chars": cfg.min_chars, "shuffle": cfg.shuffle, "chunk": classify.CHUNK,
    }


def classify_key(cfg: DatasetConfig, data_root: str, seed: ModelSpec, random_seed: int, decontam_key: str) -> str:
    """Key of the classification units select reads (classify/<key>-<unit>): the pool files' bytes, the seed model,
    the prompt's text and `classify_config`, so one classification serves every category of a sweep; and, when
    `decontaminate` is on, the decontam key (its matches are not in the pool that is classified)."""
    return make_key(
        "classify", classify.VERSION, classify_config(cfg),
        {"pool": source_fingerprints(cfg, data_root), "decontaminated": decontam_key if cfg.decontaminate else None},
        model=model_id(seed, None), random_seed=random_seed, prompt=text_fingerprint(classify_template(cfg)),
    )


def key(cfg: DatasetConfig, classify_key: str, random_seed: int) -> str:
    """select's key: the whole dataset config and the labels it reads."""
    return make_key("select", VERSION, as_dict(cfg), {"classify": classify_key}, random_seed=random_seed)


def scan_order(cfg: DatasetConfig, data_root: str, random_seed: int) -> list[tuple[str, str, str]]:
    pool = load_pool(cfg, data_root)
    if cfg.shuffle:
        random.Random(random_seed).shuffle(pool)
    return pool


def scan_pool(cfg: DatasetConfig, data_root: str, random_seed: int, contaminated: Collection[str]) -> tuple[list[tuple[str, str, str]], int]:
    """(the pool select classifies, in scan order; how many pool instructions match a benchmark prompt). The matches
    are dropped when `decontaminate` is on, after the shuffle: the clean instructions keep their order either way."""
    contaminated = set(contaminated)
    pool = scan_order(cfg, data_root, random_seed)
    in_pool = sum(r[0] in contaminated for r in pool)
    return ([r for r in pool if r[0] not in contaminated] if cfg.decontaminate else pool), in_pool


def label_counts(labels: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: round(v / total, 3) for k, v in counts.items()} if total else {}


def expected_scan(cfg: DatasetConfig, cached_labels: list[str]) -> str:
    """The dry run's estimate from labels already classified (any category's job may have made them)."""
    if cfg.category == "any":
        return f"scan {min(cfg.limit, cfg.max_scan)}"
    if not cached_labels:
        return "no cached labels yet: scan until found, at most max_scan"
    share = sum(c == cfg.category for c in cached_labels) / len(cached_labels)
    if share == 0:
        return f"{cfg.category!r} is 0/{len(cached_labels)} of the cached labels: expect to scan max_scan={cfg.max_scan}"
    need = math.ceil(cfg.limit / share)
    return (f"{cfg.category!r} share {share:.2f} of {len(cached_labels)} cached labels: expect to scan ~{min(need, cfg.max_scan)}"
            + (f" (limit {cfg.limit} needs ~{need} > max_scan {cfg.max_scan})" if need > cfg.max_scan else ""))


def run(cfg: DatasetConfig, data_root: str, random_seed: int, model: Callable[[], Generator], cached: Cached,
        contaminated: Collection[str] = ()) -> tuple[list[Instruction], dict]:
    """Scan the shuffled pool chunk by chunk (each chunk classified once, shared by every category) until `limit`
    instructions of the category are found or `max_scan` instructions were scanned. `model()` loads the seed
    only when a chunk is not cached. `contaminated`: pool ids that match a benchmark prompt (the decontaminate
    stage), dropped before classification when `decontaminate` is on."""
    template = classify_template(cfg)
    pool, in_pool = scan_pool(cfg, data_root, random_seed, contaminated)
    scan = pool[: cfg.max_scan]
    wanted = lambda label: cfg.category == "any" or label == cfg.category  # noqa: E731
    prior_rows = None

    def prior() -> list[float] | None:
        nonlocal prior_rows
        if prior_rows is None:
            prior_rows = cached("prior", lambda: _prior(model(), template, cfg))
        return prior_rows[0]["log_prior"] if prior_rows else None

    labels: dict[str, str] = {}
    clipped: set[str] = set()  # instructions cut to fit the classifier's context (classify.fit)
    model_calls = 0
    n_chunks = math.ceil(len(scan) / classify.CHUNK)
    with tqdm(total=len(scan), desc=f"select: classify (dataset={cfg.name})", unit="instr") as bar:
        for c in range(n_chunks):
            if sum(wanted(labels[rid]) for rid, _, _ in scan if rid in labels) >= cfg.limit:
                break  # stream the pool: classify only as much as it takes to fill the category
            rows = pool[c * classify.CHUNK : (c + 1) * classify.CHUNK]  # whole chunks: shareable whatever max_scan is

            def compute(rows=rows):
                nonlocal model_calls
                model_calls += 1
                p = prior() if len(cfg.categories) > 1 else None
                out = classify.classify(model() if len(cfg.categories) > 1 else None, template, cfg.categories, [t for _, t, _ in rows], p)
                done = [{"id": rid, **o} for (rid, _, _), o in zip(rows, out)]
                return done, {"n": len(done), "label_counts": label_counts(r["category"] for r in done)}

            done = cached(f"{c:04d}", compute)
            labels.update({r["id"]: r["category"] for r in done})
            clipped.update(r["id"] for r in done if r.get("clipped"))
            bar.update(min(len(rows), len(scan) - c * classify.CHUNK))
    scanned = [r for r in scan if r[0] in labels]
    # instructions past the first `limit` of the category are scanned too when they share its chunk
    counts = label_counts(labels[rid] for rid, _, _ in scanned)
    chosen = [r for r in scanned if wanted(labels[r[0]])][: cfg.limit]
    if not chosen:
        raise DataError(
            f"dataset={cfg.name}: none of the {len(scanned)} scanned instructions was classified as "
            f"{cfg.category!r} (label shares: {shares(counts)}); raise dataset.max_scan or pick another dataset.category"
        )
    # split per near-duplicate group of everything scanned (a superset of what is kept, so a group's split does
    # not change with `limit`)
    splits = assign_splits(((rid, text) for rid, text, _ in scanned), cfg.heldout_fraction, random_seed)
    refs = references(cfg, data_root, {r[0] for r in chosen})
    out = [
        Instruction(id=rid, text=text, source=where, category=labels[rid], split=splits[rid], reference=refs.get(rid))
        for rid, text, where in chosen
    ]
    stats = {
        "pool_size": len(pool),
        "contaminated": in_pool,  # pool instructions (after the length filter) that match a benchmark prompt
        "decontam_dropped": in_pool if cfg.decontaminate else 0,
        "scanned": len(scanned),
        "kept": len(out),
        "heldout": sum(i.split == "heldout" for i in out),
        "new_chunks": model_calls,
        "classify_clipped": sum(rid in clipped for rid, _, _ in scanned),
        "label_counts": counts,
        **{f"share/{k}": v for k, v in shares(counts).items()},
    }
    log.info("select: dataset=%s kept %d/%d scanned as %r; label shares %s (%d chunk(s) classified now, rest shared)",
             cfg.name, len(out), len(scanned), cfg.category, shares(counts), model_calls)
    return out, stats


def _prior(model: Generator, template, cfg: DatasetConfig) -> tuple[list[dict], dict]:
    p = classify.prior_for(model, template, cfg.categories, cfg.content_free)
    if p is None:
        return [], {}
    return [{"log_prior": p}], {f"prior/{c}": round(math.exp(x), 4) for c, x in zip(cfg.categories, p)}


def execute(step: Step, ctx: Context) -> tuple[list[dict], dict]:
    inputs = ctx.inputs()
    return as_rows(run(step.config, ctx.data_root, step.seed, ctx.model, inputs["classify"], inputs["contaminated"]))


STAGES = {
    # classify's units are computed by select as it scans the pool (select reads them by key, and extends them)
    "classify": Stage(None, read=lambda cache, key, reader: cached_units(cache, key, reader.model)),
    "select": Stage(execute, logged=prefixed("select/"), read=records("select", Instruction), input="training",
                    source=lambda step, cache, data_root: ", ".join(
                        str(resolve(s.path, data_root)) if s.path else f"{s.hf_id}@{s.revision or 'main'}" for s in step.config.sources)),
}

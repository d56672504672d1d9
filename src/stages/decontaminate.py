"""Stage 0, decontaminate: which pool instructions are prompts of the benchmarks the run evaluates on.

Runs before classification and generation, so no model time is spent on a benchmark prompt. Every row of the
pool's sources (before the length filter: the counts describe the source, whatever `max_chars` a job uses) is
compared with every prompt of each enabled benchmark: RewardBench prompts (`eval.rewardbench.source`) and MT-Bench
questions, both turns (the user turns of `eval.mtbench.source`, the human-judgment file the run scores against),
by the rules of src/rules/decontamination.py (normalised exact match, shared word 13-gram, same typed Python signature). The benchmark index is built
once per cache unit.

One cache unit per (pool, benchmark files), `decontam/<key>`: its rows are the matches (the matched ids, logged as an artifact),
its stats the contaminated instructions per benchmark and subset (logged as `decontam/<benchmark>/<subset>`).
Whether matches are dropped is `dataset.decontaminate`, applied by select and part of its key.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from src.cache import make_key
from src.config import as_dict
from src.benchmarks import mtbench, rewardbench
from src.rules.decontamination import NGRAM, BenchmarkPrompt, Index, Match, counts
from src.data import benchmark_source, source_fingerprint
from src.pool import DatasetConfig, source_fingerprints, source_rows
from src.step import Context, Stage, Step, prefixed

log = logging.getLogger(__name__)
VERSION = 3  # 2: the signature rule (a Python function defined as a benchmark prompt asks for it); 3: typed signatures only (generic ones fall to the 13-gram rule)


Benchmarks = dict[str, tuple[str, str | None]]  # name -> (source, revision) of each benchmark the run evaluates on


def config_part(dataset: DatasetConfig, benches: Benchmarks) -> dict:
    """The config part of the stage's key (what its cache meta records): how pool rows are read (`dataset.sources`,
    the only part of the dataset group this stage reads), the rule, and which benchmark files."""
    read = [{k: v for k, v in as_dict(s).items() if k != "reference_field"} for s in dataset.sources]
    return {"sources": read, "ngram": NGRAM, "benchmarks": {b: {"source": s, "revision": r} for b, (s, r) in benches.items()}}


def key_parts(dataset: DatasetConfig, benches: Benchmarks, data_root: str) -> tuple[dict, dict]:
    """(config, inputs) of the stage's cache key: `config_part`, and the identity (content hash, or hub id@revision)
    of the pool and of each benchmark file."""
    inputs = {"pool": source_fingerprints(dataset, data_root),
              "benchmarks": {b: source_fingerprint(s, r, data_root) for b, (s, r) in benches.items()}}
    return config_part(dataset, benches), inputs


def key(dataset: DatasetConfig, benches: Benchmarks, data_root: str) -> str:
    return make_key("decontam", VERSION, *key_parts(dataset, benches, data_root))


def benchmark_prompts(benches: Benchmarks, data_root: str) -> list[BenchmarkPrompt]:
    prompts: list[BenchmarkPrompt] = []
    if "rewardbench" in benches:
        source, revision = benches["rewardbench"]
        prompts += [BenchmarkPrompt("rewardbench", it.subset, str(it.id), it.prompt)
                    for it in rewardbench.load_rewardbench(benchmark_source(source, data_root), revision)]
    if "mtbench" in benches:
        source, revision = benches["mtbench"]
        seen: set[tuple[int, int]] = set()
        for row in mtbench.load_mtbench_human(benchmark_source(source, data_root), revision):
            for turn in (1, 2):  # every row holds both user turns (conversation: user, assistant, user, assistant)
                if (row["question_id"], turn) in seen or len(row["conversation_a"]) < 2 * turn - 1:
                    continue
                seen.add((row["question_id"], turn))
                prompts.append(BenchmarkPrompt("mtbench", str(row.get("category") or "all"), f"{row['question_id']}/turn{turn}",
                                               str(row["conversation_a"][2 * turn - 2]["content"])))
    return prompts


def run(dataset: DatasetConfig, benches: Benchmarks, data_root: str) -> tuple[list[dict], dict]:
    """(one row per (instruction, benchmark prompt) match, counts). Reads `dataset.sources` and the benchmark files."""
    t0 = time.time()
    prompts = benchmark_prompts(benches, data_root)
    index = Index(prompts)
    rows, seen, n = [], set(), 0
    for rid, text, where, _, _ in source_rows(dataset, data_root):
        n += 1
        if rid in seen:  # the same id twice in a source: compared once
            continue
        seen.add(rid)
        rows += [{"instruction_id": rid, "benchmark": m.benchmark, "subset": m.subset, "benchmark_id": m.benchmark_id,
                  "how": m.how, "where": where} for m in index.matches(rid, text)]
    zero = dict.fromkeys(["matched", "exact", "ngram_only", "signature_only", *benches], 0)  # logged as 0 too: runs compare
    stats = {"rows": n, "benchmark_prompts": len(prompts), **zero,
             **counts(Match(r["instruction_id"], r["benchmark"], r["subset"], r["benchmark_id"], r["how"]) for r in rows)}
    log.info("decontaminate: %d of %d pool rows match a prompt of %s (%d prompts; %.1fs): %s", stats["matched"], n,
             "+".join(benches) or "no benchmark", len(prompts), time.time() - t0,
             {k: v for k, v in stats.items() if "/" in k})
    return rows, stats


@dataclass(frozen=True)
class DecontamStep:
    """The step's config: the pool (`dataset`) and the benchmarks the run evaluates on."""

    dataset: DatasetConfig
    benchmarks: Benchmarks


def execute(step: Step, ctx: Context) -> tuple[list[dict], dict]:
    return run(step.config.dataset, step.config.benchmarks, ctx.data_root)


STAGES = {"decontam": Stage(execute, config_part=lambda c: config_part(c.dataset, c.benchmarks), logged=prefixed("decontam/"),
                            read=lambda cache, key, reader: {r["instruction_id"] for r in cache.rows("decontam", key)})}

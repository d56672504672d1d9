"""Hooks for the lm-eval tasks rewardbench_judge and mtbench_human_judge (loaded by lm-eval via !function).

Each benchmark row becomes two docs, one per presentation order, so position bias is measured and averaged
out. process_results returns, besides simple per-sample means, one *record* per doc (the dict that
src/benchmarks' scoring functions take); lm-eval logs it in the per-sample output (--log_samples) under the
metric's name, and aggregates it with the official scoring (RewardBench sections / FastChat agreement), so
lm-eval's own results table already shows the official numbers. src/benchmarks/lmeval_bridge.py recomputes
the full metric dicts from the logged samples.

Slicing: docs come interleaved (RewardBench: round-robin over sections and subsets; MT-Bench: turn 1 / turn
2), each item's two orders adjacent, so `--limit 2N` is N items, roughly stratified.

Judge prompt: the Self-Taught Evaluator `eval_plan` template ({input}, {generation}, {generation2}), read from
shared/data/selftaught_evaluator_release/prompt_templates.json next to the repo, or from the JSON file named
by the environment variable STE_JUDGE_PROMPTS (key "eval_plan"), or from a plain-text template file named
by STE_JUDGE_TEMPLATE.
"""
from __future__ import annotations

import json
import math
import os
import sys
from functools import lru_cache
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # lm-eval imports this file by path; make the project importable
    sys.path.insert(0, str(_REPO_ROOT))

import datasets  # noqa: E402

from src.benchmarks import mtbench as _mt  # noqa: E402
from src.benchmarks import rewardbench as _rb  # noqa: E402

SLICE_SEED = int(os.environ.get("STE_LMEVAL_SLICE_SEED", "0"))
_DEFAULT_PROMPTS = _REPO_ROOT.parent / "shared" / "data" / "selftaught_evaluator_release" / "prompt_templates.json"


def _parse_verdict(text: str | None) -> str | None:
    """Exactly one of the tags "[[A]]" / "[[B]]" occurs in the text -> that letter; both or neither -> None.
    (A private copy of the project's verdict rule: lm-eval loads this file on its own.)"""
    if not text:
        return None
    has_a, has_b = "[[A]]" in text, "[[B]]" in text
    if has_a == has_b:
        return None
    return "A" if has_a else "B"


@lru_cache(maxsize=1)
def judge_template() -> str:
    if os.environ.get("STE_JUDGE_TEMPLATE"):
        return Path(os.environ["STE_JUDGE_TEMPLATE"]).read_text(encoding="utf-8")
    path = Path(os.environ.get("STE_JUDGE_PROMPTS", _DEFAULT_PROMPTS))
    if not path.exists():
        raise FileNotFoundError(
            f"judge prompt templates not found at {path}; set STE_JUDGE_PROMPTS (JSON with 'eval_plan') or "
            "STE_JUDGE_TEMPLATE (a text file with {input}, {generation}, {generation2})"
        )
    return json.loads(path.read_text(encoding="utf-8"))["eval_plan"]


def _format(question: str, answer_a: str, answer_b: str) -> str:
    # str.replace, not str.format: answers contain braces (code)
    return (
        judge_template()
        .replace("{input}", question)
        .replace("{generation}", answer_a)
        .replace("{generation2}", answer_b)
    )


def doc_to_text(doc: dict) -> str:
    return _format(doc["question"], doc["answer_a"], doc["answer_b"])


def keep_all(resps, docs):
    """Filter: keep every sampled response (a list per doc), so process_results can do maj@k with repeats>1."""
    return [list(r) for r in resps]


def _verdicts(results: list) -> tuple[str | None, list[str | None]]:
    """(first response's verdict, all verdicts when there are several responses else [])."""
    first = results[0]
    texts = list(first) if isinstance(first, (list, tuple)) else [first]
    verdicts = [_parse_verdict(t) for t in texts]
    return verdicts[0], (verdicts if len(verdicts) > 1 else [])


# ----------------------------------------------------------------------------------------------- RewardBench
def rewardbench_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    items = [_rb._item_from_row(row, f"rewardbench row {i}") for i, row in enumerate(dataset)]
    docs = []
    for it in _rb.stratified_slice(items, per_subset=None, seed=SLICE_SEED):
        for order in _rb.ORDERS:
            question, answer_a, answer_b, chosen_label = _rb.judge_inputs(it, order)
            docs.append({
                "id": it.id, "subset": it.subset, "section": it.section, "order": order,
                "chosen_label": chosen_label, "question": question, "answer_a": answer_a, "answer_b": answer_b,
            })
    return datasets.Dataset.from_list(docs)


def rewardbench_process_results(doc: dict, results: list) -> dict:
    verdict, verdicts_k = _verdicts(results)
    record = {
        "subset": doc["subset"], "section": doc["section"], "id": int(doc["id"]), "order": doc["order"],
        "chosen_label": doc["chosen_label"], "verdict": verdict, "verdicts_k": verdicts_k,
    }
    return {
        "rewardbench_overall": record,
        "acc": _rb.order_score(_rb.picked(verdict, doc["chosen_label"])),
        "parse_fail": float(verdict is None),
    }


def agg_rewardbench_overall(records: list[dict]) -> float:
    return _rb.rewardbench_metrics(records)["rewardbench/overall"]


# ----------------------------------------------------------------------------------------------- MT-Bench
def mtbench_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    rows = [dict(r) for r in dataset]
    docs = []
    # keys with at least one expert vote (FastChat's "human"); their author votes ride along in human_votes
    for row in _mt.stratified_slice(rows, max_keys=None, seed=SLICE_SEED, human_prefixes=("expert",)):
        for order in _mt.MT_ORDERS:
            question, answer_a, answer_b = _mt.build_judge_inputs(row, swap=(order == "ba"))
            docs.append({
                "question_id": int(row["question_id"]), "model_a": row["model_a"], "model_b": row["model_b"],
                "turn": int(row["turn"]), "category": row.get("category") or "", "order": order,
                "question": question, "answer_a": answer_a, "answer_b": answer_b,
                "human_votes": row["human_votes"],
            })
    return datasets.Dataset.from_list(docs)


def mtbench_doc_to_target(doc: dict) -> str:
    return ""


def mtbench_process_results(doc: dict, results: list) -> dict:
    verdict, verdicts_k = _verdicts(results)
    record = {
        "question_id": int(doc["question_id"]), "model_a": doc["model_a"], "model_b": doc["model_b"],
        "turn": int(doc["turn"]), "order": doc["order"], "verdict": verdict, "verdicts_k": verdicts_k,
        "human_votes": [dict(v) for v in doc["human_votes"]],
    }
    return {"agreement_s1": record, "agreement_s2": record, "parse_fail": float(verdict is None)}


def _mt_agg(records: list[dict], key: str) -> float:
    seen, keyed = set(), []
    for r in records:
        k = (r["question_id"], r["model_a"], r["model_b"], r["turn"])
        if k not in seen:
            seen.add(k)
            keyed.append(r)
    metrics = _mt.mtbench_metrics(records, _mt.human_rows_from_keyed(keyed))
    return metrics.get(key, math.nan)


def agg_mtbench_s1(records: list[dict]) -> float:
    return _mt_agg(records, "mtbench/agreement_s1")


def agg_mtbench_s2(records: list[dict]) -> float:
    return _mt_agg(records, "mtbench/agreement_s2")

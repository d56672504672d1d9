"""Hooks for the lm-eval tasks rewardbench_judge and mtbench_human_judge (loaded by lm-eval via !function).

Each benchmark row becomes two docs, one per presentation order, so position bias is measured and averaged
out. process_results returns, besides simple per-sample means, one *record* per doc (the dict that
src/benchmarks' scoring functions take); lm-eval logs it in the per-sample output (--log_samples) under the
metric's name, and aggregates it with the official scoring (RewardBench sections / FastChat agreement), so
lm-eval's own results table already shows the official numbers. src/benchmarks/lmeval_bridge.py recomputes
the full metric dicts from the logged samples.

Slicing: docs come interleaved (RewardBench: round-robin over sections and subsets; MT-Bench: turn 1 / turn
2), each item's two orders adjacent, so `--limit 2N` is N items, roughly stratified.

Judge prompt: the loop's evaluation prompt, read from the same file (src/prompts/self_taught_eval.json, the
paper's system + user prompt; src.stages.judge.judge_template), or from the file named by the environment variable
STE_EVAL_PROMPT (same syntax as the config key eval.prompt, e.g. path/prompt_templates.json:eval_plan). The user
message is doc_to_text; the system message rides in each doc's "judge_system" field, which the YAMLs name as the
task `description`: with --apply_chat_template lm-eval sends it as the system turn (without, it is prepended).
Unlike the loop, responses are not clipped (lm-eval truncates over-long contexts itself).

Verdicts: each benchmark's official parser, as in the loop (src/rules/verdicts.py): RewardBench `process_judgement`,
FastChat's per-order parse for MT-Bench.
"""
from __future__ import annotations

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
from src.rules.verdicts import fastchat_verdict, rewardbench_verdict  # noqa: E402

SLICE_SEED = int(os.environ.get("STE_LMEVAL_SLICE_SEED", "0"))


@lru_cache(maxsize=1)
def judge_template():
    from src.stages.judge import judge_template as template_for

    return template_for(os.environ.get("STE_EVAL_PROMPT") or None, "eval.prompt")


def doc_to_text(doc: dict) -> str:
    return judge_template().fill(input=doc["question"], generation=doc["answer_a"], generation2=doc["answer_b"])


def _system() -> str:
    return judge_template().system or ""


def keep_all(resps, docs):
    """Filter: keep every sampled response (a list per doc), so process_results can do maj@k with repeats>1."""
    return [list(r) for r in resps]


def _verdicts(results: list, parse) -> tuple[str | None, list[str | None]]:
    """(first response's verdict, all verdicts when there are several responses else [])."""
    first = results[0]
    texts = list(first) if isinstance(first, (list, tuple)) else [first]
    verdicts = [parse(t or "") for t in texts]
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
                "judge_system": _system(),
            })
    return datasets.Dataset.from_list(docs)


def rewardbench_process_results(doc: dict, results: list) -> dict:
    verdict, verdicts_k = _verdicts(results, rewardbench_verdict)
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
                "human_votes": row["human_votes"], "judge_system": _system(),
            })
    return datasets.Dataset.from_list(docs)


def mtbench_doc_to_target(doc: dict) -> str:
    return ""


def mtbench_process_results(doc: dict, results: list) -> dict:
    verdict, verdicts_k = _verdicts(results, fastchat_verdict)
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

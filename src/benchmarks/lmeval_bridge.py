"""Official RewardBench / MT-Bench metrics from lm-eval per-sample output (`--log_samples`).

The tasks in lm_eval_tasks/ log one record per doc under a metric name (see lm_eval_tasks/utils.py):
rewardbench_judge -> sample["rewardbench_overall"], mtbench_human_judge -> sample["agreement_s1"]. The
records are exactly what `rewardbench.rewardbench_metrics` / `mtbench.mtbench_metrics` take; MT-Bench records
also carry the key's human votes, from which the human rows are rebuilt.

Input: a samples_<task>_<date>.jsonl file, a directory holding such files (searched recursively; the newest
file per task wins), or the list of sample dicts (`simple_evaluate(...)["samples"][task]`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from src.benchmarks import mtbench, rewardbench

REWARDBENCH_TASK = "rewardbench_judge"
MTBENCH_TASK = "mtbench_human_judge"
RECORD_FIELD = {REWARDBENCH_TASK: "rewardbench_overall", MTBENCH_TASK: "agreement_s1"}

_SAMPLES_RE = re.compile(r"^samples_(?P<task>.+)_(?P<date>[^_]+)\.jsonl$")

SamplesSource = str | Path | Sequence[Mapping]


def find_samples_files(output_path: str | Path) -> dict[str, Path]:
    """{task: newest samples file} under an lm-eval --output_path directory (or a single file)."""
    p = Path(output_path)
    files = [p] if p.is_file() else sorted(p.rglob("samples_*.jsonl"))
    found: dict[str, Path] = {}
    for f in files:
        m = _SAMPLES_RE.match(f.name)
        if not m:
            continue
        task = m.group("task")
        if task not in found or (m.group("date"), str(f)) > (_SAMPLES_RE.match(found[task].name).group("date"), str(found[task])):
            found[task] = f
    return found


def read_samples(path: str | Path) -> list[dict]:
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    samples.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
    return samples


def _load(source: SamplesSource, task: str) -> list[Mapping]:
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_dir():
            files = find_samples_files(p)
            if task not in files:
                raise FileNotFoundError(f"no samples_{task}_*.jsonl under {p}")
            p = files[task]
        return read_samples(p)
    return list(source)


def records_from_samples(samples: Iterable[Mapping], task: str, filter_name: str | None = None) -> list[dict]:
    """The per-doc records a task logged (one filter only: `filter_name`, or the first one seen)."""
    field = RECORD_FIELD[task]
    out = []
    for s in samples:
        if filter_name is None:
            filter_name = s.get("filter")
        if s.get("filter") != filter_name:
            continue
        if field not in s:
            raise ValueError(f"{task} sample doc_id={s.get('doc_id')} has no {field!r} record (keys: {sorted(s)})")
        out.append(dict(s[field]))
    if not out:
        raise ValueError(f"no {task} samples")
    return out


def rewardbench_metrics_from_samples(source: SamplesSource, filter_name: str | None = None) -> dict[str, float]:
    records = records_from_samples(_load(source, REWARDBENCH_TASK), REWARDBENCH_TASK, filter_name)
    return rewardbench.rewardbench_metrics(records)


def mtbench_metrics_from_samples(
    source: SamplesSource, filter_name: str | None = None, human_prefixes: Sequence[str] = ("expert",)
) -> dict[str, float]:
    records = records_from_samples(_load(source, MTBENCH_TASK), MTBENCH_TASK, filter_name)
    keyed: dict[tuple, dict] = {}
    for r in records:
        keyed.setdefault((r["question_id"], r["model_a"], r["model_b"], r["turn"]), r)
    human_rows = mtbench.human_rows_from_keyed(keyed.values())
    return mtbench.mtbench_metrics(records, human_rows, human_prefixes)


def metrics_from_lmeval_output(output_path: str | Path) -> dict[str, float]:
    """Both benchmarks' metric dicts (whichever tasks have samples under `output_path`), merged."""
    files = find_samples_files(output_path)
    out: dict[str, float] = {}
    if REWARDBENCH_TASK in files:
        out.update(rewardbench_metrics_from_samples(files[REWARDBENCH_TASK]))
    if MTBENCH_TASK in files:
        out.update(mtbench_metrics_from_samples(files[MTBENCH_TASK]))
    if not out:
        raise FileNotFoundError(f"no {REWARDBENCH_TASK} / {MTBENCH_TASK} samples under {output_path}")
    return out

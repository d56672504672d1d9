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
REWARDBENCH_FIELD = "rewardbench_overall"  # the metric whose per-sample value is the record
MTBENCH_FIELD = "agreement_s1"

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


def records_from_samples(samples: Iterable[Mapping], field: str, filter_name: str | None = None) -> list[dict]:
    """The per-doc records logged under metric `field` (REWARDBENCH_FIELD or MTBENCH_FIELD), for one filter
    only: `filter_name`, or the first one seen."""
    out = []
    for s in samples:
        if filter_name is None:
            filter_name = s.get("filter")
        if s.get("filter") != filter_name:
            continue
        if field not in s:
            raise ValueError(f"sample doc_id={s.get('doc_id')} has no {field!r} record (keys: {sorted(s)})")
        out.append(dict(s[field]))
    if not out:
        raise ValueError(f"no samples with {field!r} records")
    return out


def rewardbench_metrics_from_samples(
    source: SamplesSource, filter_name: str | None = None, task: str = REWARDBENCH_TASK
) -> dict[str, float]:
    """`task` only names the samples file to pick when `source` is a directory (tasks derived from the YAML
    via `include:` keep the record field)."""
    records = records_from_samples(_load(source, task), REWARDBENCH_FIELD, filter_name)
    return rewardbench.rewardbench_metrics(records)


def mtbench_metrics_from_samples(
    source: SamplesSource,
    filter_name: str | None = None,
    human_prefixes: Sequence[str] = ("expert",),
    task: str = MTBENCH_TASK,
) -> dict[str, float]:
    records = records_from_samples(_load(source, task), MTBENCH_FIELD, filter_name)
    keyed: dict[tuple, dict] = {}
    for r in records:
        keyed.setdefault((r["question_id"], r["model_a"], r["model_b"], r["turn"]), r)
    human_rows = mtbench.human_rows_from_keyed(keyed.values())
    return mtbench.mtbench_metrics(records, human_rows, human_prefixes)


def _record_field_of(path: Path) -> str | None:
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    if not first.strip():
        return None
    metrics = json.loads(first).get("metrics", [])
    for field in (REWARDBENCH_FIELD, MTBENCH_FIELD):
        if field in metrics:
            return field
    return None


def metrics_from_lmeval_output(output_path: str | Path) -> dict[str, float]:
    """Both benchmarks' metric dicts from an lm-eval --output_path (whichever of the two kinds of task have
    samples there, recognised by their record field, so renamed variants work too), merged. Two tasks of the
    same kind in one output are ambiguous: pass their samples files to the *_from_samples functions instead."""
    by_field: dict[str, list[Path]] = {REWARDBENCH_FIELD: [], MTBENCH_FIELD: []}
    for f in find_samples_files(output_path).values():
        field = _record_field_of(f)
        if field is not None:
            by_field[field].append(f)
    out: dict[str, float] = {}
    for field, files in by_field.items():
        if len(files) > 1:
            raise ValueError(f"several {field!r} tasks under {output_path}: {[str(f) for f in files]}")
        if files:
            if field == REWARDBENCH_FIELD:
                out.update(rewardbench_metrics_from_samples(files[0]))
            else:
                out.update(mtbench_metrics_from_samples(files[0]))
    if not out:
        raise FileNotFoundError(f"no RewardBench / MT-Bench judge samples under {output_path}")
    return out

"""Measure the instruction classifier on MT-Bench's 80 labelled questions (first turns):

    python -m src.cli.classify_eval                      # the CPU default's seed and dataset label set
    python -m src.cli.classify_eval seed=qwen_coder_1.5b dataset=reasoning

Per-category precision and recall of the seed's calibrated label choice (src/classification.py), the same
prompt, label set and calibration the `dataset` group configures. Cached under <results_dir>/cache/classify_eval/<key>
(key: model, prompt text, label set, calibration inputs, data file), so it runs again only when the classifier
config changes; every run prints the table and writes it to that folder (metrics.json, table.md).
These questions only measure the classifier: they are MT-Bench evaluation prompts, never a training pool.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from src.cache import StageCache, file_fingerprint, make_key
from src.config import as_dict, typed
from src.data import resolve
from src.models.base import ModelSpec
from src.prompts import text_fingerprint
from src.stages import select
from src import classification as classify
from src.pool import DatasetConfig

log = logging.getLogger(__name__)
VERSION = 1
DATA = "mtbench/question.jsonl"
# MT-Bench category -> our label. coding is `code`; stem and humanities questions ask to explain concepts and
# facts (`knowledge`); roleplay is `persona`. The others keep their name. `other` has no MT-Bench counterpart.
MTBENCH_TO_LABEL = {"coding": "code", "stem": "knowledge", "humanities": "knowledge", "roleplay": "persona"}


def gold_label(mt_category: str) -> str:
    return MTBENCH_TO_LABEL.get(mt_category, mt_category)


def precision_recall(pred: list[str], gold: list[str], labels: list[str]) -> dict[str, dict[str, float | int | None]]:
    out = {}
    for c in labels:
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        n_pred, n_gold = sum(p == c for p in pred), sum(g == c for g in gold)
        out[c] = {"precision": tp / n_pred if n_pred else None, "recall": tp / n_gold if n_gold else None,
                  "predicted": n_pred, "gold": n_gold}
    return out


def table(metrics: dict, title: str) -> str:
    f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [title, "", "| label | MT-Bench categories | gold | predicted | precision | recall |", "|---|---|---:|---:|---:|---:|"]
    for c, m in metrics["per_label"].items():
        src = ", ".join(k for k in ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"] if gold_label(k) == c) or "–"
        lines.append(f"| {c} | {src} | {m['gold']} | {m['predicted']} | {f(m['precision'])} | {f(m['recall'])} |")
    lines.append(f"\naccuracy {metrics['accuracy']:.3f} over {metrics['n']} questions (uncalibrated argmax: {metrics['accuracy_uncalibrated']:.3f})")
    return "\n".join(lines)


def evaluate(spec: ModelSpec, dataset: DatasetConfig, data_root: str, cache_dir: Path, model_cache: str | None) -> tuple[dict, Path]:
    template = select.classify_template(dataset)
    data = resolve(DATA, data_root)
    key = make_key(
        "classify_eval", VERSION, {"categories": list(dataset.categories), "content_free": list(dataset.content_free),
                                   "max_chars": dataset.max_chars},
        {"data": file_fingerprint(data)}, model=as_dict(spec), prompt=text_fingerprint(template), classify=classify.VERSION,
    )
    cache = StageCache(cache_dir)

    def compute(partial):
        from src.models.loading import load_generator

        rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
        # the pool skips instructions over max_chars; MT-Bench's long extraction prompts are cut there instead
        texts = [r["turns"][0][: dataset.max_chars] for r in rows]
        gold = [gold_label(r["category"]) for r in rows]
        unknown = sorted({g for g in gold} - set(dataset.categories))
        if unknown:
            raise ValueError(f"dataset.categories {dataset.categories} lacks {unknown}, needed for MT-Bench's categories")
        model = load_generator(spec, cache_dir=model_cache)
        prior = classify.prior_for(model, template, dataset.categories, dataset.content_free)
        out = classify.classify(model, template, dataset.categories, texts, prior)
        pred = [o["category"] for o in out]
        raw = [classify.pick(o["scores"], None, dataset.categories) for o in out]
        model.close()
        per = precision_recall(pred, gold, list(dataset.categories))
        metrics = {"n": len(gold), "accuracy": sum(p == g for p, g in zip(pred, gold)) / len(gold),
                   "accuracy_uncalibrated": sum(p == g for p, g in zip(raw, gold)) / len(gold),
                   "prior": dict(zip(dataset.categories, [round(2.718281828 ** x, 4) for x in prior])) if prior else None,
                   "per_label": per, "model": spec.name, "prompt": template.origin}
        (partial.dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        title = f"Classifier on MT-Bench's 80 questions: seed={spec.name}, prompt {Path(template.origin).name}, calibration {list(dataset.content_free)}"
        (partial.dir / "table.md").write_text(table(metrics, title) + "\n")
        return [{"question_id": r["question_id"], "gold": g, "pred": p, **o} for r, g, p, o in zip(rows, gold, pred, out)], \
            {"accuracy": metrics["accuracy"]}

    cached = cache.compute_once("classify_eval", key, compute, {"model": spec.name})
    folder = cache.path("classify_eval", key)
    log.info("classify_eval: %s (key %s)", "cached" if cached else "computed", key)
    return json.loads((folder / "metrics.json").read_text()), folder


def main(argv: list[str]) -> None:
    from src.config import CONF_DIR

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=argv)
    spec = typed(ModelSpec, cfg.seed, "seed")
    dataset = typed(DatasetConfig, cfg.dataset, "dataset")
    results = Path(str(cfg.results_dir)).expanduser().resolve()
    cache_dir = Path(cfg.pipeline.cache_dir).expanduser().resolve() if cfg.pipeline.cache_dir else results / "cache"
    _, folder = evaluate(spec, dataset, str(cfg.data_root), cache_dir, cfg.pipeline.model_cache_dir)
    print((folder / "table.md").read_text())
    print(f"(saved in {folder})")


if __name__ == "__main__":
    main(sys.argv[1:])

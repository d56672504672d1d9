"""Bad configs and bad data fail early with a message naming the key, file or line."""
import gzip
import json

import pytest

from src.config import ConfigError
from src.data import DataError
from src.job import Job, preflight
from src.plan import plan
from tests.conftest import TINY


def job(make_cfg, *overrides):
    return Job.from_config(make_cfg(*TINY, *overrides))


def test_unknown_key_is_named(make_cfg):
    with pytest.raises(ConfigError, match=r"unknown key judging\.temprature"):
        job(make_cfg, "+judging.temprature=0.5")


def test_unknown_category_is_named(make_cfg):
    with pytest.raises(ConfigError, match=r"dataset\.category='poetry' is not one of dataset\.categories"):
        job(make_cfg, "dataset.category=poetry")


def test_unknown_filter_lists_the_known_ones(make_cfg):
    with pytest.raises(ConfigError, match=r"filter\.name='best'.*correct, all"):
        job(make_cfg, "filter.name=best")


def test_prompt_missing_a_placeholder_names_file_and_placeholder(make_cfg, tmp_path):
    bad = tmp_path / "judge.txt"
    bad.write_text("Which is better? {input} {generation}")
    with pytest.raises(ConfigError, match=r"judge\.txt.*lacks placeholder \{generation2\}"):
        plan(job(make_cfg, f"judging.prompt={bad}"))


def test_paper_template_loads_from_the_release_json(make_cfg):
    from tests.conftest import DATA_ROOT

    steps = plan(job(make_cfg, f"judging.prompt={DATA_ROOT}/selftaught_evaluator_release/prompt_templates.json:eval_plan"))
    assert steps  # the paper's eval_plan has {input} {generation} {generation2}


def test_missing_data_root_says_how_to_set_it(make_cfg, tmp_path):
    with pytest.raises(DataError, match=r"not found \(data_root=.*STE_DATA_ROOT"):
        plan(job(make_cfg, f"data_root={tmp_path}/nowhere"))


def test_malformed_jsonl_line_is_named(make_cfg, tmp_path):
    pool = tmp_path / "pool.jsonl"
    good = json.dumps({"id": "a", "prompt": "Explain why the sky is blue in two sentences."})
    pool.write_text(good + "\n" + '{"id": "b", "prompt": "unterminated\n')
    with pytest.raises(DataError, match=r"pool\.jsonl:2: malformed JSON"):
        preflight(job(make_cfg, f"dataset.sources=[{{path: {pool}}}]"))


def test_missing_field_is_named_with_line_and_key(make_cfg, tmp_path):
    pool = tmp_path / "pool.jsonl.gz"
    with gzip.open(pool, "wt") as f:
        f.write(json.dumps({"id": "a", "prompt": "Plan a three-day trip to Kyoto on a budget."}) + "\n")
        f.write(json.dumps({"id": "b", "text": "Wrong field name here, but long enough."}) + "\n")
    with pytest.raises(DataError, match=r"pool\.jsonl\.gz:2.*missing key 'prompt'"):
        preflight(job(make_cfg, f"dataset.sources=[{{path: {pool}}}]"))


def test_lr_scheduler_names_are_transformers_own(make_cfg):
    """train.lr_scheduler is checked against a written-out list (no torch import to check a config): it must be
    exactly transformers' SchedulerType."""
    from transformers import SchedulerType

    from src.stages.train import SCHEDULERS

    assert list(SCHEDULERS) == [t.value for t in SchedulerType]
    with pytest.raises(ConfigError, match=r"train\.lr_scheduler='cosine_annealing': one of linear, cosine"):
        job(make_cfg, "train.lr_scheduler=cosine_annealing")


# Every numeric field's bounds, checked when the job is composed (before the dry run prints and before anything
# loads): one ConfigError naming the key and the bound. Each of these was accepted before (issue 21).
OUT_OF_BOUNDS = [
    ("train.num_epochs=0", r"train\.num_epochs=0: must be > 0"),
    ("train.num_epochs=-2", r"train\.num_epochs=-2: must be > 0"),
    ("train.lora_r=0", r"train\.lora_r=0: must be >= 1"),
    ("train.lora_r=-4", r"train\.lora_r=-4: must be >= 1"),
    ("train.lora_dropout=1.5", r"train\.lora_dropout=1\.5: must be >= 0 and < 1"),
    ("train.weight_decay=-1", r"train\.weight_decay=-1: must be >= 0"),
    ("train.save_steps=0", r"train\.save_steps=0: must be >= 1"),
    ("train.learning_rate=0", r"train\.learning_rate=0: must be > 0"),
    ("train.warmup_steps=-1", r"train\.warmup_steps=-1: must be >= 0"),
    ("eval.rewardbench.per_subset=0", r"eval\.rewardbench\.per_subset=0: must be >= 1"),
    ("eval.rewardbench.per_subset=-1", r"eval\.rewardbench\.per_subset=-1: must be >= 1"),
    ("eval.mtbench.max_keys=0", r"eval\.mtbench\.max_keys=0: must be >= 1"),
    ("eval.mtbench.max_keys=-1", r"eval\.mtbench\.max_keys=-1: must be >= 1"),
    ("tracking.sample_rows=-1", r"tracking\.sample_rows=-1: must be >= 0"),
    ("judging.top_p=0", r"judging\.top_p=0: must be > 0 and <= 1"),
    ("eval.rewardbench.maj_top_p=0", r"eval\.rewardbench\.maj_top_p=0: must be > 0 and <= 1"),
    ("eval.max_response_chars=0", r"eval\.max_response_chars=0: must be >= 1"),
    ("judging.max_response_chars=0", r"judging\.max_response_chars=0: must be >= 1"),
]


@pytest.mark.parametrize("override,message", OUT_OF_BOUNDS, ids=[o for o, _ in OUT_OF_BOUNDS])
def test_out_of_bounds_value_is_refused_naming_key_and_bound(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        job(make_cfg, override)


def test_optional_fields_still_take_null_for_all(make_cfg):
    j = job(make_cfg, "eval.rewardbench.per_subset=null", "eval.mtbench.max_keys=null")
    assert j.eval.rewardbench.per_subset is None and j.eval.mtbench.max_keys is None


def test_num_epochs_zero_stops_the_cli_dry_run_with_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import DATA_ROOT, REPO

    proc = subprocess.run([sys.executable, "-m", "src.main", *TINY, "train.num_epochs=0", "pipeline.dry_run=true",
                           f"data_root={DATA_ROOT}", f"results_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert "train.num_epochs=0: must be > 0" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ config values are type- and range-checked
@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=fast", r"train\.learning_rate='fast': expected a number"),
    ("judging.n=2.5", r"judging\.n=2\.5: expected an integer"),
    ("pipeline.chunk_size=0", r"pipeline\.chunk_size=0: must be >= 1"),
    ("eval.max_new_tokens=-5", r"eval\.max_new_tokens=-5: must be >= 1"),
    ("judging.both_orders=3", r"judging\.both_orders=3: expected true or false"),
    ("judging.top_p=1.5", r"judging\.top_p=1\.5: must be > 0 and <= 1"),
])
def test_bad_config_values_fail_with_the_key(make_cfg, override, message):
    from src.config import ConfigError
    from src.job import Job

    with pytest.raises(ConfigError, match=message):
        Job.from_config(make_cfg(*TINY, override))


# ------------------------------------------------------------------ damaged data files name file and line
def _corpus(tmp_path):
    import gzip

    good = json.dumps({"id": "a", "prompt": "Explain why the sky is blue in two sentences."}) + "\n"
    cases = {}
    full = gzip.compress((good * 400).encode())
    cases["truncated.jsonl.gz"] = (full[: len(full) // 2], r"truncated\.jsonl\.gz:\d+: corrupt or truncated gzip")
    cases["garbage.jsonl"] = (good.encode() + bytes(range(128, 256)) + b"\n", r"garbage\.jsonl:2: not UTF-8")
    cases["latin1.jsonl"] = (good.encode() + '{"id": "b", "prompt": "caf\xe9"}\n'.encode("latin-1"), r"latin1\.jsonl:2: not UTF-8")
    cases["notgzip.jsonl.gz"] = (b"plain text, not gzip\n", r"notgzip\.jsonl\.gz:1: corrupt or truncated gzip")
    cases["array.jsonl"] = (good.encode() + b"[1, 2]\n", r"array\.jsonl:2: expected a JSON object")
    cases["nofield.jsonl"] = (good.encode() + b'{"id": "c", "text": "x"}\n', r"nofield\.jsonl:2.*missing key 'prompt'")
    out = []
    for name, (data, pattern) in cases.items():
        (tmp_path / name).write_bytes(data)
        out.append((tmp_path / name, pattern))
    return out


def test_malformed_pool_files_name_file_and_line(make_cfg, tmp_path):
    from src.data import DataError
    from src.job import Job, preflight

    for path, pattern in _corpus(tmp_path):
        with pytest.raises(DataError, match=pattern):
            preflight(Job.from_config(make_cfg(*TINY, f"dataset.sources=[{{path: {path}}}]")))


def test_preflight_checks_benchmark_files(make_cfg, tmp_path):
    from src.data import DataError
    from src.job import Job, preflight

    missing = tmp_path / "nowhere.jsonl.gz"
    with pytest.raises(DataError, match=r"nowhere\.jsonl\.gz: file not found"):
        preflight(Job.from_config(make_cfg(*TINY, f"eval.rewardbench.source={missing}")))
    bad = tmp_path / "mt.jsonl.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match=r"mt\.jsonl\.gz:1: corrupt or truncated gzip"):
        preflight(Job.from_config(make_cfg(*TINY, f"eval.mtbench.source={bad}")))


def test_dataclass_defaults_are_the_default_yaml(make_cfg):
    """One set of defaults: a dataclass built in code (tests, the standalone scorer) means what the CLI runs.
    A dataset's pool and label set are its identity, not defaults, so they are left out."""
    import dataclasses

    from omegaconf import OmegaConf

    cfg = make_cfg("tracking=mlflow", "pipeline.model_cache_dir=null")  # the conf/config.yaml defaults
    diffs = []

    def walk(cls, node, where):
        for f in dataclasses.fields(cls):
            if f.name not in node or (where == "dataset" and f.name in ("sources", "categories")):
                continue
            if f.default is not dataclasses.MISSING:
                d = f.default
            elif f.default_factory is not dataclasses.MISSING:
                d = f.default_factory()
            else:
                continue
            if dataclasses.is_dataclass(d):
                walk(type(d), node[f.name], f"{where}.{f.name}")
            elif d != node[f.name]:
                diffs.append(f"{where}.{f.name}: dataclass {d!r}, conf {node[f.name]!r}")

    from src.rules.filters import FilterConfig
    from src.job import PipelineConfig
    from src.stages.evaluate import EvalConfig
    from src.stages.generate import NegativesConfig
    from src.judging import JudgingConfig
    from src.pool import DatasetConfig
    from src.stages.train import TrainConfig
    from src.tracking import TrackingConfig

    for g, cls in {"judging": JudgingConfig, "train": TrainConfig, "eval": EvalConfig, "negatives": NegativesConfig,
                   "filter": FilterConfig, "tracking": TrackingConfig, "pipeline": PipelineConfig, "dataset": DatasetConfig}.items():
        walk(cls, OmegaConf.to_container(cfg[g], resolve=True), g)
    assert diffs == []

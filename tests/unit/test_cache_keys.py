"""What invalidates what: stage keys are a function of exactly the config that changes each stage's result."""
import shutil

from src.job import Job
from src.plan import plan
from tests.conftest import DATA_ROOT, TINY


def keys(make_cfg, *overrides, results=None):
    return {(s.stage, s.iteration): s.key for s in plan(Job.from_config(make_cfg(*TINY, *overrides, results=results)))}


def test_same_config_same_keys_and_paths_do_not_matter(make_cfg, tmp_path):
    a = keys(make_cfg, f"pipeline.cache_dir={tmp_path}/c")
    b = keys(make_cfg, f"pipeline.cache_dir={tmp_path}/c", results=tmp_path / "elsewhere")
    assert a == b


def test_filter_change_reuses_select_generate_judge1_and_eval0(make_cfg):
    a, b = keys(make_cfg, "filter=correct"), keys(make_cfg, "filter=all")
    for shared in [("select", 0), ("generate", 0), ("synthetic", 0), ("judge", 1)]:
        assert a[shared] == b[shared], shared
    for changed in [("filter", 1), ("train", 1), ("synthetic", 1)]:
        assert a[changed] != b[changed], changed


def test_more_iterations_reuse_the_earlier_ones(make_cfg):
    k2, k3 = keys(make_cfg, "iterations=2"), keys(make_cfg, "iterations=3")
    assert all(k3[s] == v for s, v in k2.items())
    assert ("judge", 3) in k3 and ("judge", 3) not in k2


def test_judging_change_invalidates_judge_and_downstream_only(make_cfg):
    a, b = keys(make_cfg, "judging.n=2"), keys(make_cfg, "judging.n=4")
    assert a[("generate", 0)] == b[("generate", 0)] and a[("synthetic", 0)] == b[("synthetic", 0)]
    assert a[("judge", 1)] != b[("judge", 1)] and a[("train", 1)] != b[("train", 1)]


def test_dataset_change_invalidates_everything(make_cfg):
    a, b = keys(make_cfg, "dataset.limit=6"), keys(make_cfg, "dataset.limit=7")
    untrained_benchmarks = {("rewardbench", 0), ("mtbench", 0)}  # the untrained judge on fixed data: shared
    # the pool's classification does not depend on limit (nor on the category): shared too; so is the search for
    # benchmark prompts in the pool (it reads only dataset.sources)
    shared = untrained_benchmarks | {("classify", 0), ("decontam", 0)}
    assert all(a[s] != b[s] for s in a if s not in shared)
    assert all(a[s] == b[s] for s in shared)


def test_init_from_previous_chains_train_keys(make_cfg):
    a, b = keys(make_cfg, "iterations=2", "train.init_from=seed"), keys(make_cfg, "iterations=2", "train.init_from=previous")
    assert a[("judge", 2)] != b[("judge", 2)]  # judge(2) wears train(1)'s adapter, whose config differs
    assert a[("train", 2)] != b[("train", 2)]


def test_first_judge_choice_changes_iteration1_judgments(make_cfg):
    a = keys(make_cfg, "seed=tiny_random", "judge=smollm2_135m", "pipeline.first_judge=seed")
    b = keys(make_cfg, "seed=tiny_random", "judge=smollm2_135m", "pipeline.first_judge=judge")
    assert a[("judge", 1)] != b[("judge", 1)]
    assert a[("synthetic", 0)] == b[("synthetic", 0)]


def test_editing_the_pool_file_invalidates_select(make_cfg, tmp_path):
    root = tmp_path / "data"
    (root / "instructions").mkdir(parents=True)
    src = DATA_ROOT / "instructions" / "sharegpt_v3_first_turn_prompts.jsonl.gz"
    shutil.copy(src, root / "instructions" / src.name)
    a = keys(make_cfg, f"data_root={root}")
    (root / "instructions" / src.name).write_bytes(src.read_bytes() + b"\n")  # same rows, different bytes
    b = keys(make_cfg, f"data_root={root}")
    assert a[("select", 0)] != b[("select", 0)]


def test_prompt_file_content_is_part_of_the_key(make_cfg, tmp_path):
    prompt = tmp_path / "judge.txt"
    prompt.write_text("Judge {input}\nA: {generation}\nB: {generation2}\n")
    a = keys(make_cfg, f"judging.prompt={prompt}")
    prompt.write_text("Judge carefully {input}\nA: {generation}\nB: {generation2}\n")
    b = keys(make_cfg, f"judging.prompt={prompt}")
    assert a[("judge", 1)] != b[("judge", 1)]

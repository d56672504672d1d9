"""Every named experiment, sweep point and config option composes into a valid, plannable job."""
import itertools
from pathlib import Path

import pytest
import yaml

from src.job import Job
from src.plan import plan
from tests.conftest import CONF, REPO

EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_presets_compose_and_plan(make_cfg, name):
    first_line = (REPO / "experiments" / f"{name}.yaml").read_text().splitlines()[1]
    assert f"+experiments={name}" in first_line  # each preset says how to run it
    steps = plan(Job.from_config(make_cfg(f"+experiments={name}")))
    assert [s.stage for s in steps[:4]] == ["decontam", "classify", "select", "generate"]


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_point_composes(make_cfg, name):
    params = yaml.safe_load((REPO / "sweeps" / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
    axes = [[f"{k}={v}" for v in str(vals).split(",")] for k, vals in params.items()]
    keys = set()
    for point in itertools.product(*axes):
        job = Job.from_config(make_cfg(*point))
        keys.add(plan(job)[-1].key)
    assert len(keys) == len(list(itertools.product(*axes)))  # every point is a distinct experiment


@pytest.mark.parametrize("group", ["seed", "judge", "dataset", "negatives", "judging", "filter", "train", "eval", "tracking", "audit"])
def test_every_group_option_is_valid(make_cfg, group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        Job.from_config(make_cfg(f"{group}={option}"))


def test_paper_preset_is_the_papers_setup(make_cfg):
    """+experiments=paper composes to Wang et al. 2024's settings (docs/paper-preset.md)."""
    job = Job.from_config(make_cfg("+experiments=paper"))
    assert (job.seed.name, job.judge.name) == ("mixtral", "llama")
    assert (job.dataset.name, job.dataset.category) == ("wildchat", "reasoning")
    # negatives: one call of the paper's worse_response template
    assert job.negatives.method == "modified_instruction" and job.negatives.mode == "single_call"
    assert job.negatives.single_call_prompt is None  # = the packaged copy of the paper's template
    assert job.negatives.drop_truncated is True
    # judgments: N=15, T 0.7, top-p 0.9, both orders, the official verdict rule
    j = job.judging
    assert (j.n, j.temperature, j.top_p, j.both_orders, j.verdict) == (15, 0.7, 0.9, True, "parse")
    assert job.filter.name == "correct"
    # training: full fine-tune, lr 1e-6, 100 warm-up steps, <= 2 epochs, restart from the seed each iteration
    t = job.train
    assert (t.method, t.peft, t.learning_rate, t.warmup_steps, t.num_epochs, t.init_from) == ("sft", "none", 1e-6, 100, 2, "seed")
    assert job.iterations == 5
    # evaluation: all of RewardBench, majority vote over 32, official rule
    assert job.eval.verdict == "parse"
    assert job.eval.rewardbench.maj_k == 32 and job.eval.rewardbench.per_subset is None

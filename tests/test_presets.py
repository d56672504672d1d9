"""Every named experiment, sweep point and config option composes into a valid, plannable job."""
import itertools
from pathlib import Path

import pytest
import yaml

from src.pipeline import Job, plan
from tests.conftest import CONF, REPO

EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_presets_compose_and_plan(make_cfg, name):
    first_line = (REPO / "experiments" / f"{name}.yaml").read_text().splitlines()[1]
    assert f"+experiments={name}" in first_line  # each preset says how to run it
    steps = plan(Job.from_config(make_cfg(f"+experiments={name}")))
    assert [s.stage for s in steps[:3]] == ["classify", "select", "generate"]


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_point_composes(make_cfg, name):
    params = yaml.safe_load((REPO / "sweeps" / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
    axes = [[f"{k}={v}" for v in str(vals).split(",")] for k, vals in params.items()]
    keys = set()
    for point in itertools.product(*axes):
        job = Job.from_config(make_cfg(*point))
        keys.add(plan(job)[-1].key)
    assert len(keys) == len(list(itertools.product(*axes)))  # every point is a distinct experiment


@pytest.mark.parametrize("group", ["seed", "judge", "dataset", "negatives", "judging", "filter", "train", "eval", "tracking"])
def test_every_group_option_is_valid(make_cfg, group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        Job.from_config(make_cfg(f"{group}={option}"))

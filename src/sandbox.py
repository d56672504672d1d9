"""Run an untrusted Python program (model-written code + reference unit tests) in a separate process, best-effort.

NOT a security boundary. It stops the accidents model-written code makes (an infinite loop, a memory hog, a fork
loop, a stray file write, a network call), not an adversary: the program runs as this user, sees the file system
and may write outside its directory by absolute path, and a process that leaves its process group survives the
kill. Run `audit=execute` only where that is acceptable (a throwaway machine or container).

What it does, per program:
* a fresh temporary directory as cwd, HOME and TMPDIR, removed afterwards (relative writes stay in it);
* a minimal environment (PATH, LANG, HOME, TMPDIR) and `python -I` (isolated mode: no PYTHON* variables, no
  user site-packages, no script directory on sys.path);
* resource limits set in the child before the program starts (RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC,
  RLIMIT_CORE=0); RLIMIT_NPROC counts every process of the user and is not enforced for root;
* a wall-clock timeout, after which the whole process group (a new session) is SIGKILLed;
* no network where a new network namespace can be made (`unshare -rn`, util-linux: a user namespace mapping the
  user to root, and a network namespace holding only a down loopback); `Result.network_isolated` says whether
  it was. Where it cannot be made (user namespaces disabled), the program runs with the host's network.

The limits are applied by a small launcher (`python -I -c LAUNCHER`) that sets them and execs the program:
no `preexec_fn`, which is unsafe in a process holding threads (torch's).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from src.config import ConfigError, knob

STATUSES = ("passed", "failed", "timeout", "error")
TAIL = 2000  # characters of stderr kept in a result


@dataclass
class SandboxConfig:
    """Limits of one program run (the `audit.sandbox` keys)."""

    timeout_s: float = knob(10.0, "wall-clock seconds before the process group is killed", min=0.1)
    cpu_s: int = knob(10, "CPU seconds (RLIMIT_CPU)", min=1)
    memory_mb: int = knob(1024, "address space in MiB (RLIMIT_AS)", min=64)
    fsize_mb: int = knob(16, "largest file the program may write, MiB (RLIMIT_FSIZE)", min=1)
    nproc: int = knob(64, "processes the program may add to the user's count (RLIMIT_NPROC; not for root)", min=1)
    network: str = "isolate"  # isolate: a new network namespace where possible; require: fail when it is not; host

    def validate(self, where: str) -> None:
        if self.network not in ("isolate", "require", "host"):
            raise ConfigError(f"{where}.network={self.network!r}: use isolate, require or host")


@dataclass
class Result:
    status: str  # passed (exit 0) | failed (non-zero exit: an assertion or exception) | timeout | error
    returncode: int | None
    seconds: float
    network_isolated: bool
    stderr_tail: str = ""


# Sets the limits, then replaces itself with the program (argv: limits JSON, program file).
LAUNCHER = """
import json, os, resource, sys
lim = json.loads(sys.argv[1])
def cap(which, value):
    soft, hard = resource.getrlimit(which)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(which, (value, value))
cap(resource.RLIMIT_CPU, lim["cpu_s"])
cap(resource.RLIMIT_AS, lim["memory_mb"] << 20)
cap(resource.RLIMIT_FSIZE, lim["fsize_mb"] << 20)
cap(resource.RLIMIT_CORE, 0)
if hasattr(resource, "RLIMIT_NPROC"):
    cap(resource.RLIMIT_NPROC, lim["nproc"])
os.execv(sys.executable, [sys.executable, "-I", sys.argv[2]])
"""


@functools.lru_cache(maxsize=None)
def network_namespace() -> list[str] | None:
    """The command prefix that runs a program in a new network namespace, or None where none can be made here."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    try:
        ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return [exe, "-rn"] if ok else None


def _user_processes() -> int:
    """Processes this user has now: RLIMIT_NPROC counts them all, so the program's allowance is added to it."""
    uid, n = os.getuid(), 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                n += os.stat(f"/proc/{d}").st_uid == uid
            except OSError:
                pass
    return n


def run(program: str, cfg: SandboxConfig) -> Result:
    """Run `program` (Python source) under `cfg`'s limits; the result says how it ended."""
    prefix = network_namespace() if cfg.network != "host" else None
    if prefix is None and cfg.network == "require":
        raise RuntimeError("sandbox.network=require: no network namespace can be made here (`unshare -rn` failed)")
    limits = {"cpu_s": cfg.cpu_s, "memory_mb": cfg.memory_mb, "fsize_mb": cfg.fsize_mb,
              "nproc": _user_processes() + cfg.nproc}
    work = tempfile.mkdtemp(prefix="ste-sandbox-")
    t0 = time.monotonic()
    try:
        with open(os.path.join(work, "program.py"), "w") as f:
            f.write(program)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
        argv = [*(prefix or []), sys.executable, "-I", "-c", LAUNCHER, json.dumps(limits), "program.py"]
        with open(os.path.join(work, "stderr"), "wb") as err:
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)
            try:
                rc = proc.wait(timeout=cfg.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                rc, timed_out = None, True
            finally:
                _kill_group(proc.pid)
                proc.wait()
        with open(os.path.join(work, "stderr"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * TAIL))
            tail = f.read().decode("utf-8", "replace")[-TAIL:]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Result(_status(rc, timed_out), rc, round(time.monotonic() - t0, 3), prefix is not None, tail)


def _kill_group(pgid: int) -> None:
    """SIGKILL the program's whole session (what it forked stays in it unless it made its own)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _status(rc: int | None, timed_out: bool) -> str:
    """How a run ended: over the wall clock or the CPU limit (SIGXCPU, then SIGKILL at the hard limit) is a
    timeout; exit 0 passed; another exit code is a failure of the program (an assertion, any exception, or a
    MemoryError at the address-space limit); any other signal (SIGSEGV, ...) an error."""
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    if rc == 0:
        return "passed"
    return "failed" if rc is not None and rc > 0 else "error"

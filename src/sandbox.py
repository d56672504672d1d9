"""Run an untrusted Python program (model-written code + reference unit tests) in a separate process, best-effort.

NOT a security boundary. It stops the accidents and the casual mischief model-written code makes, not a determined
adversary: the program runs as this user (as root: root), and reads and writes the file system outside the private
directories below. Run `audit=execute` only where that is acceptable (a throwaway machine or container).

Per program (docs/decontamination-and-audit.md lists what is and is not isolated, with a test per line):
* private user, network, PID, IPC and mount namespaces where they can be made (`namespaces`): no network (a down
  loopback), no outside process visible or signallable, an init (PID 1) whose exit kills every process left, empty
  private tmpfs over /tmp, /var/tmp, /run and /dev/shm (path-based unix sockets and shared memory there unreachable),
  and /tmp/work of that tmpfs as cwd, HOME and TMPDIR; else the network namespace alone (`unshare -rn`), else none
  (`Result.network_isolated` / `Result.namespaces` say which);
* a minimal environment (PATH, LANG, HOME, TMPDIR) and `python -I` (no PYTHON* variables, no user site-packages);
* resource limits set in the program's process before it starts (RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC,
  RLIMIT_CORE=0): per process, not summed over several (no cgroup), and RLIMIT_NPROC does not bind root;
* a wall-clock timeout, after which the whole process group (a new session) is SIGKILLed (with the namespaces: its
  init too, and with it everything in the namespace).

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
    namespaces: bool = False  # also private PID, IPC and mount namespaces (no outside process, no /tmp or /run sockets)


# Sets the limits, then replaces itself with the program (argv: limits JSON, program file). Inside the private
# namespaces (`lim["private"]`), it first mounts an empty tmpfs over the directories where path-based unix sockets and
# shared memory live, and runs the program from a copy in the private /tmp (the outside work directory is hidden).
LAUNCHER = """
import json, os, resource, subprocess, sys
lim = json.loads(sys.argv[1])
program = sys.argv[2]
if lim["private"]:
    source = open(program, "rb").read()
    for d in lim["private"]:
        if os.path.isdir(d):
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", d], check=True)
    os.makedirs("/tmp/work")
    os.chdir("/tmp/work")
    os.environ.update(HOME="/tmp/work", TMPDIR="/tmp/work")
    open("program.py", "wb").write(source)
    program = "program.py"
def cap(which, value):
    soft, hard = resource.getrlimit(which)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(which, (value, value))
if lim["private"]:
    # This process is PID 1 of the namespace: it runs the program as its child, reaps what is orphaned, and exits
    # with the program's status (128 + the signal that ended it), so unshare reports it; when it exits, the kernel
    # kills whatever else is left in the namespace.
    pid = os.fork()
    if pid:
        while True:
            done, status = os.wait()
            if done == pid:
                os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
cap(resource.RLIMIT_CPU, lim["cpu_s"])
cap(resource.RLIMIT_AS, lim["memory_mb"] << 20)
cap(resource.RLIMIT_FSIZE, lim["fsize_mb"] << 20)
cap(resource.RLIMIT_CORE, 0)
if hasattr(resource, "RLIMIT_NPROC"):
    cap(resource.RLIMIT_NPROC, lim["nproc"])
os.execv(sys.executable, [sys.executable, "-I", program])
"""

# Where processes meet outside the network: path-based unix sockets and POSIX shared memory. Each gets an empty
# private tmpfs inside the sandbox's mount namespace (sockets elsewhere on the file system stay reachable).
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/run", "/dev/shm")
# A user namespace (this user mapped to root inside), its own network (a down loopback), PID (the program is PID 1's
# child: it sees and can signal no outside process; when PID 1 dies the kernel kills every process in it, setsid
# or not), IPC (no SysV IPC with the outside) and mount (the private tmpfs above, its own /proc) namespaces;
# --kill-child: PID 1 dies with unshare, so killing unshare's process group at the timeout ends them all.
NAMESPACES = ["--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--ipc"]


@functools.lru_cache(maxsize=None)
def namespaces() -> list[str] | None:
    """The command prefix that runs a program in private user, network, PID, IPC and mount namespaces, or None
    where they cannot be made here (then `network_namespace` alone is tried)."""
    exe = shutil.which("unshare")
    if exe is None or shutil.which("mount") is None:
        return None
    try:
        ok = subprocess.run([exe, *NAMESPACES, "mount", "-t", "tmpfs", "tmpfs", "/tmp"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return [exe, *NAMESPACES] if ok else None


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
    """Run `program` (Python source) under `cfg`'s limits; the result says how it ended and what was isolated."""
    private = namespaces() if cfg.network != "host" else None
    prefix = private or (network_namespace() if cfg.network != "host" else None)
    if prefix is None and cfg.network == "require":
        raise RuntimeError("sandbox.network=require: no network namespace can be made here (`unshare -rn` failed)")
    limits = {"cpu_s": cfg.cpu_s, "memory_mb": cfg.memory_mb, "fsize_mb": cfg.fsize_mb,
              "nproc": _user_processes() + cfg.nproc, "private": list(PRIVATE_DIRS) if private else []}
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
    if private is not None and rc is not None and rc > 128:  # unshare --fork exits 128 + the signal that ended its child
        rc = -(rc - 128)
    return Result(_status(rc, timed_out), rc, round(time.monotonic() - t0, 3), prefix is not None, tail, private is not None)


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

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
  RLIMIT_CORE=0): per process, and RLIMIT_NPROC does not bind root;
* totals over all of its processes where a cgroup can be made (`cgroups()`; as root here): a cgroup per run (v2 with
  the memory and pids controllers, else v1 memory + pids) holding `memory_mb` of memory and `nproc` + 2 tasks (the
  sandbox's own unshare and init) summed over every process and thread, entered before the program starts; at the end
  every process in it is SIGKILLed and it is removed (`Result.cgroup` says which, "none" where no cgroup could be made);
* a wall-clock timeout, after which the whole process group (a new session) is SIGKILLed (with the namespaces: its
  init too, and with it everything in the namespace; with a cgroup: everything in the cgroup, whatever its session).

The limits are applied by a small launcher (`python -I -c LAUNCHER`) that sets them and execs the program:
no `preexec_fn`, which is unsafe in a process holding threads (torch's).
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from src.config import ConfigError, knob

log = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "error")
TAIL = 2000  # characters of stderr kept in a result


@dataclass
class SandboxConfig:
    """Limits of one program run (the `audit.sandbox` keys)."""

    timeout_s: float = knob(10.0, "wall-clock seconds before the process group is killed", min=0.1)
    cpu_s: int = knob(10, "CPU seconds (RLIMIT_CPU)", min=1)
    memory_mb: int = knob(1024, "address space of each process in MiB (RLIMIT_AS); with a cgroup also the memory of all its processes together", min=64)
    fsize_mb: int = knob(16, "largest file the program may write, MiB (RLIMIT_FSIZE)", min=1)
    nproc: int = knob(64, "processes the program may add to the user's count (RLIMIT_NPROC; not for root); with a cgroup also its tasks (processes and threads) in all", min=1)
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
    cgroup: str = "none"  # v2 | v1: memory and tasks capped over all its processes | none: per process only (RLIMITs)
    oom_kills: int = 0  # processes the cgroup's memory limit killed
    forks_refused: int = 0  # forks and threads the cgroup's task limit refused


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


# ---- totals over all of a program's processes: one cgroup per run ----

SANDBOX_TASKS = 2  # tasks of the sandbox itself in the cgroup (unshare and the namespace's init), not the program's
_names = itertools.count()


def _mounts() -> dict[str, str]:
    """Where each cgroup hierarchy is mounted: 'cgroup2', and the v1 hierarchies holding 'memory' and 'pids'."""
    found: dict[str, str] = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            _, where, fstype, opts = line.split()[:4]
            if fstype == "cgroup2":
                found.setdefault("cgroup2", where)
            elif fstype == "cgroup":
                for c in set(opts.split(",")) & {"memory", "pids"}:
                    found.setdefault(c, where)
    return found


def _own() -> dict[str, str]:
    """This process's cgroup in each hierarchy ('cgroup2', 'memory', 'pids'), from /proc/self/cgroup: a run's cgroup
    is made under it, so it stays inside whatever limits this process itself is under."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            if hid == "0":
                own["cgroup2"] = path
            for c in controllers.split(","):
                own[c] = path
    return own


class Cgroup:
    """One run's cgroup: v2 one directory; v1 a memory and a pids directory. Every process the program starts is
    born in it, so its memory and task counts are summed over all of them."""

    def __init__(self, version: str, parents: list[str], memory_bytes: int, tasks: int):
        self.version = version
        name = f"ste-sandbox-{os.getpid()}-{next(_names)}"
        self.dirs: list[str] = []
        try:
            for parent in parents:
                os.mkdir(d := os.path.join(parent, name))
                self.dirs.append(d)
            if version == "v2":
                self._write("memory.max", memory_bytes)
                self._write("pids.max", tasks)
                self._write("memory.swap.max", 0, required=False)  # memory.max alone would let it swap the rest
            else:
                self._write("memory.limit_in_bytes", memory_bytes)
                self._write("memory.memsw.limit_in_bytes", memory_bytes, required=False)  # only with swap accounting
                self._write("pids.max", tasks)
        except OSError:
            self.remove()
            raise

    def _write(self, file: str, value: int, required: bool = True) -> None:
        for d in self.dirs:
            if os.path.exists(os.path.join(d, file)):
                with open(os.path.join(d, file), "w") as f:
                    f.write(str(value))
                return
        if required:
            raise OSError(f"no {file} in {self.dirs}")

    def _read(self, file: str) -> str | None:
        for d in self.dirs:
            try:
                with open(os.path.join(d, file)) as f:
                    return f.read()
            except FileNotFoundError:
                continue
        return None

    def add(self, pid: int) -> None:
        for d in self.dirs:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(pid))

    def tasks(self) -> set[int]:
        pids: set[int] = set()
        for d in self.dirs:
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    pids.update(int(p) for p in f.read().split())
            except FileNotFoundError:
                pass
        return pids

    def counts(self) -> tuple[int, int]:
        """(processes killed by the memory limit, forks refused by the task limit), as the kernel counted them."""
        def field(text: str | None, key: str) -> int:
            for line in (text or "").splitlines():
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
            return 0
        oom = self._read("memory.events" if self.version == "v2" else "memory.oom_control")
        return field(oom, "oom_kill"), field(self._read("pids.events"), "max")

    def kill(self, within_s: float = 5.0) -> None:
        """SIGKILL every process in it until none is left (a process forking meanwhile is caught on the next pass;
        pids.max bounds how many there can be); bounded in time, and says so if one survives."""
        deadline = time.monotonic() + within_s
        if self.version == "v2" and os.path.exists(os.path.join(self.dirs[0], "cgroup.kill")):
            self._write("cgroup.kill", 1)
        while pids := self.tasks():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                log.warning("sandbox: %d process(es) still in %s after SIGKILL for %.0f s", len(pids), self.dirs, within_s)
                return
            time.sleep(0.01)

    def remove(self) -> None:
        """rmdir each directory (empty now: the kernel refuses while a task is left), retried briefly."""
        for d in self.dirs:
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
            else:
                log.warning("sandbox: could not remove %s", d)


@functools.lru_cache(maxsize=None)
def cgroups() -> tuple[str, tuple[str, ...]] | None:
    """Where a run's cgroup can be made: ('v2', (directory,)) with the memory and pids controllers, else ('v1',
    (memory directory, pids directory)), else None (not root, read-only, or no such controller). Tried once per
    process by making and removing one; one log line says which mechanism is in force."""
    try:
        mounts, own = _mounts(), _own()
    except OSError:
        mounts, own = {}, {}
    tried, where = [], None
    if "cgroup2" in mounts and "cgroup2" in own:
        parent = os.path.normpath(os.path.join(mounts["cgroup2"], own["cgroup2"].lstrip("/")))
        try:
            with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                enabled = set(f.read().split())
            if not {"memory", "pids"} <= enabled:
                # only possible where this cgroup holds no process itself (the kernel's no-internal-process rule)
                with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory +pids")
            Cgroup("v2", [parent], 64 << 20, 8).remove()
            where = ("v2", (parent,))
        except OSError as e:
            tried.append(f"v2 at {parent}: {e.strerror or e}")
    if where is None and {"memory", "pids"} <= mounts.keys() and {"memory", "pids"} <= own.keys():
        parents = tuple(os.path.normpath(os.path.join(mounts[c], own[c].lstrip("/"))) for c in ("memory", "pids"))
        try:
            Cgroup("v1", list(parents), 64 << 20, 8).remove()
            where = ("v1", parents)
        except OSError as e:
            tried.append(f"v1 at {parents[0]}: {e.strerror or e}")
    if where is None:
        log.warning("sandbox: no cgroup can be made here (%s): memory and processes are limited per process only "
                    "(RLIMIT_AS, RLIMIT_NPROC: not for root), not summed over a program's processes",
                    "; ".join(tried) or "no memory and pids cgroup controllers mounted")
    else:
        log.info("sandbox: each program's memory and tasks are capped over all its processes by a cgroup %s under %s",
                 where[0], ", ".join(where[1]))
    return where


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


# Holds the program back until the parent has put this process into the run's cgroup, so that nothing of the program
# ever runs outside it (v1 has no way to start a process inside a cgroup; `clone3(CLONE_INTO_CGROUP)` is v2 only and
# not in subprocess); stdin is the gate, and the program gets /dev/null. The shell would export PWD: unset, so the
# program's environment stays the four variables.
GATE = ['read -r _ || exit 125; unset PWD OLDPWD; exec "$@" </dev/null', "sandbox-gate"]


def _cgroup(cfg: SandboxConfig) -> Cgroup | None:
    """This run's cgroup (memory_mb of memory and nproc + the sandbox's own tasks, over all processes), or None
    where none can be made (then the run's result says "none")."""
    where = cgroups()
    if where is None:
        return None
    try:
        return Cgroup(where[0], list(where[1]), cfg.memory_mb << 20, cfg.nproc + SANDBOX_TASKS)
    except OSError as e:
        log.warning("sandbox: this run's cgroup could not be made (%s): its memory and processes are limited per "
                    "process only", e)
        return None


def run(program: str, cfg: SandboxConfig) -> Result:
    """Run `program` (Python source) under `cfg`'s limits; the result says how it ended and what was isolated."""
    private = namespaces() if cfg.network != "host" else None
    prefix = private or (network_namespace() if cfg.network != "host" else None)
    if prefix is None and cfg.network == "require":
        raise RuntimeError("sandbox.network=require: no network namespace can be made here (`unshare -rn` failed)")
    limits = {"cpu_s": cfg.cpu_s, "memory_mb": cfg.memory_mb, "fsize_mb": cfg.fsize_mb,
              "nproc": _user_processes() + cfg.nproc, "private": list(PRIVATE_DIRS) if private else []}
    work = tempfile.mkdtemp(prefix="ste-sandbox-")
    group = _cgroup(cfg)
    oom_kills = forks_refused = 0
    t0 = time.monotonic()
    try:
        with open(os.path.join(work, "program.py"), "w") as f:
            f.write(program)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
        gate = [shutil.which("sh") or "/bin/sh", "-c", *GATE] if group else []
        argv = [*gate, *(prefix or []), sys.executable, "-I", "-c", LAUNCHER, json.dumps(limits), "program.py"]
        with open(os.path.join(work, "stderr"), "wb") as err:
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.PIPE if group else subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            try:
                if group:
                    group.add(proc.pid)  # before the gate opens: every process the program starts is born inside
                    proc.stdin.write(b"go\n")
                    proc.stdin.close()
                rc = proc.wait(timeout=cfg.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                rc, timed_out = None, True
            finally:
                _kill_group(proc.pid)
                if group:
                    group.kill()  # whatever left the process group (setsid) or the namespace
                proc.wait()
        if group:
            oom_kills, forks_refused = group.counts()
        with open(os.path.join(work, "stderr"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * TAIL))
            tail = f.read().decode("utf-8", "replace")[-TAIL:]
    finally:
        if group:
            group.remove()
        shutil.rmtree(work, ignore_errors=True)
    if private is not None and rc is not None and rc > 128:  # unshare --fork exits 128 + the signal that ended its child
        rc = -(rc - 128)
    if oom_kills:
        tail = (tail + f"\nsandbox: the memory limit (memory_mb={cfg.memory_mb}, all processes together) killed "
                       f"{oom_kills} process(es)")[-TAIL:]
    return Result(_status(rc, timed_out, oom_kills), rc, round(time.monotonic() - t0, 3), prefix is not None, tail,
                  private is not None, group.version if group else "none", oom_kills, forks_refused)


def _kill_group(pgid: int) -> None:
    """SIGKILL the program's whole session (what it forked stays in it unless it made its own)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _status(rc: int | None, timed_out: bool, oom_kills: int = 0) -> str:
    """How a run ended: over the wall clock is a timeout; a process killed by the cgroup's memory limit (whichever
    one, the program's own or a child it ignores) is a failure, like a MemoryError at the address-space limit; over
    the CPU limit (SIGXCPU, then SIGKILL at the hard limit) a timeout; exit 0 passed; another exit code is a failure
    of the program (an assertion, any exception); any other signal (SIGSEGV, ...) an error."""
    if timed_out:
        return "timeout"
    if oom_kills:
        return "failed"
    if rc in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    if rc == 0:
        return "passed"
    return "failed" if rc is not None and rc > 0 else "error"

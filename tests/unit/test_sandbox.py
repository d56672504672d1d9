"""The best-effort sandbox on small hand-written programs (never model-written code: that runs only under the opt-in
`audit=execute`). Each test runs a real child process under real resource limits."""
import os
import socket
import threading
import time

import pytest
from pathlib import Path

from src.sandbox import SandboxConfig, network_namespace, run
from src import sandbox
from tests.conftest import REPO

FAST = SandboxConfig(timeout_s=5, cpu_s=5, memory_mb=512)


def test_a_correct_program_passes_and_a_wrong_one_fails():
    ok = run("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n", FAST)
    assert ok.status == "passed" and ok.returncode == 0
    wrong = run("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n", FAST)
    assert wrong.status == "failed" and wrong.returncode == 1 and "AssertionError" in wrong.stderr_tail


def test_an_infinite_loop_times_out_and_its_children_are_killed():
    """The wall clock ends it, and the whole process group goes: a child it forked does not outlive it. The marker
    lives outside /tmp (inside the sandbox /tmp is a private tmpfs)."""
    import shutil
    import tempfile

    outside = tempfile.mkdtemp(prefix=".sandbox-test-", dir=REPO)
    marker = Path(outside) / "child-alive"
    child = f"import time\nwhile True:\n    open({str(marker)!r}, 'w').write(str(time.time()))\n    time.sleep(0.1)\n"
    program = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\nwhile True:\n    pass\n"
    t0 = time.monotonic()
    r = run(program, SandboxConfig(timeout_s=2, cpu_s=30))
    assert r.status == "timeout" and r.returncode is None, r.stderr_tail
    assert 2 <= time.monotonic() - t0 < 10
    assert marker.exists()  # the child ran (it may write by absolute path: best-effort, not a boundary)
    time.sleep(0.5)
    before = marker.read_text()
    time.sleep(0.5)
    assert marker.read_text() == before  # ... and was killed with its parent's group
    shutil.rmtree(outside)


def test_the_cpu_limit_stops_a_busy_program_before_the_wall_clock():
    r = run("while True:\n    pass\n", SandboxConfig(timeout_s=30, cpu_s=1))
    assert r.status == "timeout" and r.returncode is not None and r.seconds < 15


def test_a_memory_hog_is_stopped():
    t0 = time.monotonic()
    r = run("blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))\n", FAST)
    assert r.status != "passed" and "MemoryError" in r.stderr_tail
    assert time.monotonic() - t0 < 5  # stopped by the address-space limit, not by the wall clock


def test_files_written_stay_in_the_throwaway_directory(tmp_path):
    """Relative writes, HOME and TMPDIR all land in the program's own directory, which is removed afterwards."""
    program = (
        "import os, sys, tempfile\n"
        "open('out.txt', 'w').write('x')\n"
        "tempfile.NamedTemporaryFile(delete=False).write(b'y')\n"
        "sys.stderr.write(os.getcwd() + '|' + os.environ['HOME'] + '|' + tempfile.gettempdir() + '|' + str(sorted(os.environ)))\n"
    )
    cwd = os.getcwd()
    r = run(program, FAST)
    assert r.status == "passed"
    where, home, tmp, env = r.stderr_tail.split("|")
    # in the private namespaces the program's directory is /tmp/work of its own tmpfs, else a fresh ste-sandbox-* dir
    assert where == home == tmp and where != cwd and (where == "/tmp/work" if r.namespaces else os.path.basename(where).startswith("ste-sandbox-"))
    assert not os.path.exists(where)  # removed with everything written in it
    assert not os.path.exists(os.path.join(cwd, "out.txt"))
    assert eval(env) == ["HOME", "LANG", "PATH", "TMPDIR"]  # minimal environment


def test_a_large_file_write_is_cut_at_the_file_size_limit():
    r = run("open('big', 'wb').write(b'0' * (8 << 20))\n", SandboxConfig(timeout_s=5, fsize_mb=1))
    assert r.status != "passed"


def test_a_program_cannot_reach_a_server_on_this_machine_when_the_network_namespace_exists():
    """A server listens on 127.0.0.1 in this process; the sandboxed program tries to connect. In a new network
    namespace its loopback is down, so the connection fails; with the host network it would succeed."""
    if network_namespace() is None:
        pytest.skip("no network namespace can be made here (`unshare -rn` failed: user namespaces disabled)")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
    try:
        isolated = run(program, FAST)
        host = run(program, SandboxConfig(timeout_s=5, network="host"))
    finally:
        server.close()
    assert isolated.network_isolated and isolated.status == "failed" and "OSError" in isolated.stderr_tail
    assert not host.network_isolated and host.status == "passed"  # the same program reaches it without the namespace


def test_network_require_fails_loudly_where_no_namespace_can_be_made(monkeypatch):
    import src.sandbox as sandbox

    monkeypatch.setattr(sandbox, "network_namespace", lambda: None)
    monkeypatch.setattr(sandbox, "namespaces", lambda: None)
    with pytest.raises(RuntimeError, match="network=require"):
        run("pass\n", SandboxConfig(network="require"))
    assert not run("pass\n", FAST).network_isolated  # isolate: runs, and says it was not isolated


needs_namespaces = pytest.mark.skipif(sandbox.namespaces() is None, reason="no user/PID/mount namespaces here (unshare)")


@needs_namespaces
def test_the_program_cannot_signal_a_process_outside(tmp_path):
    """Issue 21: a sandboxed program killed an outside `sleep` (as root: any process). In its own PID namespace it
    sees no outside process: the kill fails and the sleep lives."""
    import subprocess

    outside = subprocess.Popen(["sleep", "300"])
    try:
        r = sandbox.run(f"import os, signal\nos.kill({outside.pid}, signal.SIGKILL)\n", FAST)
        assert r.status == "failed" and "ProcessLookupError" in r.stderr_tail and r.namespaces
        assert outside.poll() is None
    finally:
        outside.kill()
        outside.wait()


@needs_namespaces
def test_the_program_cannot_reach_a_unix_socket_in_tmp():
    """Issue 21: a program connected to a path-based unix socket listening outside and sent data. /tmp, /var/tmp,
    /run and /dev/shm are empty private tmpfs inside: the socket's path does not exist there."""
    import socket
    import tempfile

    path = tempfile.mktemp(prefix="ste-sandbox-test-", suffix=".sock", dir="/tmp")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(0.5)
    try:
        r = sandbox.run(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({path!r})\ns.sendall(b'hi')\n", FAST)
        assert r.status == "failed" and ("FileNotFoundError" in r.stderr_tail or "ConnectionRefused" in r.stderr_tail)
        with pytest.raises(OSError):  # nothing connected
            listener.accept()
    finally:
        listener.close()
        os.unlink(path)


@needs_namespaces
def test_a_setsid_grandchild_does_not_outlive_the_run():
    """Issue 21: a `setsid` grandchild kept running after run() returned. When the namespace's PID 1 ends, the
    kernel kills every process in it, whatever its session."""
    import subprocess
    import time

    marker = "98765.4321"
    program = (f"import os, subprocess\nsubprocess.Popen(['setsid', 'sleep', '{marker}'], start_new_session=True)\n"
               "import time; time.sleep(0.3)\n")
    r = sandbox.run(program, FAST)
    assert r.status == "passed"
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True).stdout.split()
    assert left == [], left


needs_cgroup = pytest.mark.skipif(sandbox.cgroups() is None, reason="no cgroup with memory and pids controllers can be made here")

# Forks 40 children, each of which forks 5 more (240 processes uncapped: as root RLIMIT_NPROC does not bind); every
# process that started appends a byte to one file, so the program counts itself and all its descendants at once.
FORK_BOMB = """
import os, sys, time
fd = os.open("count", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
def started():
    os.write(fd, b"x")
    time.sleep(3)
    os._exit(0)
for i in range(40):
    try:
        if os.fork() == 0:
            for j in range(5):
                try:
                    if os.fork() == 0:
                        started()
                except OSError:
                    pass
            started()
    except OSError:
        pass
time.sleep(1.5)
sys.stderr.write("processes=%d" % (os.path.getsize("count") + 1))
"""


@needs_cgroup
def test_a_fork_bomb_is_capped_at_nproc_tasks_over_all_its_processes():
    """Issue 21: as root a fork bomb reached 250 processes (RLIMIT_NPROC binds no root). The run's cgroup caps the
    tasks of the program and every descendant together at nproc + the sandbox's own unshare and init."""
    r = run(FORK_BOMB, SandboxConfig(timeout_s=20, nproc=16))
    processes = int(r.stderr_tail.rpartition("processes=")[2])
    assert processes <= 16 + sandbox.SANDBOX_TASKS, r
    assert r.cgroup != "none" and r.forks_refused > 0


# Four children each touch 150 MiB (each well under its own RLIMIT_AS) and hold it for a second; the parent exits 0
# only if all four did.
FOUR_HOGS = """
import os, sys, time
kids = []
for i in range(4):
    pid = os.fork()
    if pid == 0:
        block = b"x" * (150 << 20)
        time.sleep(1)
        os._exit(0)
    kids.append(pid)
held = sum(os.waitpid(p, 0)[1] == 0 for p in kids)
sys.stderr.write("held=%d\\n" % held)
sys.exit(0 if held == 4 else 1)
"""


@needs_cgroup
def test_four_children_together_cannot_exceed_the_memory_limit():
    """Issue 21: four children held 3.2 GB under a 1 GiB limit (RLIMIT_AS is per process). In the run's cgroup
    their sum is capped at memory_mb: the kernel kills what goes over, and the result says so."""
    r = run(FOUR_HOGS, SandboxConfig(timeout_s=20, memory_mb=256))
    assert "held=4" not in r.stderr_tail and r.status == "failed", r
    assert r.oom_kills >= 1 and "memory limit (memory_mb=256, all processes together) killed" in r.stderr_tail


@needs_cgroup
def test_nothing_is_left_in_the_cgroup_after_run_returns():
    """With the host network there is no PID namespace, and a `setsid` daemon leaves the process group the timeout
    kills (the old fallback's hole); it does not leave the cgroup: every process in it is killed, and the cgroup is
    removed, before run() returns."""
    import subprocess

    marker = "97531.2468"
    program = (f"import subprocess\nsubprocess.Popen(['setsid', 'sleep', '{marker}'], start_new_session=True)\n"
               "import time; time.sleep(0.3)\n")
    r = run(program, SandboxConfig(timeout_s=5, network="host"))
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True).stdout.split()
    for pid in left:  # what escaped (the old code's hole): ended here by its id, so the test leaves nothing behind
        os.kill(int(pid), 9)
    assert left == [], left
    assert r.status == "passed" and not r.namespaces and r.cgroup != "none"
    mine = f"ste-sandbox-{os.getpid()}-"
    assert not [d for parent in sandbox.cgroups()[1] for d in os.listdir(parent) if d.startswith(mine)]


def test_where_no_cgroup_can_be_made_the_run_says_none_and_one_line_says_why(monkeypatch, tmp_path, caplog):
    """Not root, or a read-only /sys/fs/cgroup (a path under a file stands in, as root): the program still runs
    under its per-process limits, the result records `cgroup="none"`, and one warning names what was tried."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(sandbox, "_mounts", lambda: {"memory": str(blocker), "pids": str(blocker)})
    sandbox.cgroups.cache_clear()
    try:
        with caplog.at_level("INFO", logger="src.sandbox"):
            assert sandbox.cgroups() is None
            r = run("pass\n", FAST)
    finally:
        sandbox.cgroups.cache_clear()
    assert r.status == "passed" and r.cgroup == "none" and r.oom_kills == 0
    lines = [rec.getMessage() for rec in caplog.records if "cgroup" in rec.getMessage()]
    assert len(lines) == 1 and "no cgroup can be made here" in lines[0] and "per process only" in lines[0], lines

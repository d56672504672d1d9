"""The best-effort sandbox on small hand-written programs (never model-written code: that runs only under the opt-in
`audit=execute`). Each test runs a real child process under real resource limits."""
import os
import socket
import threading
import time

import pytest

from src.sandbox import SandboxConfig, network_namespace, run

FAST = SandboxConfig(timeout_s=5, cpu_s=5, memory_mb=512)


def test_a_correct_program_passes_and_a_wrong_one_fails():
    ok = run("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n", FAST)
    assert ok.status == "passed" and ok.returncode == 0
    wrong = run("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n", FAST)
    assert wrong.status == "failed" and wrong.returncode == 1 and "AssertionError" in wrong.stderr_tail


def test_an_infinite_loop_times_out_and_its_children_are_killed(tmp_path):
    """The wall clock ends it, and the whole process group goes: a child it forked does not outlive it."""
    marker = tmp_path / "child-alive"
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
    assert where == home == tmp and where != cwd and os.path.basename(where).startswith("ste-sandbox-")
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
    with pytest.raises(RuntimeError, match="network=require"):
        run("pass\n", SandboxConfig(network="require"))
    assert not run("pass\n", FAST).network_isolated  # isolate: runs, and says it was not isolated

"""The code sandbox against hostile programs: each test is an attack that was reproduced against the old sandbox.

Tests marked ``needs_bwrap`` need bubblewrap's namespaces (CI installs it in ``.ci/run``); they are skipped, with
bwrap's own error as the reason, only where bwrap is missing or the kernel refuses it the namespaces — checked
with a raw bwrap command, independently of the sandbox code, so a broken sandbox fails instead of skipping.
The others run on both backends (``bwrap`` and the rlimits-only ``fallback``) and, as root, also through the
unprivileged user-namespace path of bwrap (``userns``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time

import pytest

from dkvcache.eval import sandbox

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raw_bwrap(*extra: str) -> str | None:
    """None when bwrap can create its namespaces here, else why not."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed"
    cmd = ["bwrap", "--unshare-all", *extra, "--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc",
           "--dev", "/dev", "--tmpfs", "/tmp", "true"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"bwrap did not run: {err}"
    return None if done.returncode == 0 else f"bwrap cannot create namespaces here: {done.stderr.strip()}"


BWRAP_MISSING = _raw_bwrap()
USERNS_MISSING = _raw_bwrap("--unshare-user", "--uid", "65534")
needs_bwrap = pytest.mark.skipif(BWRAP_MISSING is not None, reason=f"needs bubblewrap: {BWRAP_MISSING}")
NPROC = getattr(sandbox, "NPROC", 32)


@pytest.fixture(params=["bwrap", "userns", "fallback"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which sandbox path runs the program (the default one, bwrap's user-namespace one as root, the fallback)."""
    _apply_mode(request.param, monkeypatch.setattr)
    return request.param


def _apply_mode(name: str, setattr_) -> None:  # noqa: ANN001 - monkeypatch.setattr or a plain setattr
    if name == "bwrap" and BWRAP_MISSING:
        pytest.skip(f"needs bubblewrap: {BWRAP_MISSING}")
    if name == "userns":
        if os.geteuid() != 0:
            pytest.skip("not root: the default bwrap path already is the user-namespace one")
        if USERNS_MISSING:
            pytest.skip(f"needs bubblewrap with user namespaces: {USERNS_MISSING}")
        setattr_(sandbox, "_privileged", lambda: False)
    if name == "fallback":
        setattr_(sandbox, "_backend_choice", ("subprocess", "forced by the test"))
        setattr_(sandbox, "_warned", True)


_HARNESS = r"""
import json, os, resource, sys, time
sys.path.insert(0, ROOT)
from dkvcache.eval import sandbox
import tests.test_sandbox as t
t._apply_mode(sys.argv[1], setattr)
sandbox.run_program("pass", timeout_s=10.0)  # warm up (probe, imports) before measuring
program = sys.stdin.read().replace("HARNESS_PID", str(os.getpid()))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.monotonic()
result = sandbox.run_program(program, timeout_s=float(sys.argv[2]), memory_mb=256)
print(json.dumps({"passed": result.passed, "status": result.status, "elapsed": time.monotonic() - start,
                  "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
""".replace("ROOT", repr(ROOT))


def _harness(program: str, timeout_s: float, mode: str = "bwrap", wait: bool = True, env: dict | None = None):
    """Run ``program`` through run_program in a separate harness process (the attacks target the harness)."""
    proc = subprocess.Popen([sys.executable, "-c", _HARNESS, mode, str(timeout_s)], cwd=ROOT, text=True,
                            env={**os.environ, **(env or {})},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait:
        proc.stdin.write(program)
        proc.stdin.close()
        proc.stdin = None
        return proc
    out, err = proc.communicate(program, timeout=120)
    assert proc.returncode == 0, f"the harness died (exit status {proc.returncode}): {err[-2000:]}"
    return json.loads(out.strip().splitlines()[-1])


def _named(comm: str) -> list[int]:
    """Host PIDs of the processes whose name (comm) is ``comm``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/comm") as f:
                    if f.read().strip() == comm:
                        found.append(int(name))
            except OSError:
                pass
    return found


@pytest.fixture
def marker():
    """A unique process name that sandboxed programs give themselves; whatever still has it at the end is killed."""
    comm = "sbx" + secrets.token_hex(6)
    yield comm
    for pid in _named(comm):
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def _gone(comm: str, within_s: float) -> list[int]:
    end = time.monotonic() + within_s
    while (left := _named(comm)) and time.monotonic() < end:
        time.sleep(0.05)
    return left


def _name_self(comm: str) -> str:
    return f"with open('/proc/self/comm', 'w') as f:\n    f.write({comm!r})\n"


def test_backend_is_bwrap_wherever_bwrap_works(monkeypatch: pytest.MonkeyPatch) -> None:
    if BWRAP_MISSING:
        monkeypatch.setattr(sandbox, "_warned", False)  # warned once per process: an earlier test may have had it
        with pytest.warns(RuntimeWarning, match="NOT contained"):
            assert sandbox.backend()[0] == "subprocess"
    else:
        assert sandbox.backend()[0] == "bwrap", sandbox.backend()


@needs_bwrap
def test_killing_the_parent_does_not_kill_the_harness() -> None:
    """Was: `os.kill(os.getppid(), 9)` killed the whole eval run. Now the parent is the sandbox's wrapper and the
    harness's PID does not exist in the sandbox; the harness survives and records a failure."""
    program = ("import os, signal\n"
               "for pid in (os.getppid(), HARNESS_PID):\n"
               "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
               "assert False, 'wrong answer'\n")
    result = _harness(program, timeout_s=5)
    assert not result["passed"] and result["status"].startswith("failed"), result


@pytest.mark.parametrize("setsid_children", [1, 30])
def test_timeout_holds_with_setsid_children(mode: str, setsid_children: int) -> None:
    """Was: a setsid'd child holding the report pipe stretched a 2 s timeout to the child's own lifetime."""
    program = ("import os, time\n"
               f"for _ in range({setsid_children}):\n"
               "    if os.fork() == 0:\n        os.setsid()\n        time.sleep(20)\n        os._exit(0)\n"
               "time.sleep(20)\n")
    start = time.monotonic()
    result = sandbox.run_program(program, timeout_s=2.0)
    assert result == sandbox.Result(False, "timed out")
    assert time.monotonic() - start < 2.0 + 2.0


@needs_bwrap
def test_setsid_children_die_at_the_timeout(marker: str) -> None:
    """Was: 30 setsid'd children (fds closed) outlived the process-group kill. Now the PID namespace dies."""
    program = ("import os, time\n"
               "for _ in range(30):\n"
               "    if os.fork() == 0:\n        os.setsid()\n        os.closerange(3, 256)\n"
               + "\n".join("        " + line for line in _name_self(marker).splitlines()) + "\n"
               "        time.sleep(30)\n        os._exit(0)\n"
               "while True:\n    time.sleep(1)\n")
    start = time.monotonic()
    result = sandbox.run_program(program, timeout_s=2.0)
    assert result.status == "timed out" and time.monotonic() - start < 4.0
    assert _gone(marker, within_s=1.0) == []


@needs_bwrap
def test_sandbox_dies_with_the_harness(marker: str) -> None:
    harness = _harness(_name_self(marker) + "import time\ntime.sleep(60)\n", timeout_s=60, wait=False)
    try:
        end = time.monotonic() + 20
        while not _named(marker) and time.monotonic() < end:
            time.sleep(0.05)
        assert _named(marker), "the program never started"
        harness.kill()
        harness.wait()
        assert _gone(marker, within_s=3.0) == []
    finally:
        harness.kill()
        harness.communicate()


@needs_bwrap
def test_fork_is_capped() -> None:
    """Was: no RLIMIT_NPROC (and none applies to root), so a fork bomb was not contained."""
    program = ("import os, time\nn = 0\n"
               "for _ in range(200):\n"
               "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
               "    if pid == 0:\n        time.sleep(5)\n        os._exit(0)\n"
               "    n += 1\n"
               "raise RuntimeError('forked %d' % n)\n")
    result = sandbox.run_program(program, timeout_s=10.0)
    forked = int(re.search(r"forked (\d+)", result.status).group(1))
    assert 1 <= forked < NPROC, result


@needs_bwrap
def test_fork_bomb_is_contained_and_cleaned_up(marker: str) -> None:
    # Not run against the old sandbox: as root there it would fork-bomb the machine.
    program = _name_self(marker) + ("import os\n"
                                    "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    start = time.monotonic()
    result = sandbox.run_program(program, timeout_s=2.0)
    assert result.status == "timed out" and time.monotonic() - start < 4.0
    assert _gone(marker, within_s=2.0) == []
    assert sandbox.run_program("assert 1 + 1 == 2\n", timeout_s=5.0).passed  # and the next program runs fine


def test_the_verdict_cannot_be_forged(mode: str) -> None:
    """Was: a wrong solution that wrote the token (sys.argv[3]) to fd 3, the report fd, and _exit(0)ed passed."""
    program = ("import os, sys\n"
               "try:\n    os.write(3, sys.argv[3].encode())\nexcept Exception:\n    pass\n"
               "os._exit(0)\n")
    result = sandbox.run_program(program, timeout_s=5.0)
    assert not result.passed, result


def test_the_token_never_reaches_the_program(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-run token is nowhere the program can read (argv, env, other processes' cmdline / environ), and
    would-be verdicts written to every fd it can open do not make a wrong solution pass."""
    token = "f0" * 16
    monkeypatch.setattr(sandbox.secrets, "token_hex", lambda n=None: token)
    others = mode != "fallback"  # in the fallback the harness's own fds are reachable: not written to here
    program = f"""
import os, sys
me = str(os.getpid())
seen = " ".join(sys.argv) + " ".join(os.environ.values())
for pid in [p for p in os.listdir("/proc") if p.isdigit() and p != me]:
    for what in ("cmdline", "environ"):
        try:
            with open("/proc/%s/%s" % (pid, what), "rb") as f:
                seen += f.read().decode("utf-8", "replace")
        except OSError:
            pass
assert {token!r} not in seen, "token leaked"
targets = ["/proc/self/fd/%d" % fd for fd in range(3, 64)]
if {others!r}:
    targets += ["/proc/%s/fd/%d" % (p, fd) for p in os.listdir("/proc") if p.isdigit() and p != me for fd in range(8)]
for path in targets:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"passed\\n")
    except OSError:
        pass
os._exit(0)
"""
    result = sandbox.run_program(program, timeout_s=5.0)
    assert not result.passed and "token leaked" not in result.status, result


@needs_bwrap
def test_no_harness_environment_and_no_harness_processes() -> None:
    """Was: os.environ was scrubbed but /proc/<ppid>/environ gave the harness's environment to the child."""
    canary = "canary-" + secrets.token_hex(8)
    program = f"""
import os
pids = [p for p in os.listdir("/proc") if p.isdigit()]
for pid in pids:
    for what in ("environ", "cmdline"):
        try:
            with open("/proc/%s/%s" % (pid, what), "rb") as f:
                assert {canary!r}.encode() not in f.read(), "leaked through /proc/%s/%s" % (pid, what)
        except OSError:
            pass
assert len(pids) <= 3, "harness processes visible: %s" % pids
"""
    result = _harness(program, timeout_s=5, env={"DKVCACHE_TEST_CANARY": canary})
    assert result["passed"], result


@needs_bwrap
def test_no_network() -> None:
    """Was: the child could open sockets to 127.0.0.1 (the harness's own services)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        program = ("import socket\n"
                   "assert [name for _, name in socket.if_nameindex()] == ['lo'], socket.if_nameindex()\n"
                   "try:\n"
                   f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
                   "except OSError:\n    pass\n"
                   "else:\n    raise AssertionError('reached the harness port')\n")
        result = sandbox.run_program(program, timeout_s=5.0)
        with pytest.raises(BlockingIOError):
            server.accept()
    assert result.passed, result


@needs_bwrap
def test_filesystem_is_read_only_and_private(tmp_path) -> None:  # noqa: ANN001
    """Was: the child could write and delete files anywhere the harness user could."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    program = f"""
import os
done = []
try:
    with open({str(tmp_path / "planted.txt")!r}, "w") as f:
        f.write("x")
    done.append("wrote into the harness's directory")
except OSError:
    pass
try:
    os.remove({str(victim)!r})
    done.append("deleted a harness file")
except OSError:
    pass
assert not done, done
assert not os.path.exists({str(tmp_path)!r}), "the harness's directory is visible"
for path in ("/", "/usr", {os.path.dirname(os.path.realpath(sys.executable))!r}):
    assert os.statvfs(path).f_flag & os.ST_RDONLY, path + " is writable"
with open("scratch.txt", "w") as f:
    f.write("ok")
assert open("scratch.txt").read() == "ok" and os.getcwd() == "/tmp"
"""
    result = sandbox.run_program(program, timeout_s=5.0)
    assert victim.read_text() == "keep me" and not (tmp_path / "planted.txt").exists()
    assert result.passed, result


def test_report_flood_does_not_grow_the_harness(mode: str) -> None:
    """Was: 200 MB written to the report pipe grew the harness by 600 MB. Now at most a few KB are read."""
    program = ("import os\nchunk = b'x' * (1 << 20)\n"
               "for fd in range(1, 20):\n"
               "    try:\n        for _ in range(100):\n            os.write(fd, chunk)\n    except OSError:\n"
               "        pass\n")
    result = _harness(program, timeout_s=3, mode=mode)
    assert not result["passed"] and result["rss_growth_mb"] < 32, result
    assert result["elapsed"] < 3 + 2, result


def test_fallback_warns_once_naming_what_is_not_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_backend_choice", ("subprocess", "forced by the test"))
    monkeypatch.setattr(sandbox, "_warned", False)
    with pytest.warns(RuntimeWarning, match="NOT contained: the network, the filesystem"):
        results = sandbox.run_programs(["assert 1 + 1 == 2", "assert 1 + 1 == 3"])
    assert [r.passed for r in results] == [True, False]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sandbox.run_program("pass").passed


@pytest.mark.parametrize("source, status", [
    ("assert sum([1, 2]) == 3\n", "passed"),
    ("import os\nos._exit(0)\n", "failed: exit status 0"),
    ("raise SystemExit(0)\n", "failed: SystemExit"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", "crashed: SIGSEGV"),
    ("print('noise')\nx = input()\n", "failed: EOFError"),
    ("bytearray(1 << 30)\n", "failed: MemoryError"),
    ("open('big', 'wb').write(b'x' * (32 << 20))\n", "failed: OSError: [Errno 27] File too large"),
])
def test_outcomes_on_every_path(mode: str, source: str, status: str) -> None:
    result = sandbox.run_program(source, timeout_s=5.0, memory_mb=256)
    assert result.status.startswith(status) and result.passed == (status == "passed"), result

"""Run untrusted Python (generated code + its tests) isolated by bubblewrap, with time, memory and process limits.

Never in the harness process. With bubblewrap (``bwrap``, used wherever it can create its namespaces; probed
once, see ``backend()``) each program runs two processes deep in a sandbox of its own: a trusted wrapper, PID 1
of the sandbox (``--as-pid-1``: the program cannot signal it), and the program, a fresh ``python -I`` child.

- **Namespaces**: new PID, network, IPC, UTS, cgroup (when possible) and mount namespaces. The program sees only
  the sandbox's two processes (its own ``/proc``: no harness process to signal, no harness environment or fds)
  and only a loopback of its own (no network, no harness sockets on 127.0.0.1).
- **Filesystem**: read-only binds of ``/usr`` (+ the ``/bin``, ``/lib``… links), a few non-secret ``/etc`` files
  and the Python install (base prefix and venv) on an otherwise empty read-only root; ``/tmp`` (cwd, HOME,
  TMPDIR) is a private 64 MB tmpfs and the only writable place; a minimal ``/dev``. Nothing else of the host
  (home directories, the repo, ``/root``) is visible, and nothing written survives the run.
- **Identity**: as root, bwrap runs without a user namespace and the wrapper (keeping only CAP_SETUID/SETGID)
  starts the program as a random unprivileged uid: no capabilities, ``no_new_privs``, its own ``RLIMIT_NPROC``
  count. As another user, bwrap adds a user namespace (uid 65534 inside, mapped to the harness user, no
  capabilities, nested user namespaces disabled where bwrap supports it).
- **Limits** on the program: ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` (16 MB),
  ``RLIMIT_NPROC`` (a hard cap of 32 tasks: fork bombs stop there), no core dumps, stdin empty, output
  discarded. ``--die-with-parent``: the sandbox dies with the harness. At the wall-clock limit the harness kills
  bwrap; the wrapper dies with it and the kernel kills every process of the PID namespace (``setsid`` and
  daemonized children included), so ``run_program`` returns within a fraction of a second of ``timeout_s``.
- **Verdict**: the wrapper reports the program's outcome in one line on its stdout, prefixed with a per-run token
  that it read from its stdin before the program started. The token never reaches the program (not in its
  argv, env, fds or memory) and the program cannot reach the wrapper (another uid, or the same uid but
  non-dumpable: no ptrace, no ``/proc/1/fd|mem``), so it can neither read the token nor write to the report
  pipe. The harness reads at most 4 KB of report. A program passes only if its process ran to the end of its
  source (a completion note on a private pipe after the last statement, then exit status 0): an early
  ``exit(0)`` / ``os._exit(0)`` or an exception is a failure, a hang "timed out", a crash "crashed: SIG…".

Not covered: no seccomp filter (the kernel's whole syscall surface is reachable; as root the program may still
create user namespaces of its own), no cgroup (memory is bounded per process by ``RLIMIT_AS``, so in total by
32 × ``memory_mb`` plus the 64 MB tmpfs; CPU by the timeout). A hostile program still controls its own outcome:
it can make its own tests pass (e.g. return an object equal to everything, or write the completion note itself
and exit 0), but not another program's verdict, nor the harness.

Fallback, where bwrap is missing or cannot create its namespaces: the same wrapper and limits in a plain
``python -I`` subprocess group (the report still read with a bound, the timeout still held, the group killed),
with a one-time ``RuntimeWarning`` naming what is then NOT contained: the network, the filesystem (it can read,
write and delete what the harness user can), the harness's processes and ``/proc`` (it can kill the harness,
read its environment and memory, hence forge its verdict), children that leave the process group with
``setsid`` (they outlive the timeout), and fork bombs as root (``RLIMIT_NPROC`` does not apply to root).
"""

from __future__ import annotations

import os
import secrets
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

NPROC = 32  # tasks (processes + threads) the program may have at once
FSIZE = 16 << 20  # largest file it may write
TMPFS_BYTES = 64 << 20  # its only writable place (bwrap)
REPORT_BYTES = 4096  # the most the harness reads of the report (and of bwrap's stderr)

# The program's process: set its limits, run the source, then write the completion note (or the exception) on
# the note fd and exit. It knows no token; the note only tells the wrapper how far the program got.
_CHILD = r"""
import os, resource, sys
mem, cpu, nproc, fsize, fd = map(int, sys.argv[1:6])
for res, val in ((resource.RLIMIT_AS, (mem, mem)), (resource.RLIMIT_CPU, (cpu, cpu + 1)),
                 (resource.RLIMIT_FSIZE, (fsize, fsize)), (resource.RLIMIT_CORE, (0, 0)),
                 (resource.RLIMIT_NPROC, (nproc, nproc))):
    hard = resource.getrlimit(res)[1]
    if hard != resource.RLIM_INFINITY:
        val = (min(val[0], hard), min(val[1], hard))
    resource.setrlimit(res, val)
write, leave = os.write, os._exit
with open("program.py", encoding="utf-8") as f:
    source = f.read()
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__sandbox__", "__builtins__": __builtins__})
except BaseException as err:
    try:
        note = "failed: %s: %s" % (type(err).__name__, str(err)[:300])
    except BaseException:
        note = "failed: %s" % type(err).__name__
    try:
        write(fd, note.encode("utf-8", "replace")[:1000])
    finally:
        leave(1)
write(fd, b"done")
leave(0)
"""

# The trusted wrapper: read "token\nsource" from stdin, become non-dumpable, run the program as a child
# (as `uid` when >= 0), wait for it and write one line "token status" on stdout.
_WRAPPER = r"""
import os, signal, subprocess, sys
mem, cpu, nproc, fsize, uid = sys.argv[1:6]
try:
    import ctypes
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no ptrace, no /proc/<pid>/fd|mem|environ
except Exception:
    pass
data = bytearray()
while True:
    chunk = os.read(0, 1 << 16)
    if not chunk:
        break
    data += chunk
token, _, source = bytes(data).partition(b"\n")
del data
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
with open("program.py", "wb") as f:
    f.write(source)
os.chmod("program.py", 0o644)
note_r, note_w = os.pipe()
who = {"user": int(uid), "group": int(uid), "extra_groups": []} if int(uid) >= 0 else {}
child = subprocess.Popen([sys.executable, "-I", "-c", __CHILD_SOURCE__, mem, cpu, nproc, fsize, str(note_w)],
                         stdin=null, stdout=null, stderr=null, pass_fds=(note_w,), **who)
os.close(note_w)
while True:  # PID 1 of the sandbox (bwrap --as-pid-1): reap orphans too, until the program's own exit
    pid, wstatus = os.wait()
    if pid == child.pid:
        code = os.waitstatus_to_exitcode(wstatus)
        break
os.set_blocking(note_r, False)
try:
    note = os.read(note_r, 4096)
except OSError:
    note = b""
if code == 0 and note == b"done":
    status = "passed"
elif code < 0:
    try:
        status = "crashed: " + signal.Signals(-code).name
    except ValueError:
        status = "crashed: signal %d" % -code
elif note.startswith(b"failed: "):
    status = note.decode("utf-8", "replace")
else:
    status = "failed: exit status %d before the end of the program" % code
os.write(1, token + b" " + " ".join(status.split()).encode("utf-8", "replace")[:1500] + b"\n")
""".replace("__CHILD_SOURCE__", repr(_CHILD))

_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
_ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives",
        "/etc/passwd", "/etc/group")
_UNCONTAINED = ("the network, the filesystem (it can read, write and delete what the harness user can), the "
                "harness's processes and /proc (it can kill the harness, read its environment and memory, hence "
                "forge its verdict), children that leave the process group with setsid (they outlive the "
                "timeout), fork bombs as root")

_lock = threading.Lock()
_backend_choice: tuple[str, str] | None = None  # ("bwrap" | "subprocess", why)
_warned = False


@dataclass
class Result:
    """passed: the program ran to its end. status: "passed", "failed: …", "timed out", "crashed: …"."""

    passed: bool
    status: str


def run_program(source: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> Result:
    """Execute ``source`` in the sandbox and report whether it ran to its end without an exception."""
    name, _ = backend()
    return _run(source, timeout_s, memory_mb, bwrap=name == "bwrap")


def run_programs(sources: list[str], timeout_s: float = 10.0, memory_mb: int = 1024,
                 workers: int = 2) -> list[Result]:
    """Run several programs, ``workers`` at a time (threads only wait on the sandboxes)."""
    if not sources:
        return []
    backend()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, timeout_s, memory_mb), sources))


def backend() -> tuple[str, str]:
    """("bwrap", how) when bubblewrap isolates the programs here, else ("subprocess", why not) plus, once per
    process, a RuntimeWarning naming what the fallback leaves uncontained. Probed once (one tiny program)."""
    global _backend_choice, _warned
    with _lock:
        if _backend_choice is None:
            _backend_choice = _probe()
        choice = _backend_choice
        if choice[0] != "bwrap" and not _warned:
            _warned = True
            warnings.warn(f"dkvcache sandbox: bubblewrap is not usable ({choice[1]}); generated code runs in a plain "
                          f"subprocess with rlimits only. NOT contained: {_UNCONTAINED}. Install bubblewrap "
                          "(apt-get install bubblewrap) to isolate it.", RuntimeWarning, stacklevel=3)
    return choice


def _probe() -> tuple[str, str]:
    if not shutil.which("bwrap"):
        return "subprocess", "bwrap not found on PATH"
    result = _run("assert 1 + 1 == 2\n", 20.0, 256, bwrap=True)
    if not result.passed:
        return "subprocess", f"bwrap failed to run a trivial program: {result.status}"
    mode = "as root: no user namespace, the program as a random uid" if _privileged() else "user namespace"
    return "bwrap", f"pid, net, ipc, uts, mount namespaces; {mode}"


def _privileged() -> bool:
    return os.geteuid() == 0


_bwrap_help: str | None = None


def _bwrap_supports(option: str) -> bool:
    global _bwrap_help
    if _bwrap_help is None:
        try:
            _bwrap_help = subprocess.run(["bwrap", "--help"], capture_output=True, text=True, timeout=10,
                                         env=_ENV).stdout
        except (OSError, subprocess.SubprocessError):
            _bwrap_help = ""
    return option in _bwrap_help


def _bind_paths() -> list[tuple[str, str]]:
    """(host source, sandbox destination) of the read-only binds: /usr and the Python install, minimal."""
    dests = {"/usr"}
    for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
              os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))):
        dests.add(os.path.abspath(p))
    kept: list[str] = []
    for d in sorted(dests):
        if d != "/" and not any(d == k or d.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(d)
    return [(os.path.realpath(d), d) for d in kept]


def _bwrap_argv(wrapper_args: list[str]) -> list[str]:
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--as-pid-1", "--new-session", "--hostname", "sandbox",
            "--clearenv"]
    if _privileged():  # no user namespace: the wrapper (root, only setuid/setgid) starts the program as a random uid
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--uid", "65534", "--gid", "65534"]
        if _bwrap_supports("--disable-userns"):
            argv.append("--disable-userns")
    for key, value in {**_ENV, "HOME": "/tmp", "TMPDIR": "/tmp"}.items():
        argv += ["--setenv", key, value]
    # The private tmpfs first: a Python install that itself lives under /tmp (a venv in a CI checkout) is then
    # bound on top of it, instead of being hidden by it.
    argv += ["--perms", "1777", "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp"]
    binds = _bind_paths()
    made: set[str] = {"/tmp"}
    for _, dest in binds:  # parents of the binds, traversable whatever the host's modes (e.g. a 0700 /root)
        parts = dest.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/" + "/".join(parts[:i])
            if parent not in made and not any(parent == d or parent.startswith(d + "/") for _, d in binds):
                made.add(parent)
                argv += ["--perms", "0755", "--dir", parent]
    for src, dest in binds:
        argv += ["--ro-bind", src, dest]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    for path in _ETC:
        argv += ["--ro-bind-try", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/", "--chdir", "/tmp"]
    return argv + [sys.executable, "-I", "-S", "-c", _WRAPPER, *wrapper_args]


def _user_tasks(uid: int) -> int:
    """Tasks (processes + threads) of ``uid`` now: RLIMIT_NPROC counts them all in the fallback."""
    count = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                pass
    return count


def _run(source: str, timeout_s: float, memory_mb: int, bwrap: bool) -> Result:
    token = secrets.token_hex(16)
    cpu = max(1, int(timeout_s) + 1)
    limits = [str(memory_mb << 20), str(cpu)]
    payload = token.encode() + b"\n" + source.encode("utf-8", "surrogatepass")
    if bwrap:
        if _privileged():
            uid = 1_800_000_000 + secrets.randbelow(100_000_000)  # per run: its own RLIMIT_NPROC count
            nproc = NPROC
        else:  # the count includes the wrapper (same user namespace)
            uid, nproc = -1, NPROC + 1
        argv = _bwrap_argv([*limits, str(nproc), str(FSIZE), str(uid)])
        return _supervise(argv, None, payload, token, timeout_s)
    nproc = NPROC + (_user_tasks(os.geteuid()) if not _privileged() else 0)
    with tempfile.TemporaryDirectory(prefix="dkvcache-sandbox-") as tmp:
        argv = [sys.executable, "-I", "-S", "-c", _WRAPPER, *limits, str(nproc), str(FSIZE), "-1"]
        return _supervise(argv, tmp, payload, token, timeout_s)


def _supervise(argv: list[str], cwd: str | None, payload: bytes, token: str, timeout_s: float) -> Result:
    """Start the sandbox, feed it the payload, read at most REPORT_BYTES of its report until it ends or the
    deadline, then kill what is left (bwrap: the whole PID namespace; fallback: the process group)."""
    env = {**_ENV, "HOME": cwd or "/tmp", "TMPDIR": cwd or "/tmp"}
    deadline = time.monotonic() + timeout_s
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    assert proc.stdin and proc.stdout and proc.stderr
    out, err = bytearray(), bytearray()
    timed_out = oversized = False
    sel = selectors.DefaultSelector()
    try:
        for f, events in ((proc.stdin, selectors.EVENT_WRITE), (proc.stdout, selectors.EVENT_READ),
                          (proc.stderr, selectors.EVENT_READ)):
            os.set_blocking(f.fileno(), False)
            sel.register(f.fileno(), events, f)
        todo = memoryview(payload)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                fd = key.fd
                if key.data is proc.stdin:
                    try:
                        todo = todo[os.write(fd, todo[:1 << 16]):]
                    except BlockingIOError:
                        continue
                    except OSError:  # the sandbox died before reading it all
                        todo = todo[len(todo):]
                    if not todo:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                buf = out if key.data is proc.stdout else err
                try:
                    chunk = os.read(fd, REPORT_BYTES + 1 - len(buf))
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    continue
                buf += chunk
                if len(buf) > REPORT_BYTES:  # never buffer more: stop listening to it
                    sel.unregister(fd)
                    oversized = oversized or key.data is proc.stdout
            if oversized:
                break
        if not timed_out and not oversized:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        sel.close()
        _kill(proc)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            try:
                f.close()
            except OSError:
                pass
    text = out.decode("utf-8", "replace")
    prefix = token + " "
    if not oversized and text.startswith(prefix) and text.endswith("\n") and text.count("\n") == 1:
        status = text[len(prefix):-1]
        return Result(status == "passed", status)
    if timed_out:
        return Result(False, "timed out")
    reason = " ".join(err.decode("utf-8", "replace").split())[:300]
    why = "an oversized report" if oversized else f"exit status {proc.returncode}"
    return Result(False, f"failed: no verdict from the sandbox ({why}){': ' + reason if reason else ''}")


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the sandbox's process group (bwrap itself: its init, PID 1 of the namespace, dies with it and takes
    every process of the namespace along) and reap it."""
    for kill, target in ((os.killpg, proc.pid), (os.kill, proc.pid)):
        try:
            kill(target, 9)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass

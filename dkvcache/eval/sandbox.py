"""Run untrusted Python (generated code + its tests) in a separate process with time and memory limits.

Never in the harness process: each program runs in a fresh ``python -I`` child started in its own session,
in a temporary directory, with ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` and no core dumps,
its stdin empty and its output discarded. At the wall-clock limit the parent kills the whole process group
(children the program started included). A program passes only if it runs to its end: the child prints a
per-run random token after the program, so an early ``exit(0)`` / ``os._exit(0)`` does not count. A hanging,
crashing or memory-hungry program scores 0. Not a security boundary against malicious code (no namespaces,
no seccomp): it contains the accidents of generated code (endless loops, memory bombs, crashes, stray
output, ``input()``).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# The child: set its own limits, silence fds 0-2, run the program, then print the token on a saved fd.
_CHILD = r"""
import os, resource, sys
mem, cpu, token, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
with open(path, encoding="utf-8") as f:
    source = f.read()
report = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__sandbox__", "__builtins__": __builtins__})
except BaseException as err:
    report.write("failed: %s: %s" % (type(err).__name__, str(err)[:300]))
    report.flush()
    os._exit(1)
report.write(token)
report.flush()
os._exit(0)
"""


@dataclass
class Result:
    """passed: the program ran to its end. status: "passed", "failed: …", "timed out", "crashed: …"."""

    passed: bool
    status: str


def run_program(source: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> Result:
    """Execute ``source`` in a sandboxed child process and report whether it completed without an exception."""
    token = secrets.token_hex(16)
    cpu = max(1, int(timeout_s) + 1)
    with tempfile.TemporaryDirectory(prefix="dkvcache-sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        cmd = [sys.executable, "-I", "-c", _CHILD, str(memory_mb << 20), str(cpu), token, path]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "HOME": tmp, "TMPDIR": tmp}
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return Result(False, "timed out")
    text = out.decode("utf-8", "replace")
    if proc.returncode == 0 and text == token:
        return Result(True, "passed")
    if proc.returncode is not None and proc.returncode < 0:
        return Result(False, f"crashed: {signal.Signals(-proc.returncode).name}")
    if text.startswith("failed: "):
        return Result(False, text)
    return Result(False, f"failed: exit status {proc.returncode} before the end of the program")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_programs(sources: list[str], timeout_s: float = 10.0, memory_mb: int = 1024,
                 workers: int = 2) -> list[Result]:
    """Run several programs, ``workers`` at a time (threads only wait on the child processes)."""
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, timeout_s, memory_mb), sources))

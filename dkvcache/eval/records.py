"""The run directory: per-sample JSONL records written batch by batch, read back for resuming, merged at the end.

Layout of ``<output_dir>/<run_name>/``: ``config.yaml`` (the resolved config), ``samples.jsonl`` (one JSON
line per sample), ``samples.rank{r}.jsonl`` (per-process shards while an accelerate run is in progress; merged
into samples.jsonl by rank 0 at the end), ``summary.json``, ``.run.lock`` (held by the run writing the directory:
a second run with the same ``run_name`` is refused while the first holds it) and ``.merge.lock`` (merges of one
directory take turns).

Writes are append + flush + fsync of whole lines, one write per batch. A process killed mid-write leaves at most
one partial last line: readers skip it and the next writer cuts it off before appending. Records are keyed by
``id``; reading takes the union of samples.jsonl and every shard, first occurrence wins, so an interrupted merge
never duplicates a sample. A merge writes a temporary file of its own (``tempfile.mkstemp``) and replaces
samples.jsonl atomically, under ``.merge.lock``, so two processes merging one directory never lose a record.
Locks are ``fcntl.flock`` locks (POSIX): the kernel releases them when their process dies, so a killed run never
leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import tempfile
from collections.abc import Iterator

SAMPLES = "samples.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
RUN_LOCK = ".run.lock"
MERGE_LOCK = ".merge.lock"


class RunLocked(RuntimeError):
    """Another process holds the run directory's lock (another run with the same run_name is in progress)."""


def shard_name(rank: int) -> str:
    return f"samples.rank{rank}.jsonl"


def read_records(path: str) -> list[dict]:
    """Complete JSON lines of ``path`` (a missing file is empty; a malformed line is skipped)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # a partial last line of a killed writer
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def record_files(run_dir: str) -> list[str]:
    return [os.path.join(run_dir, SAMPLES), *sorted(glob.glob(os.path.join(run_dir, "samples.rank*.jsonl")))]


def read_all(run_dir: str) -> dict[str, dict]:
    """Every finished sample of the run by id (samples.jsonl first, then the shards)."""
    records: dict[str, dict] = {}
    for path in record_files(run_dir):
        for rec in read_records(path):
            records.setdefault(str(rec["id"]), rec)
    return records


def _truncate_partial_line(path: str) -> None:
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.seek(0)
        f.truncate(data.rfind(b"\n") + 1)


class RecordWriter:
    """Appends whole batches of records to one JSONL file, durably."""

    def __init__(self, path: str) -> None:
        self.path = path
        _truncate_partial_line(path)

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """Hold ``<run_dir>/.run.lock`` for the duration (created with the directory). RunLocked at once when another
    process holds it: two runs with one run_name would interleave their records."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, RUN_LOCK)
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunLocked(f"{run_dir} is in use by another dkvcache.eval run ({holder} holds {path}); wait for it "
                            "to finish, or pass another run_name (or output_dir)") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _merge_lock(run_dir: str) -> Iterator[None]:
    with open(os.path.join(run_dir, MERGE_LOCK), "a", encoding="utf-8") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # merges take milliseconds: wait for the other one
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def merge(run_dir: str, order: list[str] | None = None) -> list[dict]:
    """Fold the shards into samples.jsonl (atomic replace), ordered by ``order`` (ids) then index; drop shards.

    Merges of one directory take turns (``.merge.lock``) and each writes its own temporary file, so concurrent
    merges (two processes, or a merge racing a resumed run's) end with every record exactly once.
    """
    with _merge_lock(run_dir):
        files = record_files(run_dir)
        records = read_all(run_dir)
        rank = {i: n for n, i in enumerate(order or [])}
        merged = sorted(records.values(), key=lambda r: (rank.get(str(r["id"]), len(rank)), r.get("index", 0)))
        path = os.path.join(run_dir, SAMPLES)
        fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=SAMPLES + ".", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would make samples.jsonl private
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        for shard in files[1:]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(shard)
    return merged


def clear(run_dir: str) -> None:
    """Remove the samples and summary of a run (``overwrite=true``)."""
    for path in [*record_files(run_dir), os.path.join(run_dir, SUMMARY)]:
        if os.path.exists(path):
            os.remove(path)

"""The scheduler: one thread owns the model and advances every running batch one step per tick.

Admitted requests go to a *pool* when their settings allow (greedy decoding, a cache that starts every block
from a full forward): one batch per settings, re-formed at every block boundary, so a request joins at the
pool's next boundary and leaves at the one where its text is final. Other settings run as *waves* that start at
a block boundary of a running batch (or when nothing runs) and keep their rows to the end (see
:mod:`dkvcache.serve.groups`). Either way a request's output equals its single run: the tests check it in float64
with requests joining busy batches.

Events reach each request through its ``sink`` callback, called from the scheduler thread.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

from dkvcache.serve.groups import Group, Pool, Wave
from dkvcache.serve.jobs import Event, Job, QueueFull

ADMISSIONS = ("continuous", "static")
_MAX_REMEMBERED = 1024  # settings known not to pool, remembered so they are not resolved again


class Scheduler:
    """Owns the model; ``submit`` jobs from any thread; ``stop`` drains what was accepted, then ends the thread.

    max_batch: rows decoded at once (over all waves); max_queue: waiting jobs before ``submit`` raises QueueFull.
    admission: "continuous" (waiting jobs start at the next block boundary) or "static" (a batch starts only when
    nothing runs, once ``max_batch`` jobs wait or the oldest has waited ``fill_timeout_s``: the baseline the load
    test compares with).
    """

    def __init__(self, model: Any, tokenizer: Any, end_ids: set[int], max_batch: int = 8,
                 max_queue: int = 64, admission: str = "continuous", fill_timeout_s: float = 0.5) -> None:
        if admission not in ADMISSIONS:
            raise ValueError(f"admission={admission!r} is invalid; allowed: {list(ADMISSIONS)}")
        self.model, self.tokenizer, self.end_ids = model, tokenizer, end_ids
        self.max_batch, self.max_queue = max_batch, max_queue
        self.admission, self.fill_timeout_s = admission, fill_timeout_s
        self._queue: collections.deque[Job] = collections.deque()
        self._groups: list[Group] = []
        self._pools: dict[str, Pool] = {}  # by job signature
        self._unpoolable: set[str] = set()
        self._cv = threading.Condition()
        self._stopping = False
        self._boundary = False
        self._thread = threading.Thread(target=self._run, name="dkvcache-scheduler", daemon=True)
        # Counters the tests and /health read: waves started while another was mid-way, the most rows at once.
        self.counters = {"groups_started": 0, "joined_running": 0, "max_rows": 0, "groups_completed": 0,
                         "kv_reused": 0}

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull when ``max_queue`` are already waiting, RuntimeError once stopping."""
        with self._cv:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting")
            self._queue.append(job)
            self._cv.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish every accepted one, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    def load(self) -> dict:
        """Rows running and jobs waiting (for /health)."""
        with self._cv:
            running = sum(1 for g in self._groups for r in g.members() if not r.finished)
            return {"running": running, "queued": len(self._queue), "groups": len(self._groups), **self.counters}

    def _running_rows(self) -> int:
        return sum(len(g.members()) for g in self._groups)

    def _admit(self) -> list[Job]:
        """Waiting jobs in arrival order, as many as the free rows allow."""
        free = self.max_batch - self._running_rows()
        admitted: list[Job] = []
        kept: collections.deque[Job] = collections.deque()
        while self._queue:
            job = self._queue.popleft()
            if job.cancelled.is_set():
                continue
            if free > 0:
                admitted.append(job)
                free -= 1
            else:
                kept.append(job)
        self._queue = kept
        return admitted

    def _may_admit(self) -> bool:
        if self.admission == "continuous":
            return True  # a pool folds newcomers in at its next boundary; waves start at one (see _place)
        if self._groups or not self._queue:
            return False
        waited = time.monotonic() - self._queue[0].submitted
        return self._stopping or len(self._queue) >= self.max_batch or waited >= self.fill_timeout_s

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._groups and not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._groups and not self._queue:
                    return
                jobs = self._admit() if self._may_admit() else []
                if not jobs and not self._groups:  # static batching waiting for its batch to fill
                    self._cv.wait(self.fill_timeout_s / 10)
                    continue
            self._place(jobs)
            self._tick()

    def _place(self, jobs: list[Job]) -> None:
        """Pool what can be pooled (continuous admission); the rest start waves, grouped by settings. A wave
        starts only when nothing runs or a block was just completed; until then its jobs wait in line."""
        fresh: dict[str, list[Job]] = {}
        for job in jobs:
            pool = self._pools.get(job.signature) if self.admission == "continuous" else None
            if pool is None and self.admission == "continuous" and job.signature not in self._unpoolable:
                try:
                    pool = Pool.for_job(self.model, self.tokenizer, self.end_ids, job)
                except (ValueError, TypeError) as error:  # validated at the door already; kept for defence
                    job.sink(Event("error", text=str(error), status=400))
                    continue
                if pool is None:
                    if len(self._unpoolable) >= _MAX_REMEMBERED:  # clients choose the settings: stay bounded
                        self._unpoolable.clear()
                    self._unpoolable.add(job.signature)
                else:
                    self._add_group(pool)
                    self._pools[job.signature] = pool
            if pool is not None:
                self.counters["joined_running"] += int(pool.mid_way)
                pool.add(job)
            else:
                fresh.setdefault(job.signature, []).append(job)
        waves_may_start = self.admission == "static" or self._boundary or not any(
            isinstance(g, Wave) for g in self._groups)
        self._boundary = False
        for group_jobs in fresh.values():
            if not waves_may_start:
                with self._cv:
                    self._queue.extendleft(reversed(group_jobs))
                continue
            try:
                wave = Wave(self.model, self.tokenizer, self.end_ids, group_jobs)
            except (ValueError, TypeError) as error:
                for job in group_jobs:
                    job.sink(Event("error", text=str(error), status=400))
                continue
            self.counters["joined_running"] += int(any(g.mid_way for g in self._groups))
            self._add_group(wave)

    def _add_group(self, group: Group) -> None:
        with self._cv:
            self.counters["groups_started"] += 1
            self._groups.append(group)
        self.counters["max_rows"] = max(self.counters["max_rows"], self._running_rows())

    def _tick(self) -> None:
        now = time.monotonic()
        for group in list(self._groups):
            group.drop_gone(now)
            try:
                if group.live and group.advance():
                    self._boundary = True
            except Exception as error:  # a failing step must not take the other requests down
                group.fail(500, f"generation failed: {type(error).__name__}: {error}")
            self.counters["max_rows"] = max(self.counters["max_rows"], self._running_rows())
            if group.done:
                with self._cv:
                    self._groups.remove(group)
                    self.counters["groups_completed"] += 1
                if isinstance(group, Pool):
                    self._pools.pop(group.signature, None)
                    self.counters["kv_reused"] += group.buffers_reused

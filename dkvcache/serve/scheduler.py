"""The scheduler: one thread owns the model and interleaves every running generation step by step.

Requests with the same generation settings that are waiting when a running generation finishes a block (or when
nothing runs) start together as one *wave*: a left-padded batch decoded by one :class:`GenerationSession`, each
row with its own seed. Every tick advances every wave by one step, so a request joins while others are mid-way and
never waits for the batch to drain; a row leaves as soon as its text is final (an end token in its finished
blocks, a stop string, or the last block) and a wave whose rows have all left stops computing. Because a
padded batch row equals its single run (counter-based noise per row seed, padding masked), a request's output
does not depend on what else is running.

Events reach each request through its ``sink`` callback, called from the scheduler thread.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dkvcache.generation import GenerationSession

ADMISSIONS = ("continuous", "static")


class QueueFull(Exception):
    """The bounded queue of waiting requests is full (the server answers 429)."""


@dataclass
class Usage:
    """What one request cost: prompt and completion tokens, and the forwards of the wave while it ran."""

    prompt_tokens: int
    completion_tokens: int
    forwards: int

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens, "forwards": self.forwards,
                "tokens_per_forward": self.completion_tokens / max(self.forwards, 1)}


@dataclass
class Event:
    """``kind`` is "text" (a finished block's new text), "done" (final text, finish_reason, usage) or "error"."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    status: int = 200
    first_block_s: float | None = None


@dataclass
class Job:
    """One request: its prompt ids, its generation settings (seed apart) and where its events go."""

    prompt_ids: list[int]
    settings: dict[str, Any]
    seed: int
    sink: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    timeout_s: float | None = None
    submitted: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def signature(self) -> str:
        """Requests batch together only when every generation setting but the seed is the same."""
        return repr(sorted(self.settings.items()))

    def expired(self, now: float) -> bool:
        return self.timeout_s is not None and now - self.submitted > self.timeout_s


@dataclass
class _Row:
    job: Job
    sent: str = ""
    finished: bool = False
    first_block_s: float | None = None


class _Wave:
    """Rows that started together: one left-padded GenerationSession."""

    def __init__(self, model: Any, tokenizer: Any, jobs: list[Job], end_ids: set[int]) -> None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        width = max(len(j.prompt_ids) for j in jobs)
        ids = [[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs]
        mask = [[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs]
        device = model.device
        self.session = GenerationSession(
            model, torch.tensor(ids, device=device), attention_mask=torch.tensor(mask, device=device),
            seed=[j.seed for j in jobs], **{"eos_early_stop": True, **jobs[0].settings})
        self.tokenizer = tokenizer
        self.end_ids = end_ids
        self.rows = [_Row(j) for j in jobs]

    @property
    def live(self) -> bool:
        return any(not r.finished for r in self.rows)

    def fail(self, status: int, message: str) -> None:
        for row in self.rows:
            if not row.finished:
                row.finished = True
                row.job.sink(Event("error", text=message, status=status))

    def drop_gone(self, now: float) -> None:
        """Rows whose client went away or whose time ran out leave (the wave stops once none is left)."""
        for row in self.rows:
            if row.finished:
                continue
            if row.job.cancelled.is_set():
                row.finished = True
            elif row.job.expired(now):
                row.finished = True
                row.job.sink(Event("error", text=f"the request ran past its timeout of {row.job.timeout_s} s",
                                   status=504))

    def advance(self) -> bool:
        """One step of the session; returns True when a block was completed (a boundary others may join at)."""
        completed = self.session.step()
        if completed is None:
            return False
        self._emit(completed)
        return True

    def _emit(self, block_end: int) -> None:
        x = self.session.sequences
        start = self.session.prompt_length
        generated = x[:, start:block_end].tolist()
        forwards = self.session.state.forwards
        for row, tokens in zip(self.rows, generated, strict=True):
            if row.finished:
                continue
            if row.first_block_s is None:
                row.first_block_s = time.monotonic() - row.job.submitted
            cut = next((i for i, t in enumerate(tokens) if t in self.end_ids), None)
            text = self.tokenizer.decode(tokens[:cut], skip_special_tokens=True)
            reason = "stop" if cut is not None else None
            for stop in row.job.stop:
                at = text.find(stop)
                if at >= 0:
                    text, reason = text[:at], "stop"
            if reason is None and self.session.done:
                reason = "length"
            if len(text) > len(row.sent) and text.startswith(row.sent):
                row.job.sink(Event("text", text=text[len(row.sent):], first_block_s=row.first_block_s))
                row.sent = text
            if reason is not None:
                row.finished = True
                n_tokens = len(tokens) if cut is None else cut
                usage = Usage(len(row.job.prompt_ids), n_tokens, forwards)
                row.job.sink(Event("done", text=text, finish_reason=reason, usage=usage,
                                   first_block_s=row.first_block_s))


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
        self._waves: list[_Wave] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._boundary = False
        self._thread = threading.Thread(target=self._run, name="dkvcache-scheduler", daemon=True)
        # Counters the tests and /health read: waves started while another was mid-way, the most rows at once.
        self.counters = {"waves_started": 0, "joined_running": 0, "max_rows": 0, "waves_completed": 0}

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
            running = sum(1 for w in self._waves for r in w.rows if not r.finished)
            return {"running": running, "queued": len(self._queue), "waves": len(self._waves), **self.counters}

    def _running_rows(self) -> int:
        return sum(len(w.rows) for w in self._waves)

    def _admit(self) -> list[list[Job]]:
        """Waiting jobs grouped by settings, in arrival order, as many as the free rows allow."""
        free = self.max_batch - self._running_rows()
        groups: dict[str, list[Job]] = {}
        kept: collections.deque[Job] = collections.deque()
        while self._queue:
            job = self._queue.popleft()
            if job.cancelled.is_set():
                continue
            if free > 0:
                groups.setdefault(job.signature, []).append(job)
                free -= 1
            else:
                kept.append(job)
        self._queue = kept
        return list(groups.values())

    def _may_admit(self) -> bool:
        if self.admission == "continuous":
            return not self._waves or self._boundary
        if self._waves or not self._queue:
            return False
        waited = time.monotonic() - self._queue[0].submitted
        return self._stopping or len(self._queue) >= self.max_batch or waited >= self.fill_timeout_s

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waves and not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._waves and not self._queue:
                    return
                groups = self._admit() if self._may_admit() else []
                if not groups and not self._waves:  # static batching waiting for its batch to fill
                    self._cv.wait(self.fill_timeout_s / 10)
                    continue
            self._boundary = False
            for jobs in groups:
                self._start_wave(jobs)
            self._tick()

    def _start_wave(self, jobs: list[Job]) -> None:
        try:
            wave = _Wave(self.model, self.tokenizer, jobs, self.end_ids)
        except (ValueError, TypeError) as error:  # validated at the door already; kept for defence
            for job in jobs:
                job.sink(Event("error", text=str(error), status=400))
            return
        with self._cv:
            self.counters["waves_started"] += 1
            self.counters["joined_running"] += int(any(w.session.state.global_step > 0 for w in self._waves))
            self._waves.append(wave)
            self.counters["max_rows"] = max(self.counters["max_rows"], self._running_rows())

    def _tick(self) -> None:
        now = time.monotonic()
        for wave in list(self._waves):
            wave.drop_gone(now)
            try:
                if wave.live and wave.advance():
                    self._boundary = True
            except Exception as error:  # a failing step must not take the other requests down
                wave.fail(500, f"generation failed: {type(error).__name__}: {error}")
            if not wave.live or wave.session.done:
                with self._cv:
                    self._waves.remove(wave)
                    self.counters["waves_completed"] += 1

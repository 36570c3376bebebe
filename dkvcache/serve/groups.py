"""The two ways the scheduler batches rows: a *pool* re-forms its batch at every block boundary, a *wave* keeps
the rows it started with.

Pool (greedy decoding with a cache that recomputes everything at a block start: none, prefix, dual): at every
block boundary the batch is rebuilt from each row's tokens so far — finished rows leave, waiting requests join —
laid out so that every row's *current* block sits at the same columns: its prompt and finished blocks left-padded
before them, its masked future after, padding (not attended to) where a row has fewer blocks left. Nothing of
the previous batch is carried over but the tokens, which is exactly what such a strategy keeps across a block
boundary, and no noise is drawn, so each row decodes as it would alone.

Wave (everything else: sampling, or caches that carry state across blocks): one left-padded
:class:`GenerationSession` from start to end, each row with its own seed (counter-based noise: a row's samples do
not depend on its neighbours). A row that has left rides along until the wave ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dkvcache.generation import GenerationSession
from dkvcache.resolve import resolve
from dkvcache.serve.jobs import Event, Job, Usage, settings_signature

if TYPE_CHECKING:
    from dkvcache.options import GenerationOptions

# Strategies whose every block starts from a full forward: the tokens are all they carry across a boundary.
BLOCK_FRESH_CACHES = frozenset({"none", "prefix", "dual"})
DETERMINISTIC_ALGS = frozenset({"maskgit_plus", "entropy", "topk_margin"})


def can_pool(opts: GenerationOptions) -> bool:
    """Whether requests with these options may share a re-formed batch (no noise, nothing kept across blocks)."""
    return (opts.cache_type in BLOCK_FRESH_CACHES and opts.decoding == "vanilla" and opts.temperature == 0
            and opts.alg in DETERMINISTIC_ALGS and not opts.alg_temp and not opts.sigma and opts.cfg_scale == 0)


@dataclass
class Row:
    """One request inside a group: what it has been sent and what it has cost."""

    job: Job
    sent: str = ""
    finished: bool = False
    first_block_s: float | None = None
    tokens: list[int] = field(default_factory=list)  # pool: the row's tokens in finished blocks
    forwards: int = 0


def report(row: Row, tokens: list[int], last: bool, forwards: int, tokenizer: Any, end_ids: set[int]) -> None:
    """Send the row's new text of its finished blocks; finish it at an end token, a stop string or ``last``."""
    if row.first_block_s is None:
        row.first_block_s = time.monotonic() - row.job.submitted
    cut = next((i for i, t in enumerate(tokens) if t in end_ids), None)
    text = tokenizer.decode(tokens[:cut], skip_special_tokens=True)
    reason = "stop" if cut is not None else None
    for stop in row.job.stop:
        at = text.find(stop)
        if at >= 0:
            text, reason = text[:at], "stop"
    if reason is None and last:
        reason = "length"
    # While the text may go on, hold back a tail that could be the start of a stop string, so a stop that
    # straddles two blocks is never half-streamed.
    held = 0 if reason else max((k for stop in row.job.stop for k in range(1, len(stop)) if text.endswith(stop[:k])),
                                default=0)
    visible = text[: len(text) - held]
    if len(visible) > len(row.sent) and visible.startswith(row.sent):
        row.job.sink(Event("text", text=visible[len(row.sent):], first_block_s=row.first_block_s))
        row.sent = visible
    if reason is not None:
        row.finished = True
        usage = Usage(len(row.job.prompt_ids), len(tokens) if cut is None else cut, forwards)
        row.job.sink(Event("done", text=text, finish_reason=reason, usage=usage, first_block_s=row.first_block_s))


class Group:
    """What the scheduler needs of a batch: its rows, one step at a time, and who left."""

    rows: list[Row]

    def __init__(self, model: Any, tokenizer: Any, end_ids: set[int]) -> None:
        self.model, self.tokenizer, self.end_ids = model, tokenizer, end_ids

    def members(self) -> list[Row]:
        """Every row this group answers for (running or about to join)."""
        return self.rows

    @property
    def live(self) -> bool:
        return any(not r.finished for r in self.members())

    @property
    def mid_way(self) -> bool:
        """A step has run since the batch formed (someone joining now joins a running batch)."""
        raise NotImplementedError

    @property
    def done(self) -> bool:
        raise NotImplementedError

    def advance(self) -> bool:
        """One step; True when a block was completed (a boundary others may join at)."""
        raise NotImplementedError

    def fail(self, status: int, message: str) -> None:
        for row in self.members():
            if not row.finished:
                row.finished = True
                row.job.sink(Event("error", text=message, status=status))

    def drop_gone(self, now: float) -> None:
        """Rows whose client went away or whose time ran out leave."""
        for row in self.members():
            if row.finished:
                continue
            if row.job.cancelled.is_set():
                row.finished = True
            elif row.job.expired(now):
                row.finished = True
                row.job.sink(Event("error", text=f"the request ran past its timeout of {row.job.timeout_s} s",
                                   status=504))

    def _left_padded(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention_mask) of ``sequences`` left-padded to the longest, on the model's device."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(map(len, sequences))
        ids = [[pad] * (width - len(s)) + s for s in sequences]
        mask = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
        device = self.model.device
        return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


class Wave(Group):
    """Rows that started together: one left-padded GenerationSession to the end."""

    def __init__(self, model: Any, tokenizer: Any, end_ids: set[int], jobs: list[Job]) -> None:
        super().__init__(model, tokenizer, end_ids)
        ids, mask = self._left_padded([j.prompt_ids for j in jobs])
        self.session = GenerationSession(model, ids, attention_mask=mask, seed=[j.seed for j in jobs],
                                         **{"eos_early_stop": True, **jobs[0].settings})
        self.rows = [Row(j) for j in jobs]

    @property
    def mid_way(self) -> bool:
        return self.session.state.global_step > 0

    @property
    def done(self) -> bool:
        return self.session.done or not self.live

    def advance(self) -> bool:
        completed = self.session.step()
        if completed is None:
            return False
        start = self.session.prompt_length
        generated = self.session.sequences[:, start:completed].tolist()
        forwards = self.session.state.forwards
        for row, tokens in zip(self.rows, generated, strict=True):
            if not row.finished:
                report(row, tokens, self.session.done, forwards, self.tokenizer, self.end_ids)
        return True


class Pool(Group):
    """Requests with one set of poolable settings: the batch is re-formed at every block boundary."""

    def __init__(self, model: Any, tokenizer: Any, end_ids: set[int], settings: dict[str, Any],
                 opts: GenerationOptions) -> None:
        super().__init__(model, tokenizer, end_ids)
        self.settings = settings
        self.signature = settings_signature(settings)  # = Job.signature of its requests
        self.total = opts.max_new_tokens
        self.block = opts.block_length or opts.max_new_tokens
        self.steps_per_block = opts.steps // (self.total // self.block)
        self.rows: list[Row] = []
        self.waiting: list[Row] = []
        self.session: GenerationSession | None = None
        self._kv = None  # the last batch's K/V buffers, reused when the next batch has the same shape
        self.buffers_reused = 0

    @classmethod
    def for_job(cls, model: Any, tokenizer: Any, end_ids: set[int], job: Job) -> Pool | None:
        """A pool for this job's settings, or None when they cannot be pooled."""
        opts = resolve(model, len(job.prompt_ids), **job.settings)
        return cls(model, tokenizer, end_ids, job.settings, opts) if can_pool(opts) else None

    def add(self, job: Job) -> None:
        """Join at the next block boundary."""
        self.waiting.append(Row(job))

    @property
    def size(self) -> int:
        return len(self.rows) + len(self.waiting)

    @property
    def mid_way(self) -> bool:
        return self.session is not None and self.session.state.global_step > 0

    def members(self) -> list[Row]:
        return self.rows + self.waiting

    @property
    def done(self) -> bool:
        return not self.live

    def advance(self) -> bool:
        if self.session is None:
            self._form()
        completed = self.session.step()
        if completed is None:
            return False
        start = self.session.prompt_length  # every row's current block sits at [start, start + block)
        blocks = self.session.sequences[:, start:start + self.block].tolist()
        forwards = self.session.state.forwards
        self._kv = self.session.state.kv
        for row, block in zip(self.rows, blocks, strict=True):
            row.tokens += block
            row.forwards += forwards
            if not row.finished:
                report(row, row.tokens, len(row.tokens) >= self.total, row.forwards, self.tokenizer, self.end_ids)
        self.rows = [r for r in self.rows if not r.finished]
        self.session = None  # re-formed at the next step, with whoever is left and whoever waits
        return True

    def _form(self) -> None:
        self.rows = [r for r in self.rows + self.waiting if not r.finished]
        self.waiting = []
        fixed = [r.job.prompt_ids + r.tokens for r in self.rows]
        left = [self.total - len(r.tokens) for r in self.rows]
        longest = max(left)
        ids, mask = self._left_padded(fixed)
        tail = torch.tensor([[True] * n + [False] * (longest - n) for n in left], device=self.model.device)
        settings = {**self.settings, "max_new_tokens": longest, "block_length": self.block,
                    "steps": self.steps_per_block * (longest // self.block), "eos_early_stop": False}
        self.session = GenerationSession(self.model, ids, attention_mask=mask, generation_mask=tail,
                                         seed=[r.job.seed for r in self.rows], **settings)
        self._reuse_buffers()

    def _reuse_buffers(self) -> None:
        """Hand the last batch's K/V buffers to the new one when the shape is the same: a pooled block starts
        with a full forward that overwrites every slot before any is read."""
        kv, self._kv = self._kv, None
        state = self.session.state
        if kv is not None and kv.length == state.length and kv.keys[0].shape[0] == state.batch:
            state.kv = kv
            self.buffers_reused += 1

"""What travels between the HTTP layer and the scheduler: a request (:class:`Job`) and what it hears back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def settings_signature(settings: dict[str, Any]) -> str:
    """Equal for settings that may share a batch (every generation setting but the seed, which is per row)."""
    return repr(sorted(settings.items()))


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
        return settings_signature(self.settings)

    def expired(self, now: float) -> bool:
        return self.timeout_s is not None and now - self.submitted > self.timeout_s

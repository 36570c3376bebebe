"""The argument checks every option owner uses, so one mistake raises one exception type everywhere.

A value of the wrong type (``steps=2.5``, ``current_k="8"``, ``use_cache="yes"``) is a ``TypeError``; a value of the
right type outside its range (``steps=0``, ``rollout_p=1.5``) or not among the allowed choices is a ``ValueError``.
Every message starts with ``diffusion_generate:`` and names the argument and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

PREFIX = "diffusion_generate: "


def fail(name: str, value: Any, allowed: str) -> ValueError:
    """The ValueError for ``name=value`` outside ``allowed`` (a description)."""
    return ValueError(f"{PREFIX}{name}={value!r} is invalid; allowed: {allowed}")


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    """An int ≥ ``minimum`` (bools are not ints here)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{PREFIX}{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise fail(name, value, f"an int >= {minimum}")


def check_number(name: str, value: Any, low: float, high: float, allow_none: bool = False,
                 low_open: bool = False, finite: bool = True) -> None:
    """A real number in [low, high] (or (low, high] with ``low_open``); NaN never passes, ±inf only with
    ``finite=False``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{PREFIX}{name} must be a number, got {type(value).__name__} {value!r}")
    if finite and not math.isfinite(value):
        raise fail(name, value, f"a finite number in {'(' if low_open else '['}{low}, {high}]")
    if not (low < value if low_open else low <= value) or not value <= high:
        raise fail(name, value, f"a number in {'(' if low_open else '['}{low}, {high}]")


def check_bool(name: str, value: Any) -> None:
    """True or False (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{PREFIX}{name} must be True or False, got {value!r}")


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    """One of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise fail(name, value, repr(allowed))


SEED_RANGE = 2**63


def check_seed(value: Any) -> None:
    """``seed``: an int in [0, 2**63) or a list/tuple of such ints (one per row)."""
    if value is None:
        return
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{PREFIX}seed must be an int in [0, 2**63) or a list of such ints (one per row), got "
                            f"{value!r}")
        if not 0 <= item < SEED_RANGE:
            raise fail("seed", value, "an int in [0, 2**63) or a list of such ints (one per row)")

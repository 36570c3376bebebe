"""Parsing of ``key=value`` command-line overrides, shared by ``dkvcache.bench`` and ``dkvcache.tasks.arith``."""

from __future__ import annotations

import json
from typing import Any

_SPECIAL: dict[str, Any] = {"true": True, "false": False, "none": None, "null": None}


def parse_value(text: str) -> Any:
    """The Python value of one command-line value, tried in this order (surrounding whitespace ignored):

    * ``true`` / ``false`` (any case) → ``True`` / ``False``
    * ``none`` / ``null`` (any case) → ``None``
    * an ``int`` literal (``"8"``, ``"-3"``) → ``int``
    * a ``float`` literal (``"0.9"``, ``"1e-3"``, ``"inf"``) → ``float``
    * text starting with ``[`` or ``{`` that is valid JSON (``"[1,2]"``) → that list / dict
    * anything else → the stripped text itself (``"dual"`` → ``"dual"``)
    """
    stripped = text.strip()
    low = stripped.lower()
    if low in _SPECIAL:
        return _SPECIAL[low]
    for cast in (int, float):
        try:
            return cast(stripped)
        except ValueError:
            pass
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            pass
    return stripped

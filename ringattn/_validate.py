"""Argument checks shared by every module: one wording for the same mistake everywhere.

Each raises ``ValueError`` naming the argument, what was expected and what came, and returns the
value (normalised) when it is fine, so a check reads as an assignment:

>>> positive_int("cp_size", 4)
4
>>> positive_int("cp_size", True)
Traceback (most recent call last):
...
ValueError: cp_size: expected a positive int, got True
>>> one_of("comm", "ring", ("plain", "ring", "direct"))
'ring'
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

__all__ = ["positive_int", "nonnegative_int", "positive_float", "one_of"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(name: str, value: Any, hint: str = "") -> int:
    """``value`` if it is an int >= 1 (not a bool), else ``ValueError`` (``hint`` appended)."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}{hint}")
    return value


def nonnegative_int(name: str, value: Any, hint: str = "") -> int:
    """``value`` if it is an int >= 0 (not a bool), else ``ValueError``."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}{hint}")
    return value


def positive_float(name: str, value: Any, what: str = "a positive finite number") -> float:
    """``float(value)`` if it is a finite number > 0 (not a bool), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return float(value)


def one_of(name: str, value: Any, choices: Collection, hint: str = "") -> Any:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}{hint}")
    return value

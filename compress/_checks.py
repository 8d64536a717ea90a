"""Argument validation shared by the strategies: clear ``ValueError`` messages."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable


def check_real(name: str, value, lo: float | None = None, hi: float | None = None) -> float:
    """``value`` as a finite float within [lo, hi]; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int within [lo, hi]; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def check_choice(name: str, value, choices: Iterable):
    """``value`` if it is one of ``choices``; ``ValueError`` listing them otherwise."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value

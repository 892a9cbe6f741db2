"""Argument checks shared by every public constructor and function.

Each check raises at once, naming the argument, the value and what is allowed: a
``TypeError`` for a value of the wrong kind (``"0.5"`` for a number, ``True`` for an integer,
``"no"`` for a boolean), a ``ValueError`` for a value of the right kind outside its range.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_integer",
    "check_name_filter",
    "check_number",
    "check_tolerance",
]


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be ``True`` or ``False`` (not a truthy string or number)."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":  # numpy.bool_
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_integer(
    name: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
) -> int | None:
    """``value`` must be an integer (not a bool) in ``[minimum, maximum]``, or ``None`` if
    ``allow_none``."""
    if value is None and allow_none:
        return None
    bounds = _bounds_text(minimum, maximum, inclusive=True)
    allowed = f"an integer{bounds}" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    inclusive: bool = True,
    allow_none: bool = False,
) -> float | None:
    """``value`` must be a finite real number (not a bool or a string) in the given range,
    bounds included unless ``inclusive=False``, or ``None`` if ``allow_none``."""
    if value is None and allow_none:
        return None
    bounds = _bounds_text(minimum, maximum, inclusive)
    allowed = f"a finite number{bounds}" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    value = float(value)
    outside = not math.isfinite(value)
    if minimum is not None:
        outside |= value < minimum if inclusive else value <= minimum
    if maximum is not None:
        outside |= value > maximum if inclusive else value >= maximum
    if outside:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_tolerance(name: str, value: Any) -> float:
    """A solver tolerance: a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive finite number, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` must be one of ``choices``."""
    if isinstance(value, bool) or value not in tuple(choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_callable(
    name: str, value: Any, signature: str, allow_none: bool = False
) -> Callable | None:
    """``value`` must be callable (as ``signature`` says), or ``None`` if ``allow_none``."""
    if value is None and allow_none:
        return None
    if not callable(value):
        raise TypeError(f"{name} must be callable as {signature}, got {value!r}")
    return value


def _bounds_text(minimum: float | None, maximum: float | None, inclusive: bool) -> str:
    low, high = (">=", "<=") if inclusive else (">", "<")
    if minimum is not None and maximum is not None:
        return f" {low} {minimum} and {high} {maximum}"
    if minimum is not None:
        return f" {low} {minimum}"
    if maximum is not None:
        return f" {high} {maximum}"
    return ""


def check_name_filter(name: str, value: Any, everything: str, entries: str) -> Any:
    """``value`` must be a name filter: ``None`` (``everything``), a valid regular expression,
    a predicate on names, or a non-empty sequence of ``entries`` (names or module prefixes).

    Args:
        name: The argument's name (``"params"``, ``"layers"``).
        value: What was passed.
        everything: What ``None`` selects, for the messages ("all trainable parameters").
        entries: What the sequence holds, for the messages ("parameter names").
    """
    if value is None or callable(value):
        return value
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            message = f"{name}={value!r} is not a valid regular expression: {error}"
            raise ValueError(message) from None
        return value
    if isinstance(value, Sequence) and all(isinstance(entry, str) for entry in value):
        if not value:
            raise ValueError(f"{name}=[] selects nothing; pass None for {everything}")
        return value
    raise TypeError(
        f"{name} must be None ({everything}), a regular expression, a predicate on names, or "
        f"a sequence of {entries} / module prefixes, got {value!r}"
    )

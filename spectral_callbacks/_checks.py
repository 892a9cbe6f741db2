"""Argument checks shared by every public constructor and function.

Each check raises at once, naming the argument, the value and what is allowed: a
``TypeError`` for a value of the wrong kind (``"0.5"`` for a number, ``True`` for an integer,
``"no"`` for a boolean), a ``ValueError`` for a value of the right kind outside its range.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_fit_range",
    "check_integer",
    "check_monitor_name",
    "check_name_filter",
    "check_number",
    "check_seed",
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
    return _check_in_range(name, value, "an integer", int, minimum, maximum, True, allow_none)


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
    return _check_in_range(
        name, value, "a finite number", float, minimum, maximum, inclusive, allow_none
    )


def _check_in_range(
    name: str,
    value: Any,
    noun: str,
    kind: type[int] | type[float],
    minimum: float | None,
    maximum: float | None,
    inclusive: bool,
    allow_none: bool,
) -> Any:
    """The one range check behind :func:`check_integer` (``kind=int``) and
    :func:`check_number` (``kind=float``, which also refuses NaN and infinities): ``value``
    of ``kind`` (never a bool), converted to it, within the bounds."""
    if value is None and allow_none:
        return None
    allowed = noun + _bounds_text(minimum, maximum, inclusive) + (" or None" if allow_none else "")
    _check_kind(name, value, numbers.Integral if kind is int else numbers.Real, allowed)
    value = kind(value)
    outside = kind is float and not math.isfinite(value)
    if minimum is not None:
        outside |= value < minimum if inclusive else value <= minimum
    if maximum is not None:
        outside |= value > maximum if inclusive else value >= maximum
    if outside:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def _check_kind(name: str, value: Any, kind: type, allowed: str) -> None:
    """A ``TypeError`` unless ``value`` is an instance of the numbers ABC ``kind``; a bool,
    though an ``Integral`` to Python, is never taken for a number."""
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {allowed}, got {value!r}")


#: The loosest relative tolerance a solver takes. A relative residual ``r ≤ tol·|θ|`` puts
#: some eigenvalue within ``tol·|θ|`` of ``θ``; beyond one half that no longer fixes a value
#: within a factor of 2 (at ``tol ≥ 1`` any vector passes).
MAX_TOLERANCE = 0.5


def check_tolerance(name: str, value: Any) -> float:
    """A solver tolerance: a number in ``(0, MAX_TOLERANCE]``."""
    allowed = f"a number > 0 and <= {MAX_TOLERANCE} (a relative residual)"
    _check_kind(name, value, numbers.Real, allowed)
    if not (0 < value <= MAX_TOLERANCE):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


#: Seeds are those ``torch.Generator.manual_seed`` takes: ``0 <= seed < 2**63``.
MAX_SEED = 2**63 - 1


def check_seed(name: str, value: Any) -> int:
    """A random seed: an integer (a NumPy one too) in ``[0, MAX_SEED]``."""
    return check_integer(name, value, minimum=0, maximum=MAX_SEED)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` must be one of ``choices``."""
    if isinstance(value, bool) or value not in tuple(choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_callable(
    name: str, value: Any, signature: str, allow_none: bool = False, arguments: int | None = None
) -> Callable | None:
    """``value`` must be callable (as ``signature`` says), or ``None`` if ``allow_none``; with
    ``arguments``, callable with that many positional arguments (where Python can tell)."""
    if value is None and allow_none:
        return None
    if not callable(value):
        raise TypeError(f"{name} must be callable as {signature}, got {value!r}")
    if arguments is not None:
        try:
            parameters = inspect.signature(value)
        except (TypeError, ValueError):  # a builtin or extension type: nothing to check
            return value
        try:
            parameters.bind(*([None] * arguments))
        except TypeError:
            raise TypeError(
                f"{name} must be callable as {signature} ({arguments} positional "
                f"argument{'s' if arguments > 1 else ''}), got {value!r} with signature "
                f"{parameters}"
            ) from None
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


def check_fit_range(name: str, value: Any) -> tuple[int, int]:
    """Two 1-based ranks ``(low, high)``, ``1 <= low < high`` (NumPy integers too)."""
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in value)
        and 1 <= value[0] < value[1]
    ):
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be two ranks (low, high) with 1 <= low < high, got {value!r}")


def check_monitor_name(argument: str, name: Any) -> str | None:
    """``name`` must be ``None`` or a monitor name: a non-empty string without ``/`` or
    surrounding spaces (it becomes a segment of every metric name)."""
    if name is not None and (
        not isinstance(name, str) or not name or "/" in name or name != name.strip()
    ):
        raise ValueError(
            f"{argument} must be None or a non-empty string without '/' or surrounding "
            f"spaces, got {name!r}"
        )
    return name

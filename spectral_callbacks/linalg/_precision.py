"""Solver arithmetic runs in the operator's dtype, whatever autocast region it is called from."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


@contextlib.contextmanager
def autocast_disabled(device: torch.device) -> Iterator[None]:
    """Turn autocast off for ``device``'s type (a caller's mixed-precision region would
    otherwise run the Gram-Schmidt products in bf16/fp16)."""
    if device.type in ("cpu", "cuda"):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def full_precision(solver: F) -> F:
    """Decorator: run ``solver(operator, ...)`` with autocast off on the operator's device."""

    @functools.wraps(solver)
    def wrapper(operator, *args, **kwargs):
        with autocast_disabled(operator.device):
            return solver(operator, *args, **kwargs)

    return wrapper  # type: ignore[return-value]

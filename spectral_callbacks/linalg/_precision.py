"""Solver arithmetic and products run in the operator's dtype at its full precision,
whatever autocast region or reduced-precision float32 setting they are called from."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


#: Where torch keeps float32 precision settings in its per-operation API, by device type:
#: the generic one, each backend's and each operation's (``(backend, operation)`` under
#: ``torch.backends``). torch 2.13 has them all; torch 2.5 none (legacy flags only).
_PRECISION_PATHS = {
    "cpu": [("mkldnn",), ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn")],
    "cuda": [("cuda", "matmul"), ("cudnn",), ("cudnn", "conv"), ("cudnn", "rnn")],
}

#: The settings torch's legacy flags (the float32 matmul precision, cuDNN's TF32 flag) set.
_LEGACY_COVERED = frozenset(
    [("cuda", "matmul"), ("cudnn",), ("cudnn", "conv"), ("cudnn", "rnn"), ("mkldnn", "matmul")]
)

#: The values of a per-operation setting that reduce float32 precision.
_REDUCED = ("tf32", "bf16")


def _precision_settings(device_types: set[str], legacy: bool) -> list[tuple[object, bool]]:
    """The generic setting and those of ``device_types``' backends that this torch has,
    parents first, each with whether it is an operation's (a leaf); with ``legacy``, only
    those the legacy flags do not set."""
    paths = [()] + [path for kind in sorted(device_types) for path in _PRECISION_PATHS[kind]]
    found = []
    for path in paths:
        if legacy and path in _LEGACY_COVERED:
            continue
        holder: object = torch.backends
        for name in path:
            holder = getattr(holder, name, None)
        if holder is not None and hasattr(holder, "fp32_precision"):
            found.append((holder, len(path) == 2))
    return found


def _legacy_flags(cuda: bool) -> tuple[str, bool] | None:
    """torch's legacy float32 matmul precision and cuDNN TF32 flag, or ``None`` where torch
    cannot read them (the user set a mix of legacy and per-operation settings)."""
    try:
        return torch.get_float32_matmul_precision(), cuda and bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return None


#: Open :func:`ieee_float32` scopes (the inner ones change nothing).
_ieee_depth = 0


@contextlib.contextmanager
def ieee_float32(device_types: set[str] | None = None) -> Iterator[None]:
    """float32 matrix products, convolutions and RNNs in IEEE single precision inside, on
    ``device_types`` (default both ``"cpu"`` and ``"cuda"``).

    TF32 (cuDNN convolutions by default on Ampere and later GPUs; matrix products after
    ``torch.set_float32_matmul_precision("high")``) and bfloat16 (oneDNN on the CPU after
    ``"medium"``) carry relative errors near ``1e-3``, which the error bounds, taken at
    float32's ``6e-8``, would not know of. Settings that are IEEE already are not touched;
    the others are put back on exit.
    """
    global _ieee_depth
    if _ieee_depth:  # an enclosing scope has set it and puts it back
        yield
        return
    kinds = {"cpu", "cuda"} if device_types is None else set(device_types) & {"cpu", "cuda"}
    _ieee_depth += 1
    try:
        with _ieee_settings(kinds):
            yield
    finally:
        _ieee_depth -= 1


@contextlib.contextmanager
def _ieee_settings(kinds: set[str]) -> Iterator[None]:
    """Where torch can read its legacy flags, change them through the legacy setters and put
    them back the same way: a per-operation setter would leave a mix that makes the legacy
    getters raise for the rest of the run, and library code reads them
    (``torch.backends.cudnn.flags()``, in Hugging Face's CTC loss). Per-operation settings
    without a legacy flag, or a state only they can describe, are set and put back as they
    are."""
    legacy = _legacy_flags("cuda" in kinds)
    settings = _precision_settings(kinds, legacy is not None)
    changed = [(h, leaf, h.fp32_precision) for h, leaf in settings if h.fp32_precision in _REDUCED]
    precision, cudnn_tf32 = legacy if legacy is not None else ("highest", False)
    try:
        if precision != "highest":
            torch.set_float32_matmul_precision("highest")
        if cudnn_tf32:
            torch.backends.cudnn.allow_tf32 = False
        for holder, leaf, _ in changed:
            holder.fp32_precision = "ieee" if leaf else "none"
        yield
    finally:
        for holder, _, value in reversed(changed):
            holder.fp32_precision = value
        # The reverse of the order they were set in.
        if cudnn_tf32:
            torch.backends.cudnn.allow_tf32 = True
        if precision != "highest":
            torch.set_float32_matmul_precision(precision)


@contextlib.contextmanager
def autocast_disabled(device: torch.device) -> Iterator[None]:
    """Turn autocast off for ``device``'s type (a caller's mixed-precision region would
    otherwise run the Gram-Schmidt products in bf16/fp16), and run float32 arithmetic in
    IEEE single precision (:func:`ieee_float32`)."""
    with ieee_float32({device.type}):
        if device.type in ("cpu", "cuda"):
            with torch.autocast(device_type=device.type, enabled=False):
                yield
        else:
            yield


def full_precision(solver: F) -> F:
    """Decorator: run ``solver(operator, ...)`` with autocast off on the operator's device and
    float32 in IEEE single precision (:func:`autocast_disabled`)."""

    @functools.wraps(solver)
    def wrapper(operator, *args, **kwargs):
        with autocast_disabled(operator.device):
            return solver(operator, *args, **kwargs)

    return wrapper  # type: ignore[return-value]

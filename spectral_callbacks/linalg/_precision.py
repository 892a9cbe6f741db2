"""Solver arithmetic and products run in the operator's dtype at its full precision,
whatever autocast region or reduced-precision float32 setting they are called from."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


#: ``torch.backends.{backend}.{operation}`` with a float32 precision setting (torch 2.13 has
#: all six; torch 2.5 none).
_FLOAT32_LEAVES = [
    ("cuda", "matmul"),
    ("cudnn", "conv"),
    ("cudnn", "rnn"),
    ("mkldnn", "matmul"),
    ("mkldnn", "conv"),
    ("mkldnn", "rnn"),
]


def _float32_backends() -> list:
    """The backends whose float32 arithmetic has its own precision setting (none in older
    torch releases, where the legacy flags say it)."""
    found = []
    for backend, operation in _FLOAT32_LEAVES:
        leaf = getattr(getattr(torch.backends, backend, None), operation, None)
        if leaf is not None and hasattr(leaf, "fp32_precision"):
            found.append(leaf)
    return found


#: Open :func:`ieee_float32` scopes (the inner ones change nothing).
_ieee_depth = 0


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 matrix products, convolutions and RNNs in IEEE single precision inside.

    TF32 (cuDNN convolutions by default on Ampere and later GPUs; matrix products after
    ``torch.set_float32_matmul_precision("high")``) and bfloat16 (oneDNN on the CPU after
    ``"medium"``) carry relative errors near ``1e-3``, which the error bounds, taken at
    float32's ``6e-8``, would not know of. The settings are put back on exit.
    """
    global _ieee_depth
    if _ieee_depth:  # an enclosing scope has set it and puts it back
        yield
        return
    _ieee_depth += 1
    try:
        with _ieee_settings():
            yield
    finally:
        _ieee_depth -= 1


@contextlib.contextmanager
def _ieee_settings() -> Iterator[None]:
    leaves = _float32_backends()
    if leaves:
        saved = [leaf.fp32_precision for leaf in leaves]
        try:
            for leaf in leaves:
                leaf.fp32_precision = "ieee"
            yield
        finally:
            for leaf, value in zip(leaves, saved, strict=True):
                leaf.fp32_precision = value
        return
    cuda_matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved_legacy = (torch.get_float32_matmul_precision(), cuda_matmul.allow_tf32, cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("highest")
        cuda_matmul.allow_tf32 = cudnn.allow_tf32 = False
        yield
    finally:
        # The precision last: setting allow_tf32 sets it too ("high" for True).
        cuda_matmul.allow_tf32, cudnn.allow_tf32 = saved_legacy[1:]
        torch.set_float32_matmul_precision(saved_legacy[0])


@contextlib.contextmanager
def autocast_disabled(device: torch.device) -> Iterator[None]:
    """Turn autocast off for ``device``'s type (a caller's mixed-precision region would
    otherwise run the Gram-Schmidt products in bf16/fp16), and run float32 arithmetic in
    IEEE single precision (:func:`ieee_float32`)."""
    with ieee_float32():
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

"""Batches and parameters: what a curvature operator is taken over."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._names import uncompiled_name

__all__ = [
    "ParameterFilter",
    "as_batch_list",
    "batch_size",
    "move_to_device",
    "select_parameters",
]

#: A parameter filter: ``None`` (all trainable parameters), a regular expression searched in
#: each parameter name, a predicate on the name, or a sequence of parameter names or module
#: prefixes (``"encoder"`` selects ``"encoder.weight"``, ``"encoder.0.bias"``, ...). A filter
#: selects a parameter if it selects its name with or without the ``_orig_mod`` segments of
#: ``torch.compile``'d submodules.
ParameterFilter = str | Callable[[str], bool] | Sequence[str] | None


def select_parameters(
    model: nn.Module, params: ParameterFilter = None
) -> list[tuple[str, nn.Parameter]]:
    """The trainable named parameters of ``model`` that ``params`` selects, in model order.

    Raises:
        ValueError: If the model has no trainable parameter, or the filter selects none (the
            message lists the trainable names, or the closest ones to an unknown name).
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (none has requires_grad=True)")
    names = [name for name, _ in trainable]
    if params is None:
        return trainable
    if isinstance(params, str):
        pattern = re.compile(params)
        selects = pattern.search
    elif callable(params):
        selects = params
    else:
        wanted = list(params)

        def selects(name: str) -> bool:
            return any(_is_name_or_prefix(entry, name) for entry in wanted)

        for entry in wanted:
            if not any(
                _is_name_or_prefix(entry, n) or _is_name_or_prefix(entry, uncompiled_name(n))
                for n in names
            ):
                close = difflib.get_close_matches(entry, names, n=5, cutoff=0.4)
                hint = f"; close matches: {close}" if close else f"; trainable parameters: {names}"
                raise ValueError(f"params entry {entry!r} names no trainable parameter{hint}")
    chosen = [(n, p) for n, p in trainable if selects(n) or selects(uncompiled_name(n))]
    if not chosen:
        raise ValueError(
            f"params={params!r} selects no trainable parameter; trainable parameters: {names}"
        )
    return chosen


def _is_name_or_prefix(entry: str, name: str) -> bool:
    """Whether ``entry`` is the parameter ``name`` or a module prefix of it."""
    return name == entry or name.startswith(entry + ".")


def as_batch_list(data: Any) -> list[Any]:
    """Interpret ``data`` as one batch or as an iterable of batches, and materialise it.

    Batches: a ``DataLoader``, an iterator or generator, or a list/tuple whose elements are
    all containers (tuples, lists or dicts), such as ``[(x1, y1), (x2, y2)]``. Anything else
    (a tensor, ``(x, y)``, ``[x, y]``, a dict) is one batch. Batches are kept in a list, so
    every Hessian-vector product sees the same data.
    """
    if isinstance(data, torch.utils.data.DataLoader) or (
        isinstance(data, (list, tuple))
        and data
        and all(isinstance(b, (list, tuple, Mapping)) for b in data)
    ):
        batches = list(data)
    elif isinstance(data, (torch.Tensor, list, tuple, Mapping)):
        batches = [data]
    elif isinstance(data, Iterable):
        batches = list(data)
    else:
        batches = [data]
    if not batches:
        raise ValueError("data holds no batch")
    return batches


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading dimension of its first tensor."""
    tensor = _first_tensor(batch)
    if tensor is None:
        raise ValueError(
            f"cannot infer the size of a batch of type {type(batch).__name__}: it holds no "
            "tensor; pass batch_size_fn=... to say how many samples a batch has"
        )
    return int(tensor.shape[0]) if tensor.ndim > 0 else 1


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) tuple / list / dict to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return type(obj)({k: move_to_device(v, device) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(move_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj

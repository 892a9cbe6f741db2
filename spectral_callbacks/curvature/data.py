"""Batches and parameters: what a curvature operator is taken over."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .._names import is_name_or_prefix, uncompiled_name
from ..settings import REDUCTIONS, ParameterFilter, Reduction, check_parameter_filter

__all__ = [
    "REDUCTIONS",
    "Batches",
    "ParameterFilter",
    "Reduction",
    "as_batch_list",
    "batch_size",
    "check_parameter_filter",
    "fresh_batch",
    "map_tensors",
    "module_groups",
    "module_of",
    "move_to_device",
    "padding_coordinates",
    "select_parameters",
]


def module_groups(names: list[str], numels: list[int]) -> dict[str, int]:
    """Parameters grouped by the module that owns them, in model order: module name ->
    number of entries (``"encoder.0.weight"`` and ``"encoder.0.bias"`` make ``"encoder.0"``).

    A module's own parameters come together in ``named_parameters()``, so each group is one
    consecutive range of the flattened parameters.
    """
    groups: dict[str, int] = {}
    for name, numel in zip(names, numels, strict=True):
        module = module_of(name)
        groups[module] = groups.get(module, 0) + numel
    return groups


def module_of(name: str) -> str:
    """The module that owns parameter ``name`` (``"encoder.0.weight"`` -> ``"encoder.0"``)."""
    return name.rsplit(".", 1)[0] if "." in name else name


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
            return any(is_name_or_prefix(entry, name) for entry in wanted)

        for entry in wanted:
            if not any(
                is_name_or_prefix(entry, n) or is_name_or_prefix(entry, uncompiled_name(n))
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


class Batches(list):
    """An explicit list of batches: ``data=Batches([b1, b2, ...])`` is never read as one batch.

    Without it, ``data`` is read by the rule of :func:`as_batch_list`, which cannot tell a list
    of tensor batches ``[x1, x2]`` from one batch ``[x, y]`` (it takes the latter). Wrap the
    batches to say which is meant; the callbacks pass their probe data this way.
    """

    def __repr__(self) -> str:
        return f"Batches({list.__repr__(self)})"


def padding_coordinates(model: nn.Module, params: list[nn.Parameter]) -> torch.Tensor:
    """Flat indices, in the vector of ``params``, of the padding rows of the model's
    ``nn.Embedding`` / ``nn.EmbeddingBag`` weights (``padding_idx``); empty if none.

    Reverse-mode autograd gives those rows no gradient, so training never moves them by the
    embedding, but forward-mode autograd (``torch.func.jvp``) and moved parameters (gradient
    differences) see them move the output. Products through them would differ between the
    paths and make the matrix non-symmetric; the operators hold them fixed instead.
    """
    offsets, offset = {}, 0
    for param in params:
        offsets[id(param)] = offset
        offset += param.numel()
    found = []
    for module in model.modules():
        if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or module.padding_idx is None:
            continue
        start = offsets.get(id(module.weight))
        if start is None:
            continue
        width = module.weight.shape[1]
        row = module.padding_idx % module.weight.shape[0]
        found.append(torch.arange(start + row * width, start + (row + 1) * width))
    return torch.cat(found).unique() if found else torch.empty(0, dtype=torch.long)


def as_batch_list(data: Any) -> list[Any]:
    """Interpret ``data`` as one batch or as an iterable of batches, and materialise it.

    Batches: a :class:`Batches` list (always), a ``DataLoader``, an iterator or generator, or
    a list/tuple whose elements are all containers (tuples, lists or dicts), such as
    ``[(x1, y1), (x2, y2)]``. Anything else (a tensor, ``(x, y)``, ``[x, y]``, a dict, an
    object of the user's own batch type) is one batch. Batches are kept in a list, so every
    Hessian-vector product sees the same data.

    Raises:
        ValueError: If ``data`` holds no batch (``[]``, an empty loader, ``None``) or is a
            map-style ``Dataset`` (samples, not batches).
    """
    if data is None:  # a forgotten loader, not a batch of the user's own type
        raise ValueError("data holds no batch, got None: pass a batch or an iterable of batches")
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(
        data, torch.utils.data.IterableDataset
    ):
        # A map-style dataset holds samples, not batches (an IterableDataset may yield either).
        raise ValueError(
            f"data is a dataset ({type(data).__name__}) of samples, not batches: pass "
            f"torch.utils.data.DataLoader(dataset, batch_size=...) or one batch"
        )
    if isinstance(data, (Batches, torch.utils.data.DataLoader)):
        batches = list(data)
    elif isinstance(data, (list, tuple)) and not _is_namedtuple(data):
        if data and all(isinstance(b, (list, tuple, Mapping)) for b in data):
            batches = list(data)
        else:
            batches = [data] if data else []
    elif isinstance(data, (torch.Tensor, Mapping)) or _is_namedtuple(data):
        batches = [data]
    elif isinstance(data, Iterable) and not dataclasses.is_dataclass(data):
        batches = list(data)
    else:
        batches = [data]
    if not batches:
        raise ValueError(f"data holds no batch, got {data!r}")
    return batches


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = [getattr(obj, field.name) for field in dataclasses.fields(obj)]
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
            "tensor in a tuple, list, dict or dataclass; pass batch_size_fn=... (functional "
            "API), or declare reduction='sum', which weights batches without their sizes"
        )
    return int(tensor.shape[0]) if tensor.ndim > 0 else 1


def fresh_batch(batch: Any) -> Any:
    """``batch`` with every tensor cloned and its containers rebuilt, for one call of the
    user's code: a step that edits its batch in place (masking tokens, ``x /= 255``,
    ``batch["labels"] = ...``) edits this copy, not the batch every later product and
    measurement reads."""
    return map_tensors(batch, torch.Tensor.clone)


def map_tensors(
    obj: Any,
    function: Callable[[torch.Tensor], torch.Tensor],
    other: Callable[[Any], Any] | None = None,
) -> Any:
    """``obj`` with ``function`` applied to every tensor in it, containers rebuilt.

    Containers: tuples (named ones too), lists, dicts and dataclass instances, nested; any
    other object becomes ``other(obj)`` (default: the same object).
    """
    if isinstance(obj, torch.Tensor):
        return function(obj)
    if isinstance(obj, Mapping):
        return type(obj)({k: map_tensors(v, function, other) for k, v in obj.items()})
    if _is_namedtuple(obj):
        return type(obj)(*(map_tensors(v, function, other) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, function, other) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {
            field.name: map_tensors(getattr(obj, field.name), function, other)
            for field in dataclasses.fields(obj)
            if field.init
        }
        return dataclasses.replace(obj, **changes)
    return obj if other is None else other(obj)


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) tuple / list / dict / dataclass to ``device``."""
    return map_tensors(obj, lambda tensor: tensor.to(device))

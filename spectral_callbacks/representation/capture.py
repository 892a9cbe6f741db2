"""Capture the outputs of named submodules with forward hooks, streamed into accumulators."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .._names import uncompiled_name
from .spectra import CovarianceAccumulator, Pool, as_embedding_matrix

__all__ = ["capture_features", "resolve_layers"]

Select = Callable[[Any], torch.Tensor]


def resolve_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """Map layer names to submodules; an unknown name is a ``ValueError`` with close matches.

    Names inside ``torch.compile``'d submodules may be given without their ``_orig_mod``
    segment (``"net.1"`` for ``net._orig_mod.1``); a module's own name takes precedence.
    """
    named = list(model.named_modules())
    modules = {uncompiled_name(name): module for name, module in named} | dict(named)
    found = {}
    for name in layers:
        if name not in modules:
            candidates = [n for n in modules if n]
            close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.4)
            hint = f"close matches: {close}" if close else f"layers: {candidates[:20]}"
            raise ValueError(f"layers entry {name!r} is not a submodule of the model; {hint}")
        found[name] = modules[name]
    return found


def _as_tensor(name: str, output: Any, select: Select | None) -> torch.Tensor:
    if select is not None:
        output = select(output)
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"layer {name!r} returned {type(output).__name__}, not a tensor; pass "
            "select=lambda output: ... to pick the embedding tensor"
        )
    return output


@contextlib.contextmanager
def capture_features(
    model: nn.Module,
    layers: Sequence[str],
    select: Select | dict[str, Select] | None = None,
    pool: Pool = "flatten",
) -> Iterator[dict[str, CovarianceAccumulator]]:
    """Stream each named layer's outputs into a :class:`CovarianceAccumulator` while active.

    Hooks are removed on exit, also after an error. ``select`` picks the tensor from a tuple or
    dict output (one callable for all layers, or a dict by layer name); ``pool`` turns
    ``(B, T, …, D)`` outputs into rows (see :func:`as_embedding_matrix`).
    """
    modules = resolve_layers(model, layers)
    accumulators = {name: CovarianceAccumulator() for name in modules}
    handles = []

    def hook_for(name: str):
        chooser = select.get(name) if isinstance(select, dict) else select

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            accumulators[name].update(as_embedding_matrix(_as_tensor(name, output, chooser), pool))

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(hook_for(name)))
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()

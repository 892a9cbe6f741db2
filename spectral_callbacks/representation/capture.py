"""Capture the outputs of named submodules with forward hooks, streamed into accumulators."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import nn

from .._names import uncompiled_name
from .spectra import CovarianceAccumulator, Layout, Pool, as_embedding_matrix

__all__ = ["LAYER_LAYOUTS", "LayerLayout", "capture_features", "infer_layout", "resolve_layers"]

#: ``layout`` choices of :func:`capture_features`: inferred per layer, or given.
LayerLayout = Literal["auto", Layout]
LAYER_LAYOUTS: tuple[str, ...] = get_args(LayerLayout)


def _conv_dims(module: nn.Module) -> set[int]:
    """Spatial dimensionalities of the convolutions in ``module`` (itself included)."""
    return {len(m.kernel_size) for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)}


def infer_layout(module: nn.Module, ndim: int) -> tuple[str, bool]:
    """Where the features of an ``ndim``-D output of ``module`` are, and whether that is sure.

    PyTorch's convolutions put channels second, ``(N, C, L)`` / ``(N, C, H, W)`` /
    ``(N, C, D, H, W)``; token models put features last, ``(B, T, D)``. So: a 3-D output is
    channels-first if the module is or holds a 1-d convolution, else tokens (sure either
    way: a transformer holds no 1-d convolution); a 4-D or 5-D output is channels-first, sure
    when the module is or holds a convolution of that many spatial dimensions (a 4-D output of
    a module without one, e.g. a Swin stage's ``(B, H, W, C)``, is the ambiguous case).
    """
    if ndim <= 2:
        return "channels_last", True
    dims = _conv_dims(module)
    if ndim == 3:
        return ("channels_first" if 1 in dims else "channels_last"), True
    return "channels_first", (ndim - 2) in dims


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
        selected = select(output)
        if not isinstance(selected, torch.Tensor):
            raise TypeError(
                f"select= returned {_describe(selected)} for layer {name!r}, not a tensor; the "
                f"layer returned {_describe(output)}"
            )
        return selected
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"layer {name!r} returned {_describe(output)}, not a tensor; pass "
            f"select=lambda output: {_suggested_pick(output)} to pick the embedding tensor"
        )
    return output


def _parts(output: Any) -> list[tuple[str, Any]]:
    """The parts of a tuple or dict output with the index that picks each (``"0"``,
    ``"'logits'"``); none for anything else."""
    if isinstance(output, Mapping):
        return [(repr(key), value) for key, value in output.items()]
    if isinstance(output, (tuple, list)):
        return [(str(index), value) for index, value in enumerate(output)]
    return []


def _describe(output: Any) -> str:
    """A layer's output as the error shows it: a tuple or dict with its parts' shapes."""

    def part(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"Tensor{list(value.shape)}"
        return type(value).__name__

    kind = type(output).__name__
    if isinstance(output, Mapping):
        return f"{kind} {{" + ", ".join(f"{i}: {part(v)}" for i, v in _parts(output)) + "}"
    if isinstance(output, (tuple, list)):
        return f"{kind} (" + ", ".join(part(v) for _, v in _parts(output)) + ")"
    return kind


def _suggested_pick(output: Any) -> str:
    """The expression that picks the first tensor of at least two dimensions (rows of
    features, not a scalar such as a loss) of a tuple or dict output, ``...`` if none:
    Hugging Face blocks put the hidden states first, model outputs the loss before them."""
    for index, value in _parts(output):
        if isinstance(value, torch.Tensor) and value.ndim >= 2:
            return f"output[{index}]"
    return "..."


@contextlib.contextmanager
def capture_features(
    model: nn.Module,
    layers: Sequence[str],
    select: Select | dict[str, Select] | None = None,
    pool: Pool = "flatten",
    layout: LayerLayout = "auto",
    on_ambiguous: Callable[[str], None] | None = None,
    batch_size: Callable[[], int | None] | None = None,
    mask: Callable[[], torch.Tensor | None] | None = None,
) -> Iterator[dict[str, CovarianceAccumulator]]:
    """Stream each named layer's outputs into a :class:`CovarianceAccumulator` while active.

    Hooks are removed on exit, also after an error. ``select`` picks the tensor from a tuple or
    dict output (one callable for all layers, or a dict by layer name); ``layout`` says where
    the feature axis is (``"auto"``: :func:`infer_layout` per layer; or ``"channels_last"`` /
    ``"channels_first"`` for all) and ``pool`` turns the positions into rows (see
    :func:`as_embedding_matrix`). ``on_ambiguous(message)`` hears of each layer whose layout
    ``"auto"`` had to guess, and, when ``batch_size()`` tells the number of samples of the
    batch being run, of each selected output whose first dimension is not that number (a
    ``select`` that picks a sample instead of the batch: Hugging Face blocks that return a
    plain tensor in transformers 5.x, where ``output[0]`` is the first sequence), and of each
    layer that runs more than once in one forward of ``model`` (a shared block applied
    repeatedly: the outputs of every call are pooled into its accumulator).

    ``mask()``, where given, tells which positions of the batch being run count (such as
    ``(B, T)`` booleans false at padding tokens): applied to each output whose positions
    have that shape (:func:`as_embedding_matrix`); an output of one row per sample
    ``(B, D)`` keeps its rows; any other shape raises, naming the layer.
    """
    if layout not in LAYER_LAYOUTS:
        raise ValueError(f"layout must be one of {LAYER_LAYOUTS}, got {layout!r}")
    modules = resolve_layers(model, layers)
    accumulators = {name: CovarianceAccumulator() for name in modules}
    handles = []
    # Calls of each layer since ``model``'s forward began (None until it has begun once:
    # without it, as when a forward function runs submodules alone, nothing is counted).
    calls: dict[str, int] | None = None

    def forward_begins(module: nn.Module, inputs: Any) -> None:
        nonlocal calls
        calls = dict.fromkeys(modules, 0)

    def hook_for(name: str):
        chooser = select.get(name) if isinstance(select, dict) else select

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            features = _as_tensor(name, output, chooser)
            if calls is not None:
                calls[name] += 1
                if calls[name] == 2 and on_ambiguous is not None:
                    on_ambiguous(
                        f"layer {name!r} runs more than once in one forward (a module "
                        "applied repeatedly, such as a shared block): the outputs of every "
                        "call are pooled into its covariance; to watch one application, "
                        "name a module that runs once"
                    )
            expected = batch_size() if batch_size is not None else None
            mismatch = expected is not None and features.ndim > 1 and features.shape[0] != expected
            if mismatch and on_ambiguous is not None:
                on_ambiguous(
                    f"layer {name!r}: the selected output has shape "
                    f"{tuple(features.shape)}, whose first dimension is not the batch of "
                    f"{expected} samples; check select= (a block of transformers 5.x "
                    "returns a plain tensor: select=lambda out: out[0] then keeps the "
                    "first sequence only; drop select=)"
                )
            chosen = layout
            if layout == "auto":
                chosen, sure = infer_layout(module, features.ndim)
                if not sure and on_ambiguous is not None:
                    on_ambiguous(
                        f"layer {name!r} returns {features.ndim}-D outputs of shape "
                        f"{tuple(features.shape)} and holds no {features.ndim - 2}-d "
                        "convolution: taking axis 1 as the features (N, C, ...); pass "
                        "layout='channels_last' if the features are the last axis"
                    )
            positions = mask() if mask is not None else None
            if positions is not None and features.ndim == 2 and positions.ndim > 1:
                positions = None  # one row per sample: nothing of the sequence is left
            try:
                rows = as_embedding_matrix(features, pool, chosen, positions)
            except ValueError as error:
                raise ValueError(f"layer {name!r}: {error}") from error
            accumulators[name].update(rows)

        return hook

    try:
        handles.append(model.register_forward_pre_hook(forward_begins))
        for name, module in modules.items():
            handles.append(module.register_forward_hook(hook_for(name)))
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()

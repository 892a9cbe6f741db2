"""Running a model's forward pass for a measurement without disturbing the training run.

A measurement must leave the model exactly as found: parameters, buffers, ``.grad``,
``requires_grad`` flags, train/eval modes and every RNG stream (torch's, NumPy's global one
and Python's ``random``). ``.grad`` is safe by construction (only ``torch.autograd.grad`` /
``torch.func`` are used, never ``.backward()``), and so are parameters, except those a
forward pass writes itself (:func:`parameters_written_by_forward`); this module handles the
rest.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..linalg._precision import ieee_float32

__all__ = [
    "ModelStateSnapshot",
    "compiled_code_allowed",
    "compiled_code_runs_eagerly",
    "measurement_context",
    "measurement_scope",
    "model_devices",
    "parameters_written_by_forward",
    "preserved_random_streams",
]


def model_devices(model: nn.Module) -> list[torch.device]:
    """The distinct devices of a model's parameters and buffers."""
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    return sorted(devices, key=str)


@contextlib.contextmanager
def _frozen_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """Stop BatchNorm layers from updating running statistics, keeping their current mode.

    With ``track_running_stats=False`` a BatchNorm in train mode normalises by batch
    statistics exactly as before but neither reads nor writes its running buffers; in eval
    mode it still uses them. This is what keeps buffers still under ``torch.func.vmap`` too,
    where an in-place update of a buffer would fail.
    """
    modules = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for module in modules:
        module.track_running_stats = False
    try:
        yield
    finally:
        for module in modules:
            module.track_running_stats = True


#: How many :func:`preserved_random_streams` scopes are open: inside one, the measurement
#: contexts seed NumPy's and Python's streams without saving them each time (the scope puts
#: them back once; saving NumPy's state costs tens of microseconds, a gradient-difference
#: product enters a context per gradient and batch).
_open_scopes = 0


@contextlib.contextmanager
def preserved_random_streams(cuda: list[torch.device] | None = None) -> Iterator[None]:
    """Whatever is drawn inside, torch's CPU generator and those of the ``cuda`` devices,
    NumPy's global RNG and Python's ``random`` are as before on exit. Curvature operators
    used as context managers and the monitors' measurements hold one."""
    global _open_scopes
    numpy_state, python_state = np.random.get_state(), random.getstate()
    _open_scopes += 1
    try:
        with torch.random.fork_rng(devices=list(cuda or [])):
            yield
    finally:
        _open_scopes -= 1
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextlib.contextmanager
def measurement_scope(model: nn.Module) -> Iterator[None]:
    """Around all of one measurement of ``model``: its random streams
    (:func:`preserved_random_streams`) and float32 precision
    (:func:`~spectral_callbacks.linalg._precision.ieee_float32`) are set aside once and put
    back on exit, so that the many forward passes and products inside only seed and check
    them."""
    devices = model_devices(model)
    cuda = [d for d in devices if d.type == "cuda"]
    with preserved_random_streams(cuda), ieee_float32({d.type for d in devices}):
        yield


@contextlib.contextmanager
def _isolated_rng(devices: list[torch.device], seed: int) -> Iterator[None]:
    """Preserve the random streams and seed them all with ``seed`` (NumPy's with
    ``seed mod 2³²``): torch's are forked here; NumPy's and Python's are saved here unless
    an enclosing :func:`preserved_random_streams` puts them back.

    Seeding makes every forward pass of one measurement draw the same dropout masks (and the
    same masks of models that draw from NumPy or ``random``, such as Hugging Face's
    wav2vec2 SpecAugment), so the loss is one fixed function and its Hessian a fixed matrix;
    the training run's streams stay where they were. Generators a model holds itself
    (``np.random.default_rng()``, a ``torch.Generator`` of its own) are beyond reach.
    """
    cuda = [d for d in devices if d.type == "cuda"]
    host = contextlib.nullcontext() if _open_scopes else preserved_random_streams()
    with host, torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for device in cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        yield


def compiled_code_runs_eagerly() -> contextlib.AbstractContextManager:
    """Run every ``torch.compile``d module and function eagerly (``torch.compiler.set_stance``).

    A measurement's forward passes go through the user's model, which may hold compiled
    modules. Two things go wrong if they run compiled: compiled graphs have no double backward
    ("torch.compile with aot_autograd does not currently support double backward"), and each
    probe forward differs from a training forward (grad mode, batch shape, capture hooks), so
    dynamo compiles the user's function again. Every such recompilation counts towards
    dynamo's limit per function (8); past it, the user's model runs eagerly for the rest of
    training. The stance exists from PyTorch 2.6; on older versions this is a no-op.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def compiled_code_allowed() -> contextlib.AbstractContextManager:
    """Undo :func:`compiled_code_runs_eagerly` for our own compiled Hessian-vector product.

    Inside that product dynamo traces through the user's compiled modules as plain code, so
    their own compiled graphs and recompilation budgets are not touched.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("default") if set_stance is not None else contextlib.nullcontext()


@contextlib.contextmanager
def measurement_context(
    model: nn.Module, seed: int, second_order: bool = True, math_attention: bool | None = None
) -> Iterator[None]:
    """Context for the forward passes of a measurement.

    * ``second_order=True`` (curvature): gradients enabled and, unless
      ``math_attention=False`` (products from first-order gradients alone), the math
      scaled-dot-product attention kernel (flash, memory-efficient and cuDNN kernels have
      no double backward and no forward-mode AD); ``second_order=False``
      (representations): ``no_grad``;
    * inference mode and autocast off, float32 in IEEE single precision (measured in the
      parameters' own precision, even inside a mixed-precision training step or under
      TF32 / bfloat16 float32 settings: :func:`~spectral_callbacks.linalg._precision.ieee_float32`);
    * BatchNorm running statistics frozen; RNG streams forked and seeded;
    * compiled modules run eagerly (:func:`compiled_code_runs_eagerly`).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    devices = model_devices(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(ieee_float32({d.type for d in devices}))
        stack.enter_context(torch.enable_grad() if second_order else torch.no_grad())
        for device_type in {d.type for d in devices}:
            if device_type in ("cpu", "cuda"):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        if second_order if math_attention is None else math_attention:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(_frozen_batchnorm_statistics(model))
        stack.enter_context(_isolated_rng(devices, seed))
        stack.enter_context(compiled_code_runs_eagerly())
        yield


def parameters_written_by_forward(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a forward pass of ``model`` writes in place: the weights of
    ``nn.Embedding`` and ``nn.EmbeddingBag`` with ``max_norm``, whose looked-up rows
    ``F.embedding`` rescales to norm ``max_norm`` in place."""
    return [
        module.weight
        for module in model.modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag))
        and module.max_norm is not None
        and isinstance(module.weight, nn.Parameter)
    ]


class ModelStateSnapshot:
    """Copies of what a measurement's forward passes may write in a model, to put back.

    Every buffer (BatchNorm statistics, a custom module's state) and the parameters the
    forward pass itself rewrites (:func:`parameters_written_by_forward`): a probe batch's
    forward would otherwise renormalise embedding rows the training batches have not reached
    yet, and the monitored run would train differently from an unmonitored one.
    """

    def __init__(self, model: nn.Module) -> None:
        tensors = [*model.buffers(), *parameters_written_by_forward(model)]
        self._saved = [(t, t.detach().clone()) for t in tensors]

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, saved in self._saved:
                if tensor.shape == saved.shape:
                    tensor.copy_(saved)

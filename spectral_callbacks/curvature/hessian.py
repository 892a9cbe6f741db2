"""The Hessian of a model's loss as a matrix-free symmetric operator.

For batches ``B_1 … B_K`` of sizes ``n_1 … n_K`` (``N = Σ n_b``) the dataset loss depends on
how ``loss_fn`` reduces over a batch's samples (``reduction``):

``"mean"`` (default; ``loss_fn`` returns the mean loss of a batch)
    ``L(θ) = Σ_b (n_b / N) L_b(θ)``, the mean over all ``N`` samples, and
    ``H = Σ_b (n_b / N) ∇²L_b(θ)``: batches are weighted by size.
``"sum"`` (``loss_fn`` returns the sum over a batch's samples, ``reduction="sum"``)
    ``L(θ) = Σ_b L_b(θ)``, the sum over all samples, and ``H = Σ_b ∇²L_b(θ)``: every batch
    has weight 1 and batch sizes are never needed.

Weighting a summed loss by size would give neither Hessian (it is off by a factor that varies
between batches), so the reduction must be declared. Products ``H V`` with blocks of vectors
are exact (autograd), by one of these paths:

``"reuse_graph"``
    Build ``g_b = ∇L_b`` once per batch with ``create_graph=True`` and keep that first-order
    graph; each product is a backward pass through it, ``∂(g_b · v)/∂θ``. A block of vectors
    goes through one vmapped backward (``is_grads_batched``) on accelerators, and one
    backward per vector on the CPU, where that is cheaper per vector.
``"forward_over_reverse"``
    ``torch.func.jvp`` of ``torch.func.grad`` of the loss, vmapped over a block of vectors;
    nothing is kept between products, each block re-runs forward and backward.

``"compiled"``
    The same vmapped forward-over-reverse function under ``torch.compile``. Compiling
    takes seconds to minutes (once per model, loss, parameter selection, block width and
    batch shape; a bounded cache, :data:`COMPILED_CACHE_SIZE` entries, serves every later
    operator), after which a product costs a fraction of the eager one. If compilation fails
    the operator warns once and uses the eager forward-over-reverse path. The first product of each
    block width and batch shape is checked against the eager one; compiled dropout draws
    other masks than eager dropout, so a model with active dropout fails that check and
    stays eager (measure it in eval mode to use compiled products).

``"gradient_difference"``
    Products from first-order gradients alone, for models whose loss has no double
    backward (a custom ``autograd.Function`` without one, fused kernels, reentrant
    activation checkpointing, engines that shard parameters): the central difference

        ``H v ≈ (∇L(θ + h v) − ∇L(θ − h v)) / (2h)``.

    Its error is truncation ``(h²/6) ‖∇³L[v, v, ·]‖`` against rounding ``≈ ε ‖∇L‖ / h``
    (``ε`` the parameters' machine epsilon), smallest at ``h ∝ ε^{1/3}``. The step starts
    scaled to the parameters, ``h‖v‖ = s₀ = ε^{1/3} (1 + ‖θ‖)`` (Nocedal & Wright, section
    8.1); the first product measures the truncation coefficient from ``D(s₀)`` against
    ``D(s₀/2)`` and the gradient's norm, and sets the step that minimises their sum
    (``HessianOperator._calibrate``). The relative error of a product is then of order
    ``ε^{2/3}``: 2e-5 to 1.3e-4 in float32 on the test models and benchmark workloads, 3e-2
    in bfloat16 (where exact products carry 5e-3). ``richardson=True`` combines the steps
    ``h`` and ``h/2``, ``(4 D(h/2) − D(h)) / 3``, which cancels the ``h²`` term (error of
    order ``ε^{4/5}`` at a step grown to ``ε^{1/5}``), at four gradients per product. The
    operator states the error it measured (:attr:`HessianOperator.product_relative_error`)
    and the eigensolvers confirm residuals near it with fresh products, so no solve claims
    a tolerance the differences cannot resolve. A loss that is not smooth at the step's
    scale (the kinks of ReLU-like activations) makes differences unreliable, whatever the
    step: the measured error then exceeds 1e-2 (and ten times ``ε^{2/3}``) and the operator
    warns. Both gradients of a
    pair run under the same seeded RNG (equal dropout masks) with BatchNorm statistics
    frozen; the parameters are moved in place (so activation checkpointing sees the moved
    values) and copied back from a saved copy after every product, bit for bit; attention
    keeps its default kernels. Parameters sharded by ``fully_shard`` (FSDP2 ``DTensor`` parameters)
    take this path only, with ``distributed=True``: each perturbation is sharded like its
    parameter and the gradients come from FSDP's own ``backward()``
    (:meth:`HessianOperator._sharded_weighted_gradient`).

``"auto"`` takes ``reuse_graph`` for single vectors (a vmapped block of one is several times
slower) and on the CPU, and ``forward_over_reverse`` for blocks on CUDA, where the block
amortises it below the reused graph's cost per vector (docs/benchmarks.md). Where the
loss has no double backward (and the cause is not attention, which runs on the math kernel)
``auto`` switches to ``gradient_difference`` and warns once.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import math
import re
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .._checks import check_bool, check_callable
from .._names import uncompiled_name
from ..linalg._precision import autocast_disabled
from ..settings import HVP_PATHS, HvpPath, OperatorSettings, ParameterFilter, Reduction
from .data import as_batch_list, batch_size, move_to_device, select_parameters
from .isolation import BufferSnapshot, compiled_code_allowed, measurement_context

__all__ = [
    "COMPILED_CACHE_SIZE",
    "HVP_PATHS",
    "HessianOperator",
    "HvpPath",
    "LossFunction",
    "NonFiniteLossError",
    "clear_compiled_products",
    "flat_size",
]

logger = logging.getLogger("spectral_callbacks")

#: ``loss_fn(model, batch) -> scalar tensor`` (the mean loss of the batch).
LossFunction = Callable[[nn.Module, Any], torch.Tensor]


#: Compiled block products keyed by ``(id(model), loss_fn, parameter names, backend)``, the
#: most recently used last. A measurement builds a new operator, so the cache lives here to
#: compile once per run. An entry closes over its model and keeps it alive (which also keeps
#: its ``id`` unique), so the cache holds at most :data:`COMPILED_CACHE_SIZE` entries and
#: :func:`clear_compiled_products` empties it. A failed entry stays, marked, so later
#: operators go straight to the eager path.
_COMPILED: collections.OrderedDict[tuple, _CompiledProduct] = collections.OrderedDict()
COMPILED_CACHE_SIZE = 8

#: model -> the (loss function, parameter names, reduction) whose double-backward products
#: passed :meth:`HessianOperator._check_symmetry`.
_SYMMETRY_CHECKED: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()
#: model -> the (loss function, parameter names) for which ``auto``'s switch to gradient
#: differences was announced.
_SWITCH_WARNED: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()


def clear_compiled_products() -> None:
    """Forget every compiled Hessian-vector product (and release the models they hold)."""
    _COMPILED.clear()


class NonFiniteLossError(FloatingPointError):
    """The loss was NaN or infinite on a batch, so the Hessian is undefined there."""


class _LossOfModel(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFunction) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class _NoSecondDerivative(Exception):
    """The loss has no double backward; ``explained`` says which op and what to do."""

    def __init__(self, explained: RuntimeError, original: BaseException | None) -> None:
        super().__init__(str(explained))
        self.explained = explained
        self.original = original


def _raise_second_order(error: RuntimeError) -> None:
    """Re-raise ``error``, as :class:`_NoSecondDerivative` when an op lacks a second
    derivative (so ``hvp="auto"`` can switch to gradient differences)."""
    explained = _explain_second_order_failure(error)
    if explained is not None:
        raise _NoSecondDerivative(explained, error) from error
    raise error


def _explain_second_order_failure(error: RuntimeError) -> RuntimeError | None:
    """A clearer error for an op without a second derivative (or forward-mode AD)."""
    text = str(error)
    if "once_differentiable" in text:
        return RuntimeError(
            "the loss runs through a custom autograd.Function whose backward is marked "
            "@once_differentiable, so it has no double backward: use "
            f"hvp='gradient_difference' (products from gradients alone). (original error: {text})"
        )
    if "does not currently support double backward" in text:
        return RuntimeError(
            "the loss runs through a torch.compile'd module or function, and compiled graphs "
            "have no double backward. Measurements run compiled code eagerly with "
            "torch.compiler.set_stance('force_eager'), which needs PyTorch >= 2.6; on older "
            "versions pass the uncompiled model (compiled modules keep it as `_orig_mod`) or "
            f"use hvp='forward_over_reverse'. (original error: {text})"
        )
    match = re.search(r"derivative for (\S+) is not implemented", text)
    if match is None:
        return None
    op = match.group(1)
    hint = (
        "Hessian-vector products need the double backward (or forward-mode AD) of every op in "
        "the loss."
    )
    if "rnn" in op.lower() or "cudnn" in op.lower() or "lstm" in op.lower():
        hint += (
            " cuDNN's fused RNN kernels have none: measure with cuDNN disabled, e.g. "
            "`with torch.backends.cudnn.flags(enabled=False): ...`, or use an RNN written with "
            "nn.LSTMCell / nn.GRUCell."
        )
    elif "attention" in op.lower():
        hint += (
            " Attention is already forced to the math kernel; this op is called another way "
            "(a custom kernel?): replace it by torch.nn.functional.scaled_dot_product_attention."
        )
    hint += " hvp='gradient_difference' needs first-order gradients only."
    return RuntimeError(f"cannot differentiate {op} twice: {hint} (original error: {text})")


class HessianOperator:
    """Exact Hessian of ``loss_fn`` over ``data`` w.r.t. (a subset of) a model's parameters.

    The operator is matrix free: :meth:`matmat` multiplies a ``(b, n)`` block of row vectors
    (``n`` the number of selected parameter entries, flattened in model order). Every forward
    pass runs under :func:`~spectral_callbacks.curvature.isolation.measurement_context` (math
    attention kernel, float32 without autocast, BatchNorm statistics frozen, RNG forked and
    seeded), and :meth:`close` restores every buffer. Use it as a context manager::

        with HessianOperator(model, loss_fn, (x, y)) as H:
            hv = H.matvec(v)

    Args:
        model: The model. Its train/eval modes are used as they are.
        loss_fn: ``loss_fn(model, batch) -> scalar`` loss of a batch, reduced over its samples
            as ``reduction`` says.
        data: One batch, or an iterable of batches (see
            :func:`~spectral_callbacks.curvature.data.as_batch_list`; wrap a list of batches
            in :class:`~spectral_callbacks.curvature.data.Batches` to say it is one); moved
            to the model's device and kept for the operator's lifetime.
        reduction: ``"mean"`` if ``loss_fn`` returns a batch's mean loss (batches weighted by
            size), ``"sum"`` if it returns the sum over the batch's samples (every batch
            weight 1); module docstring.
        params: Parameter filter (regular expression, predicate, or names / module prefixes);
            default all trainable parameters.
        hvp: ``"auto"``, ``"reuse_graph"``, ``"forward_over_reverse"`` or ``"compiled"``
            (module docstring).
        compile_backend: ``torch.compile`` backend of the ``"compiled"`` path.
        batch_size_fn: ``batch -> int`` number of samples, when the first tensor's leading
            dimension is not it (unused with ``reduction="sum"``).
        seed: Seed of the RNG inside forward passes (fixes dropout masks).
        richardson: With ``hvp="gradient_difference"``, a Richardson step (four gradients
            per product, error of order ``ε^{4/5}`` instead of ``ε^{2/3}``).
        distributed: Under an initialised ``torch.distributed`` process group of several
            processes, make this the Hessian of the union of every process's ``data``: batch
            weights use the global sample count and every product is all-reduced, so all
            processes hold the same operator. Every process must then make the same calls in
            the same order (the solvers do, being deterministic given equal products).

    Precision: products run in the parameters' dtype (a model in float32 is measured in
    float32 even under a mixed-precision autocast region). For 16-bit parameters
    (``precision="bf16-true"`` / ``"16-true"``) the operator's vectors are float32
    (:attr:`dtype`): each product rounds the vector to the parameters' dtype, runs the
    forward and backward passes there and returns float32, so only the product carries
    16-bit rounding (relative error of order ``2^-8`` in bfloat16, ``2^-11`` in float16,
    times the conditioning of the passes) and the solvers, which confirm small residuals
    with fresh products (:func:`~spectral_callbacks.linalg.lanczos`), cannot claim a
    tolerance below it.

    Attributes:
        size: Number of selected parameter entries ``n``.
        num_hvps: Hessian-vector products computed so far (one per vector), not counting the
            two of the one-time symmetry probe (:meth:`_check_symmetry`) on the first
            product for a model, loss and parameter selection.
        names: Names of the selected parameters.
        dtype: Dtype of the vectors ``matmat`` takes and returns.
        product_dtype: Dtype the products are computed in (the parameters').
        product_relative_error: The relative error a product can carry beyond rounding
            (``ε^{2/3}`` or ``ε^{4/5}`` for gradient differences, else 0): the eigensolvers
            confirm residuals near it (:func:`~spectral_callbacks.linalg.lanczos`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        data: Any,
        params: ParameterFilter = None,
        hvp: HvpPath = "auto",
        batch_size_fn: Callable[[Any], int] | None = None,
        seed: int = 0,
        distributed: bool = False,
        compile_backend: str = "inductor",
        reduction: Reduction = "mean",
        richardson: bool = False,
    ) -> None:
        OperatorSettings(params=params, hvp=hvp, reduction=reduction, seed=seed)
        check_callable("loss_fn", loss_fn, "loss_fn(model, batch) -> scalar")
        check_callable("batch_size_fn", batch_size_fn, "batch_size_fn(batch) -> int", True)
        check_bool("distributed", distributed)
        check_bool("richardson", richardson)
        self.model = model
        self.loss_fn = loss_fn
        named = select_parameters(model, params)
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"selected parameters must share one floating dtype, got {dtypes}")
        #: The parameters' dtype, in which every product is computed.
        self.product_dtype = self.params[0].dtype
        #: The dtype of the vectors ``matmat`` takes and returns: the parameters' own, but
        #: float32 for 16-bit parameters, so that Krylov bases, sums over batches and every
        #: reduction of the solvers keep float32's precision (each product itself is only
        #: as accurate as its 16-bit arithmetic; the solvers check residuals against that).
        self.dtype = (
            torch.float32
            if self.product_dtype in (torch.bfloat16, torch.float16)
            else self.product_dtype
        )
        self.device = self.params[0].device
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.size = sum(self.numels)
        self.seed = seed
        self.batches = [move_to_device(b, self.device) for b in as_batch_list(data)]
        self.distributed = bool(
            distributed
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        )
        self.reduction = reduction
        self.batch_weights = self._batch_weights(batch_size_fn)
        self.hvp = hvp
        self.richardson = richardson
        self.compile_backend = compile_backend
        self._gradient_difference = hvp == "gradient_difference"
        # Parameters sharded by fully_shard (FSDP2): DTensors, products by differences only.
        self._sharded = any(_local_tensor(p) is not None for p in self.params)
        if self._sharded:
            if hvp not in ("auto", "gradient_difference"):
                raise ValueError(
                    f"hvp={hvp!r} needs double backward, which parameters sharded by "
                    "fully_shard (FSDP2) do not support: use hvp='gradient_difference' "
                    "(or 'auto')"
                )
            if not self.distributed:
                raise ValueError(
                    "parameters sharded by fully_shard (FSDP2) need distributed=True: the "
                    "operator is then the Hessian of every process's batches together"
                )
            self._gradient_difference = True
        self._theta_norm: float | None = None
        self._step: float | None = None  # gradient differences: step length, once chosen
        self._stated_error: float | None = None
        self.num_hvps = 0
        self._graphs: list[tuple[float, list[tuple[int, torch.Tensor]]]] | None = None
        self._checked_finite = False
        self._vmap_failed = False
        self._buffers = BufferSnapshot(model)

    def _batch_weights(self, batch_size_fn: Callable[[Any], int] | None) -> list[float]:
        """Weight of each batch's loss in the dataset loss (module docstring)."""
        if self.reduction == "sum":
            return [1.0] * len(self.batches)
        sizes = [(batch_size_fn or batch_size)(b) for b in self.batches]
        if any(s < 1 for s in sizes):
            raise ValueError(f"every batch must hold at least one sample, got sizes {sizes}")
        total = float(sum(sizes))
        if self.distributed:  # weights over the union of every process's batches
            count = torch.tensor(total, dtype=torch.float64, device=self.device)
            total = float(self._all_reduce(count))
        return [s / total for s in sizes]

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the cached first-order graphs and restore every buffer of the model."""
        self._graphs = None
        self._buffers.restore()
        if self._sharded:
            _reshard(self.model)

    # -- products --------------------------------------------------------------------------
    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector of length ``n``."""
        return self.matmat(vector.unsqueeze(0)).squeeze(0)

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        """``H`` applied to each row of a ``(b, n)`` block; returns ``(b, n)``."""
        if block.ndim != 2 or block.shape[1] != self.size:
            raise ValueError(f"block must have shape (b, {self.size}), got {tuple(block.shape)}")
        block = block.to(dtype=self.dtype, device=self.device)
        self.num_hvps += block.shape[0]
        with autocast_disabled(self.device):
            return self._reduce_products(self._matmat(block))

    def _check_symmetry(self) -> None:
        """Once per model, loss and parameter selection: ``vᵀ(H w) = wᵀ(H v)`` for two random
        vectors (two products). Double backward through an op whose backward is not itself
        differentiable (a custom ``autograd.Function``, ``@once_differentiable`` included in
        torch 2.13) silently drops terms, and the product it gives is not symmetric."""
        # Only the reused graph: the forward-over-reverse paths go through forward-mode AD,
        # which raises for such an op instead of dropping terms.
        if self._gradient_difference or self._path_for(1) != "reuse_graph":
            return
        checked = _SYMMETRY_CHECKED.setdefault(self.model, set())
        key = (self.loss_fn, tuple(self.names), self.reduction)
        if key in checked:
            return
        generator = torch.Generator(device=self.device).manual_seed(self.seed + 7919)
        pair = torch.randn(2, self.size, generator=generator, dtype=self.dtype, device=self.device)
        # Not counted in num_hvps: a one-time check (like a compilation), which would make a
        # resumed run's first count differ from the uninterrupted run's.
        products = self._matmat_reuse_graph(pair).double()
        v, w = pair.double()
        cross = torch.stack([(v * products[1]).sum(), (w * products[0]).sum()])
        scale = products[1].norm() * w.norm() + products[0].norm() * v.norm()
        asymmetry = (cross[0] - cross[1]).abs() / scale.clamp_min(torch.finfo(torch.float64).tiny)
        asymmetry = float(self._all_reduce(asymmetry.reshape(1), op="max")[0])
        roundoff = torch.finfo(self.product_dtype).eps / 2
        if asymmetry > min(0.1, max(1e4 * roundoff, 1e-10)):
            self._graphs = None
            raise _NoSecondDerivative(
                RuntimeError(
                    f"double backward of this loss gives an asymmetric Hessian (relative "
                    f"asymmetry {asymmetry:.2g}): an op's backward is not differentiable (a "
                    "custom autograd.Function, e.g. one marked @once_differentiable), so its "
                    "second-order terms are missing: use hvp='gradient_difference'"
                ),
                None,
            )
        checked.add(key)

    def _reduce_products(self, products: torch.Tensor) -> torch.Tensor:
        """Products of this process's batches summed over processes; products of sharded
        parameters are whole on every process already (FSDP reduced their gradients)."""
        return products if self._sharded else self._all_reduce(products)

    def _all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) over processes when distributed; the tensor itself otherwise."""
        if self.distributed:
            reduce_op = (
                torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
            )
            torch.distributed.all_reduce(tensor, op=reduce_op)
        return tensor

    def _raise_if_non_finite(self, losses: list[torch.Tensor]) -> None:
        """Raise on every process together if any process has a non-finite loss.

        Raising on one process alone would leave the others waiting in an all-reduce.
        """
        bad = [i for i, loss in enumerate(losses) if not bool(torch.isfinite(loss))]
        flag = torch.tensor(1.0 if bad else 0.0, dtype=torch.float64, device=self.device)
        if float(self._all_reduce(flag, op="max")) > 0:
            where = (
                f"the loss is {float(losses[bad[0]].detach())} on batch {bad[0]}"
                if bad
                else "the loss is not finite on another process"
            )
            raise NonFiniteLossError(where)

    def _matmat(self, block: torch.Tensor) -> torch.Tensor:
        try:
            self._check_symmetry()
            return self._matmat_by_path(block)
        except _NoSecondDerivative as error:
            if self.hvp != "auto":
                raise error.explained from error.original
            # The loss has no double backward for a reason other than attention (which
            # runs on the math kernel): products from gradients alone still work.
            self._gradient_difference = True
            self._graphs = None
            told = _SWITCH_WARNED.setdefault(self.model, set())
            if (self.loss_fn, tuple(self.names)) not in told:  # once, not every measurement
                told.add((self.loss_fn, tuple(self.names)))
                warnings.warn(
                    f"{error.explained}\nhvp='auto' switches to hvp='gradient_difference' "
                    "(products from two gradients each, relative error about "
                    f"{self.product_relative_error:.0e}); pass hvp='gradient_difference' to "
                    "say so",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return self._matmat_gradient_difference(block)

    def _matmat_by_path(self, block: torch.Tensor) -> torch.Tensor:
        path = self._path_for(block.shape[0])
        if path == "gradient_difference":
            return self._matmat_gradient_difference(block)
        if path in ("forward_over_reverse", "compiled"):
            try:
                return self._matmat_forward_over_reverse(block, compiled=path == "compiled")
            except RuntimeError as error:
                explained = _explain_second_order_failure(error)
                if self.hvp == "forward_over_reverse":
                    if explained is not None:
                        raise explained from error
                    if "ZeroTensors are immutable" in str(error):
                        raise RuntimeError(
                            f"{error}\nForward-mode AD through this loss fails in PyTorch "
                            "(F.mse_loss does: pytorch#123996). Write the loss out, e.g. "
                            "(pred - y).pow(2).mean(), or use hvp='reuse_graph' or 'auto'."
                        ) from error
                    raise
                self._vmap_failed = True
                warnings.warn(
                    f"forward-over-reverse Hessian-vector products failed ({error}); "
                    "falling back to the reused first-order graph",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self._matmat_reuse_graph(block)

    @property
    def product_relative_error(self) -> float:
        """The stated relative error of a product: 0 for the exact paths; for gradient
        differences the one measured when the step was chosen (:meth:`_calibrate`), before
        that the a-priori ``ε^{2/3}`` (``ε^{4/5}`` with Richardson)."""
        if not self._gradient_difference:
            return 0.0
        if self._stated_error is not None:
            return self._stated_error
        eps = torch.finfo(self.product_dtype).eps
        return eps ** (0.8 if self.richardson else 2.0 / 3.0)

    def _path_for(self, width: int) -> str:
        if self._gradient_difference:
            return "gradient_difference"
        if self.hvp in ("reuse_graph", "forward_over_reverse"):
            return self.hvp
        if self._vmap_failed:  # "auto" and "compiled" fall back to the path that always works
            return "reuse_graph"
        if self.hvp == "compiled":
            return "compiled"
        return "forward_over_reverse" if width > 1 and self.device.type == "cuda" else "reuse_graph"

    def _split(self, block: torch.Tensor) -> list[torch.Tensor]:
        """Parameter-shaped views ``(b, *shape)`` of a ``(b, n)`` block, in the products'
        dtype."""
        pieces = block.to(self.product_dtype).split(self.numels, dim=1)
        return [
            piece.reshape(block.shape[0], *shape)
            for piece, shape in zip(pieces, self.shapes, strict=True)
        ]

    def _flatten(self, pieces: list[torch.Tensor | None], width: int) -> torch.Tensor:
        flat = [
            torch.zeros(width, numel, dtype=self.dtype, device=self.device)
            if piece is None
            else piece.reshape(width, numel).to(self.dtype)
            for piece, numel in zip(pieces, self.numels, strict=True)
        ]
        return torch.cat(flat, dim=1)

    def _loss(self, batch: Any, index: int) -> torch.Tensor:
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor (the mean loss), got {shape}")
        if not loss.requires_grad:
            raise ValueError(
                "loss_fn returned a tensor that does not depend on the selected parameters "
                "(requires_grad=False): was it computed under torch.no_grad() or detached?"
            )
        return loss.reshape(())

    def loss(self) -> float:
        """The dataset loss ``Σ_b w_b L_b`` at the parameters' current values (summed over
        processes when distributed)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for index, (batch, weight) in enumerate(zip(self.batches, self.batch_weights, strict=True)):
            with measurement_context(self.model, self.seed, math_attention=False):
                total += weight * self._loss(batch, index).detach().double()
        return float(self._reduce_products(total))

    @contextlib.contextmanager
    def moved(self, offset: torch.Tensor) -> Iterator[None]:
        """Inside the block the selected parameters are ``θ + offset`` (a flat vector like
        the products); on exit they are copied back from a saved copy, bit for bit."""
        if self._sharded:
            raise ValueError("moving parameters sharded by fully_shard is not supported")
        saved = [p.detach().clone() for p in self.params]
        pieces = offset.to(self.device).split(self.numels)
        try:
            with torch.no_grad():
                for param, value, piece in zip(self.params, saved, pieces, strict=True):
                    param.data.copy_(value + piece.reshape(value.shape).to(value.dtype))
            self._graphs = None  # the first-order graphs belong to θ
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, saved, strict=True):
                    param.data.copy_(value)
            self._graphs = None

    def gradient(self) -> torch.Tensor:
        """The gradient of the dataset loss, ``Σ_b w_b ∇L_b``, flat like the products (summed
        over processes when distributed). Free on the reused-graph path, whose first-order
        graphs hold it; one gradient per batch otherwise."""
        if self._graphs is not None:
            flat = torch.zeros(self.size, dtype=self.dtype, device=self.device)
            pieces = list(flat.split(self.numels))
            for weight, outputs in self._graphs:
                for i, g in outputs:
                    pieces[i].add_(g.detach().reshape(-1).to(self.dtype), alpha=weight)
        else:
            flat = torch.cat([g.reshape(-1) for g in self._weighted_gradient()])
        return self._reduce_products(flat)

    # -- path 1: reused first-order graph ------------------------------------------------------
    def _first_order_graphs(self) -> list[tuple[float, list[tuple[int, torch.Tensor]]]]:
        if self._graphs is None:
            graphs, losses = [], []
            for index, (batch, weight) in enumerate(
                zip(self.batches, self.batch_weights, strict=True)
            ):
                with measurement_context(self.model, self.seed):
                    loss = self._loss(batch, index)
                    losses.append(loss.detach())
                    try:
                        grads = torch.autograd.grad(
                            loss, self.params, create_graph=True, allow_unused=True
                        )
                    except RuntimeError as error:
                        _raise_second_order(error)
                # A gradient that is None (unused parameter) has zero derivative. One that
                # is there but carries no graph is constant only if the loss is linear in
                # that parameter; far more often an op's backward is not differentiable (a
                # custom autograd.Function), which would read as a zero Hessian block.
                constant = [
                    self.names[i]
                    for i, g in enumerate(grads)
                    if g is not None and not g.requires_grad
                ]
                if constant:
                    raise _NoSecondDerivative(
                        RuntimeError(
                            f"the gradient of {constant[:3]} carries no graph (a custom "
                            "autograd.Function whose backward is not differentiable?), so "
                            "double backward would read its Hessian block as 0: use "
                            "hvp='gradient_difference'"
                        ),
                        None,
                    )
                outputs = [(i, g) for i, g in enumerate(grads) if g is not None]
                graphs.append((weight, outputs))
            self._raise_if_non_finite(losses)
            self._graphs = graphs
            self._checked_finite = True
        return self._graphs

    def _matmat_reuse_graph(self, block: torch.Tensor) -> torch.Tensor:
        width = block.shape[0]
        if width > 1 and self.device.type == "cpu":
            # A vmapped backward (is_grads_batched) cost 1.5-1.8x as much per vector as one
            # backward per vector on 2 CPU cores (C1, G1 of bench/run.py).
            return torch.cat([self._matmat_reuse_graph(row) for row in block.split(1)])
        pieces = self._split(block)
        total = torch.zeros_like(block)
        for weight, outputs in self._first_order_graphs():
            if not outputs:
                continue
            indices = [i for i, _ in outputs]
            grads = [g for _, g in outputs]
            vectors = [pieces[i] if width > 1 else pieces[i][0] for i in indices]
            with torch.inference_mode(False), torch.enable_grad():
                try:
                    products = torch.autograd.grad(
                        grads,
                        self.params,
                        grad_outputs=vectors,
                        retain_graph=True,
                        allow_unused=True,
                        is_grads_batched=width > 1,
                    )
                except RuntimeError as error:
                    _raise_second_order(error)
            total += weight * self._flatten(list(products), width)
        return total

    # -- paths 2 and 3: vmapped forward-over-reverse, eager or compiled ----------------------
    def _block_product_function(self, compiled: bool) -> Callable:
        """``f(primals, tangents, batch)``: the vmapped product, compiled if asked and possible."""
        eager = _block_product(self.model, self.loss_fn, self.names)
        if not compiled:
            return eager
        key = (id(self.model), self.loss_fn, tuple(self.names), self.compile_backend)
        entry = _COMPILED.get(key)
        if entry is None:
            entry = _COMPILED[key] = _CompiledProduct(eager, self.compile_backend)
            while len(_COMPILED) > COMPILED_CACHE_SIZE:
                _COMPILED.popitem(last=False)
        else:
            _COMPILED.move_to_end(key)
        return eager if entry.failed else entry

    def _check_finite_losses(self, math_attention: bool = True) -> None:
        """The loss at ``θ`` on every batch, checked once (all processes together)."""
        if self._checked_finite:
            return
        losses = []
        for index, batch in enumerate(self.batches):
            with measurement_context(self.model, self.seed, math_attention=math_attention):
                losses.append(self._loss(batch, index).detach())
        if self._sharded:
            _reshard(self.model)
        self._raise_if_non_finite(losses)
        self._checked_finite = True

    def _matmat_forward_over_reverse(self, block: torch.Tensor, compiled: bool) -> torch.Tensor:
        self._check_finite_losses()
        product = self._block_product_function(compiled)
        primals = tuple(p.detach() for p in self.params)  # in the products' dtype
        tangents = tuple(self._split(block))
        total = torch.zeros_like(block)
        for batch, weight in zip(self.batches, self.batch_weights, strict=True):
            with measurement_context(self.model, self.seed):
                products = product(primals, tangents, batch)
            total += weight * self._flatten(list(products), block.shape[0])
        return total

    # -- path 4: differences of first-order gradients ------------------------------------------
    def _weighted_gradient(self) -> list[torch.Tensor]:
        """``Σ_b w_b ∇L_b`` at the parameters' current values, in float32 or wider."""
        if self._sharded:
            return self._sharded_weighted_gradient()
        total = [torch.zeros(p.shape, dtype=self.dtype, device=self.device) for p in self.params]
        for index, (batch, weight) in enumerate(zip(self.batches, self.batch_weights, strict=True)):
            with measurement_context(self.model, self.seed, math_attention=False):
                grads = _first_order_gradient(
                    functools.partial(self._loss, batch, index), self.params, self.model
                )
            for accumulator, grad in zip(total, grads, strict=True):
                if grad is not None:
                    accumulator.add_(grad.to(self.dtype), alpha=weight)
        return total

    def _sharded_weighted_gradient(self) -> list[torch.Tensor]:
        """The gradient of the dataset loss for parameters sharded by ``fully_shard`` (FSDP2),
        whole on every process.

        ``torch.autograd.grad`` with respect to FSDP2's sharded parameters does not follow
        changes of the shards, so this runs FSDP's own ``backward()`` (one per gradient, on
        the weighted sum of every batch's loss, so that every process enters the same
        collectives), reads the reduce-scattered ``.grad`` (FSDP averages it over the
        processes: multiplied back by their number, it is the gradient of the union), gathers
        it whole, and puts every ``.grad`` of the model back as it found it.
        """
        _reshard(self.model)  # a forward alone leaves the root gathered, blind to the shards
        saved = [(p, p.grad) for p in self.model.parameters()]
        try:
            for param, _ in saved:
                param.grad = None
            with measurement_context(self.model, self.seed, math_attention=False):
                loss = sum(
                    weight * self._loss(batch, index)
                    for index, (batch, weight) in enumerate(
                        zip(self.batches, self.batch_weights, strict=True)
                    )
                )
                loss.backward()
            gradients = []
            for param in self.params:
                grad = param.grad
                if grad is None:
                    gradients.append(torch.zeros(param.shape, dtype=self.dtype, device=self.device))
                    continue
                processes = param.device_mesh.size() if hasattr(param, "device_mesh") else 1
                whole = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
                gradients.append(whole.to(self.dtype) * processes)
            return gradients
        finally:
            for param, grad in saved:
                param.grad = grad
            _reshard(self.model)

    def _difference(self, saved: list[torch.Tensor], pieces: list[torch.Tensor], h: float):
        """``(g(θ + h v) − g(θ − h v)) / 2h`` for one vector ``v`` given as ``pieces``, and the
        mean ``(g(θ + h v) + g(θ − h v)) / 2``, flat."""
        gradients = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for param, value, piece in zip(self.params, saved, pieces, strict=True):
                    # Through .data: the parameter's version counter stays, so a graph that
                    # saved it (another operator's, the user's) stays valid once restored.
                    param.data.copy_(value + _like(value, (sign * h) * piece.to(value.dtype)))
            gradients.append(torch.cat([g.reshape(-1) for g in self._weighted_gradient()]))
        plus, minus = gradients
        return (plus - minus) / (2.0 * h), 0.5 * (plus + minus)

    def _calibrate(self, saved: list[torch.Tensor], pieces: list[torch.Tensor], norm: float):
        """Choose the step from the first vector; return its product (Richardson).

        With the default step ``s₀ = ε^{1/3} (1 + ‖θ‖)`` (a length in parameter space) the
        central differences ``D(s₀)`` and ``D(s₀/2)`` of the unit direction give the
        truncation coefficient ``c = ‖D(s₀) − D(s₀/2)‖ / (¾ s₀²)`` and the mean gradient
        ``G = ‖∇L‖``; the step minimising ``c s² + ε G / s`` is ``s* = (ε G / 2c)^{1/3}``,
        kept within ``[s₀/1000, s₀]`` (a loss that is not smooth at the scale of ``s₀``, a
        ReLU network's kinks, shows as a large ``c`` and a smaller step). The relative error
        of later products is then stated as ``(c s*² + ε G / s*) / ‖H u‖``. The quantities are
        all-reduced first, so every process chooses the same step.
        """
        eps = torch.finfo(self.product_dtype).eps
        step = eps ** (1.0 / 3.0) * (1.0 + self._theta_norm)
        coarse, mean = self._difference(saved, pieces, step / norm)
        fine, _ = self._difference(saved, pieces, step / (2 * norm))
        local = (4.0 * fine - coarse) / 3.0
        stacked = self._reduce_products(torch.stack([coarse, fine, mean]).double())
        gap = float((stacked[0] - stacked[1]).norm()) / norm
        gradient = float(stacked[2].norm())
        curvature = float(stacked[1].norm()) / norm
        c = gap / (0.75 * step**2)
        best = (eps * gradient / (2.0 * c)) ** (1.0 / 3.0) if c > 0 else step
        central = min(step, max(step / 1000.0, best))
        scale = max(curvature, torch.finfo(torch.float64).tiny)
        # This first product is the Richardson value of D(s₀) and D(s₀/2): its rounding is
        # about (5/3) ε G / (s₀/2).
        first = (10.0 / 3.0) * eps * gradient / step / scale
        if self.richardson:
            # The h² term cancels; the a-priori optimal step grows to ε^{1/5}, scaled like
            # the central one, and what is left is mostly rounding, ~(5/3) ε G / s.
            self._step = central * eps ** (0.2 - 1.0 / 3.0)
            stated = 2.0 * eps * gradient / self._step / scale
            self._stated_error = max(stated, eps**0.8, first)
        else:
            self._step = central
            rounding = eps * gradient / central
            self._stated_error = max((c * central**2 + rounding) / scale, first)
        if self._stated_error > max(1e-2, 10.0 * eps ** (2.0 / 3.0)):
            warnings.warn(
                f"gradient differences of this loss carry an estimated relative error of "
                f"{self._stated_error:.1g} per product: the loss is not smooth at the scale of "
                "the step (kinks of ReLU-like activations?). Values are flagged unconverged "
                "but unreliable; use an exact path (hvp='auto') where double backward exists",
                RuntimeWarning,
                stacklevel=4,
            )
        return local

    def _parameter_norm(self) -> float:
        """``‖θ‖`` of the selected parameters, the same on every process: replicated
        parameters (DDP) hold all of ``θ`` on each, sharded ones (FSDP2's ``DTensor``) a part."""
        sharded = torch.zeros((), dtype=torch.float64, device=self.device)
        replicated = 0.0
        for p in self.params:
            local = _local_tensor(p.detach())
            if local is not None:
                sharded += local.double().pow(2).sum()
            else:
                replicated += float(p.detach().double().pow(2).sum())
        total = float(self._all_reduce(sharded)) if self.distributed else float(sharded)
        return math.sqrt(total + replicated)

    def _matmat_gradient_difference(self, block: torch.Tensor) -> torch.Tensor:
        self._check_finite_losses(math_attention=False)
        if self._theta_norm is None:
            self._theta_norm = self._parameter_norm()
        saved = [p.detach().clone() for p in self.params]
        rows = []
        try:
            for row in block:
                norm = float(row.double().norm())
                if norm == 0.0:
                    rows.append(torch.zeros_like(row))
                    continue
                pieces = [
                    piece.reshape(shape)
                    for piece, shape in zip(row.split(self.numels), self.shapes, strict=True)
                ]
                if self._step is None:
                    rows.append(self._calibrate(saved, pieces, norm).to(self.dtype))
                elif self.richardson:
                    coarse, _ = self._difference(saved, pieces, self._step / norm)
                    fine, _ = self._difference(saved, pieces, self._step / (2 * norm))
                    rows.append((4.0 * fine - coarse) / 3.0)
                else:
                    rows.append(self._difference(saved, pieces, self._step / norm)[0])
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, saved, strict=True):
                    param.data.copy_(value)  # bit for bit, whatever the differences did
        return torch.stack(rows)

    def __repr__(self) -> str:
        return (
            f"HessianOperator(size={self.size}, parameters={len(self.params)}, "
            f"batches={len(self.batches)}, hvp={self.hvp!r}, device={self.device})"
        )


def _reshard(model: nn.Module) -> None:
    """Put every module sharded by ``fully_shard`` (FSDP2) back on its sharded parameters.

    FSDP2 gathers the whole parameters for a forward pass and, for the root module, shards
    them again only after a backward pass: after a forward alone (the finiteness check) the
    next forward would use the gathered copy and miss a perturbation of the shards.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2: nothing can be sharded by it
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _local_tensor(tensor: torch.Tensor) -> torch.Tensor | None:
    """This process's shard of a ``DTensor`` (FSDP2's sharded parameters); ``None`` for a
    plain tensor."""
    return tensor.to_local() if hasattr(tensor, "device_mesh") else None


def _like(parameter: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` (the parameter's full shape) laid out like ``parameter``: as it is for a
    plain tensor, sharded like a ``DTensor`` parameter (each process keeps its slice; no
    communication, as every process holds the same ``whole``)."""
    if not hasattr(parameter, "device_mesh"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, parameter.device_mesh, parameter.placements, src_data_rank=None)


def _first_order_gradient(
    loss_of: Callable[[], torch.Tensor], params: list[nn.Parameter], model: nn.Module
) -> list:
    """``∇ loss_of()`` w.r.t. ``params`` (``None`` for unused ones), never into ``.grad``.

    Reentrant activation checkpointing (``use_reentrant=True``) refuses
    ``torch.autograd.grad`` (and frees the graph doing so); there the loss is computed
    again and the gradient comes from ``loss.backward()``, with the ``.grad`` of every
    parameter of ``model`` saved first and put back after, object for object (in one
    process only: under DDP a backward would fire its gradient hooks). The caller runs both
    forward passes under the same seeded RNG.
    """
    rng = torch.random.get_rng_state()
    try:
        return list(torch.autograd.grad(loss_of(), params, allow_unused=True))
    except RuntimeError as error:
        if "incompatible with .grad()" not in str(error):
            raise
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            raise RuntimeError(
                "reentrant activation checkpointing (use_reentrant=True) allows gradients "
                "only by backward(), which under DDP would run its all-reduce hooks: use "
                "torch.utils.checkpoint(..., use_reentrant=False)"
            ) from error
    torch.random.set_rng_state(rng)  # the same dropout masks as the first attempt
    saved = [(p, p.grad) for p in model.parameters()]
    try:
        for param, _ in saved:
            param.grad = None
        loss_of().backward()
        return [p.grad for p in params]
    finally:
        for param, grad in saved:
            param.grad = grad


def _block_product(model: nn.Module, loss_fn: LossFunction, names: list[str]) -> Callable:
    """``f(primals, tangents, batch) -> H V``: ``jvp`` of ``grad`` vmapped over the block.

    ``primals`` are the selected parameters' values, ``tangents`` the block as a tuple of
    ``(b, *shape)`` tensors. Everything that changes between calls is an argument, so a
    compiled version of ``f`` is reused across measurements (guards see only shapes).
    """
    from torch.func import functional_call, grad, jvp, vmap

    wrapper = _LossOfModel(model, loss_fn)
    # Without `_orig_mod`: dynamo traces a compiled submodule as the module it wraps, where
    # that attribute does not exist (the lookup would break the graph and leave the whole
    # product eager); eagerly, the compiled wrapper forwards attribute lookups to that module.
    keys = ["model." + uncompiled_name(name) for name in names]

    def loss_at(values: tuple[torch.Tensor, ...], batch: Any) -> torch.Tensor:
        return functional_call(wrapper, dict(zip(keys, values, strict=True)), (batch,)).reshape(())

    def product(
        primals: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...], batch: Any
    ) -> tuple[torch.Tensor, ...]:
        def one(direction: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return jvp(lambda values: grad(loss_at)(values, batch), (primals,), (direction,))[1]

        return vmap(one, randomness="same")(tangents)

    return product


_fresh_code_ids = itertools.count()


def _with_own_code_object(function: Callable) -> Callable:
    """A copy of ``function`` with a code object of its own.

    ``torch.compile`` keeps its compiled variants, and its limit on recompilations, per code
    object: every closure of one ``def`` would share them, so products of unrelated models
    would evict each other's compilations. A copy per cache entry keeps them apart.
    """
    code = function.__code__.replace(co_name=f"{function.__name__}_{next(_fresh_code_ids)}")
    return types.FunctionType(
        code, function.__globals__, code.co_name, function.__defaults__, function.__closure__
    )


class _CompiledProduct:
    """A block product under ``torch.compile``, checked against the eager product.

    The first call of each block width computes the eager product first (an error there is
    the eager path's to report: nothing is compiled), then compiles (logged, since it can
    take a minute) and compares. An exception from the compiler, or a compiled product that
    disagrees with the eager one beyond rounding, marks the entry failed with one warning;
    from then on the eager function answers. Later calls of a checked width run compiled.
    """

    def __init__(self, eager: Callable, backend: str | Callable) -> None:
        self.eager = eager
        self.backend = backend
        # Static shapes: one graph per block width and batch shape. (Symbolic batch sizes fail
        # to trace through convolution + BatchNorm under torch.func in torch 2.13.)
        self.compiled = torch.compile(_with_own_code_object(eager), backend=backend, dynamic=False)
        self.failed = False
        self._checked: set[tuple] = set()

    def __call__(self, primals: tuple, tangents: tuple, batch: Any) -> tuple[torch.Tensor, ...]:
        if self.failed:
            return self.eager(primals, tangents, batch)
        signature = _shape_signature(tangents, batch)
        if signature in self._checked:
            with compiled_code_allowed():
                return self.compiled(primals, tangents, batch)
        expected = self.eager(primals, tangents, batch)
        logger.info(
            "compiling the Hessian-vector product for blocks of %d (torch.compile, backend "
            "%r): once per model, block width and batch shape",
            tangents[0].shape[0],
            self.backend,
        )
        try:
            with compiled_code_allowed():
                products = self.compiled(primals, tangents, batch)
            problem = _disagreement(products, expected)
        except Exception as error:  # any compiler failure means: run eagerly
            problem = f"{type(error).__name__}: {str(error)[:200]}"
        if problem is not None:
            self.failed = True
            warnings.warn(
                f"torch.compile of the Hessian-vector product failed ({problem}); using the "
                "eager forward-over-reverse path",
                RuntimeWarning,
                stacklevel=3,
            )
        self._checked.add(signature)
        return expected


def _shape_signature(tangents: tuple, batch: Any) -> tuple:
    """Block width plus the shapes and dtypes of the batch's tensors (what a recompile sees)."""
    leaves = torch.utils._pytree.tree_leaves(batch)
    shapes = tuple(
        (tuple(leaf.shape), leaf.dtype) if isinstance(leaf, torch.Tensor) else type(leaf)
        for leaf in leaves
    )
    return (tangents[0].shape[0], shapes)


def _disagreement(products: tuple, expected: tuple) -> str | None:
    """``None`` if the compiled products equal the eager ones up to rounding, else why not.

    Rounding differs (fused kernels reorder sums), so the bound is relative to the block's
    norm: ``‖compiled - eager‖ <= sqrt(eps) ‖eager‖`` in the parameters' dtype.
    """
    pairs = zip(products, expected, strict=True)
    difference = sum(float((a - b).double().pow(2).sum()) for a, b in pairs)
    scale = sum(float(b.double().pow(2).sum()) for b in expected)
    eps = torch.finfo(expected[0].dtype).eps
    if not math.isfinite(difference) or difference > eps * scale:
        return f"compiled products differ from eager ones by {math.sqrt(difference):.3g}"
    return None


def flat_size(model: nn.Module, params: ParameterFilter = None) -> int:
    """Number of entries of the parameters ``params`` selects (the Hessian's dimension)."""
    return sum(p.numel() for _, p in select_parameters(model, params))

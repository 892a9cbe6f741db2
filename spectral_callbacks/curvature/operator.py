"""What every curvature operator shares: the parameters, the data and the lifecycle.

A curvature operator is a matrix-free symmetric operator ``A = Σ_b w_b A_b`` over the
selected parameters of a model and a list of batches: the loss Hessian
(:class:`~spectral_callbacks.curvature.HessianOperator`) or its Gauss–Newton part
(:class:`~spectral_callbacks.curvature.GGNOperator`). :class:`CurvatureOperator` owns what
does not depend on which:

* **selection**: the trainable parameters ``settings.params`` selects, flattened in model
  order (``size`` entries); the padding rows of embeddings (``padding_idx``), which the
  backward pass never gives a gradient, are held fixed: every product is ``P A P`` with
  ``P`` zeroing them (:func:`~spectral_callbacks.curvature.data.padding_coordinates`), the
  same on every product path;
* **dtypes**: products run in the parameters' dtypes, each parameter's piece in its own
  (a bfloat16 model with float32 norms, Hugging Face's ``_keep_in_fp32_modules``), and are
  judged by the least precise of them (:attr:`product_dtype`); the vectors ``matmat``
  takes and returns are in the most precise, at least float32 (:attr:`dtype`), so that
  Krylov bases, sums over batches and the solvers' reductions keep float32's precision;
* **batch weights**: with ``reduction="mean"`` batch ``b`` of ``n_b`` samples has weight
  ``n_b / N`` (``N`` every sample of every process when distributed), with ``"sum"`` weight 1;
* **distributed reduce**: with ``distributed=True`` under a process group of several
  processes, products are summed over processes, so every process holds the operator of the
  union of their batches;
* **lifecycle and isolation**: every buffer of the model, and every parameter its forward
  pass writes itself (``nn.Embedding(max_norm=...)``), is restored by :meth:`close` (and
  on leaving a ``with`` block), parameters moved by :meth:`moved` are copied back bit for
  bit, and a non-finite loss on any process raises on every process.

A subclass implements :meth:`_products` (the local products of this process's batches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..linalg._precision import autocast_disabled
from ..settings import OperatorSettings
from .data import (
    as_batch_list,
    batch_size,
    move_to_device,
    padding_coordinates,
    select_parameters,
)
from .isolation import ModelStateSnapshot, measurement_scope
from .sharding import local_tensor, reshard

__all__ = ["CurvatureOperator", "NonFiniteLossError", "process_group_size"]


class NonFiniteLossError(FloatingPointError):
    """The loss was NaN or infinite on a batch, so the Hessian is undefined there."""


def process_group_size() -> int:
    """Processes of the initialised ``torch.distributed`` group (1 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class CurvatureOperator:
    """Base of the curvature operators (module docstring); use a subclass.

    Attributes:
        model: The model.
        settings: The checked :class:`~spectral_callbacks.settings.OperatorSettings`.
        names: Names of the selected parameters, in model order.
        params: The selected parameters.
        size: Number of selected parameter entries ``n``.
        dtype: Dtype of the vectors ``matmat`` takes and returns.
        product_dtype: The least precise of the parameters' dtypes, which the products are
            computed in (each parameter's piece in its own dtype).
        device: The parameters' device.
        batches: The data, one entry per batch, on :attr:`device`.
        batch_weights: Weight of each batch's term (module docstring).
        distributed: Whether products are summed over the processes of a group.
        held_fixed: Flat indices of the embeddings' padding rows, zeroed in every product's
            vector and result (module docstring).
        num_hvps: Products computed so far (one per vector).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        settings: OperatorSettings,
        distributed: bool = False,
    ) -> None:
        self.model = model
        self.settings = settings
        self.seed = settings.seed
        self.reduction = settings.reduction
        named = select_parameters(model, settings.params)
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        dtypes = {p.dtype for p in self.params}
        if not all(dtype.is_floating_point for dtype in dtypes):
            names = [n for n, p in named if not p.dtype.is_floating_point]
            raise ValueError(
                f"selected parameters must be floating point, got {dtypes} ({names}); "
                "leave the others out with params=..."
            )
        by_precision = sorted(dtypes, key=lambda dtype: torch.finfo(dtype).eps)
        # The least precise dtype sets the roundoff the products are judged by; the vectors
        # hold the most precise one, and at least float32.
        self.product_dtype = by_precision[-1]
        self.dtype = torch.promote_types(by_precision[0], torch.float32)
        self.device = self.params[0].device
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.size = sum(self.numels)
        self.held_fixed = padding_coordinates(model, self.params).to(self.device)
        self.batches = [move_to_device(b, self.device) for b in as_batch_list(data)]
        self.distributed = bool(distributed) and process_group_size() > 1
        #: Whether parameters are sharded by ``fully_shard`` (FSDP2 ``DTensor`` parameters).
        self.sharded = any(local_tensor(p) is not None for p in self.params)
        self.batch_weights = self._batch_weights()
        self.num_hvps = 0
        self._written_state = ModelStateSnapshot(model)

    def _batch_weights(self) -> list[float]:
        """Weight of each batch's term (module docstring)."""
        if self.reduction == "sum":
            return [1.0] * len(self.batches)
        sizes = [(self.settings.batch_size_fn or batch_size)(b) for b in self.batches]
        if any(s < 1 for s in sizes):
            raise ValueError(f"every batch must hold at least one sample, got sizes {sizes}")
        total = float(sum(sizes))
        if self.distributed:  # weights over the union of every process's batches
            count = torch.tensor(total, dtype=torch.float64, device=self.device)
            total = float(self.all_reduce(count))
        return [s / total for s in sizes]

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> CurvatureOperator:
        self._scope = measurement_scope(self.model)
        self._scope.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            self._scope.__exit__(None, None, None)

    def close(self) -> None:
        """Free what the products keep (graphs) and restore every buffer of the model (and
        the parameters its forward pass writes itself)."""
        self.release()
        self._written_state.restore()
        if self.sharded:
            reshard(self.model)

    def release(self) -> None:
        """Free what the products keep between calls (they are rebuilt when needed)."""

    @contextlib.contextmanager
    def moved(self, offset: torch.Tensor) -> Iterator[None]:
        """Inside the block the selected parameters are ``θ + offset`` (a flat vector like
        the products); on exit they are copied back from a saved copy, bit for bit."""
        if self.sharded:
            raise ValueError("moving parameters sharded by fully_shard is not supported")
        saved = [p.detach().clone() for p in self.params]
        pieces = offset.to(self.device).split(self.numels)
        try:
            with torch.no_grad():
                for param, value, piece in zip(self.params, saved, pieces, strict=True):
                    param.data.copy_(value + piece.reshape(value.shape).to(value.dtype))
            self.release()  # what the products keep belongs to θ
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, saved, strict=True):
                    param.data.copy_(value)
            self.release()

    @property
    def hooked_parameters(self) -> list[str]:
        """Names of the selected parameters with gradient hooks (``register_hook``): the
        backward pass runs them, forward-mode products and moved parameters do not."""
        return [n for n, p in zip(self.names, self.params, strict=True) if p._backward_hooks]

    # -- products ------------------------------------------------------------------------------
    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """``A v`` for a flat vector of length ``n``."""
        return self.matmat(vector.unsqueeze(0)).squeeze(0)

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        """``A`` applied to each row of a ``(b, n)`` block; returns ``(b, n)`` in
        :attr:`dtype` (summed over processes when distributed)."""
        if block.ndim != 2 or block.shape[1] != self.size:
            raise ValueError(f"block must have shape (b, {self.size}), got {tuple(block.shape)}")
        block = block.to(dtype=self.dtype, device=self.device)
        self.num_hvps += block.shape[0]
        held = self.held_fixed
        if held.numel():
            block = block.index_fill(1, held, 0.0)
        with autocast_disabled(self.device):
            products = self.reduce_products(self._products(block))
        return products.index_fill(1, held, 0.0) if held.numel() else products

    def _products(self, block: torch.Tensor) -> torch.Tensor:
        """This process's products ``Σ_b w_b A_b V`` for a ``(b, n)`` block in :attr:`dtype`."""
        raise NotImplementedError

    @property
    def product_relative_error(self) -> float:
        """The relative error a product can carry beyond rounding (0 for exact products):
        the eigensolvers confirm residuals near it (:func:`~spectral_callbacks.linalg.lanczos`)."""
        return 0.0

    # -- pieces of a block ---------------------------------------------------------------------
    def split(self, block: torch.Tensor) -> list[torch.Tensor]:
        """Parameter-shaped views ``(b, *shape)`` of a ``(b, n)`` block, each in its
        parameter's dtype."""
        pieces = block.split(self.numels, dim=1)
        return [
            piece.reshape(block.shape[0], *param.shape).to(param.dtype)
            for piece, param in zip(pieces, self.params, strict=True)
        ]

    def flatten(self, pieces: list[torch.Tensor | None], width: int) -> torch.Tensor:
        """A ``(width, n)`` block in :attr:`dtype` from parameter-shaped pieces (``None``: 0;
        sparse ones, the gradients of ``nn.Embedding(sparse=True)``, made dense)."""
        flat = [
            torch.zeros(width, numel, dtype=self.dtype, device=self.device)
            if piece is None
            else dense(piece).reshape(width, numel).to(self.dtype)
            for piece, numel in zip(pieces, self.numels, strict=True)
        ]
        return torch.cat(flat, dim=1)

    # -- processes -----------------------------------------------------------------------------
    def reduce_products(self, products: torch.Tensor) -> torch.Tensor:
        """Products of this process's batches summed over processes; products of sharded
        parameters are whole on every process already (FSDP reduced their gradients)."""
        return products if self.sharded else self.all_reduce(products)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) over processes when distributed; the tensor itself otherwise."""
        if self.distributed:
            reduce_op = (
                torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
            )
            torch.distributed.all_reduce(tensor, op=reduce_op)
        return tensor

    def raise_if_non_finite(self, values: list[torch.Tensor], what: str = "the loss") -> None:
        """Raise :class:`NonFiniteLossError` on every process together if any process has a
        non-finite value (raising on one alone would leave the others in an all-reduce)."""
        bad = [i for i, value in enumerate(values) if not bool(torch.isfinite(value).all())]
        flag = torch.tensor(1.0 if bad else 0.0, dtype=torch.float64, device=self.device)
        if float(self.all_reduce(flag, op="max")) > 0:
            where = f"{what} is not finite on another process"
            if bad:
                entries = values[bad[0]].detach().reshape(-1)
                first = float(entries[~torch.isfinite(entries)][0])
                where = f"{what} is {first} on batch {bad[0]}"
            raise NonFiniteLossError(where)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, parameters={len(self.params)}, "
            f"batches={len(self.batches)}, device={self.device})"
        )


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the strided layout (a sparse gradient of ``nn.Embedding(sparse=True)``
    made dense; others as they are)."""
    return tensor.to_dense() if tensor.layout != torch.strided else tensor

"""Paths ``"forward_over_reverse"`` and ``"compiled"``: ``torch.func.jvp`` of
``torch.func.grad`` of the loss, vmapped over a block of vectors.

Nothing is kept between products: each block re-runs forward and backward. ``"compiled"``
runs the same function under ``torch.compile`` (:mod:`.compiled`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..._names import uncompiled_name
from ..data import fresh_batch
from ..isolation import measurement_context
from .compiled import compiled_block_product

if TYPE_CHECKING:
    from ..hessian import HessianOperator, LossFunction

__all__ = ["DisagreeingProducts", "ForwardOverReverseProducts", "block_product"]


class _LossOfModel(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFunction) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, fresh_batch(batch))


def block_product(model: nn.Module, loss_fn: LossFunction, names: list[str]) -> Callable:
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


#: Per model and (loss, selection, reduction, compiled): the outcome of
#: :meth:`ForwardOverReverseProducts.check_agreement`, ``None`` where the products agreed,
#: else the reason they do not (later operators of the model fall back without computing).
_AGREEMENT: weakref.WeakKeyDictionary[nn.Module, dict[tuple, str | None]] = (
    weakref.WeakKeyDictionary()
)


class DisagreeingProducts(RuntimeError):
    """Forward-over-reverse products differ from double backward's: the model computes
    with parameters ``functional_call`` cannot replace."""


class ForwardOverReverseProducts:
    """Vmapped forward-over-reverse products of ``operator``'s batches, eager or compiled."""

    def __init__(self, operator: HessianOperator, compiled: bool) -> None:
        self.operator = operator
        self.compiled = compiled
        eager = block_product(operator.model, operator.loss_fn, operator.names)
        self.product = (
            compiled_block_product(
                eager, operator.model, operator.loss_fn, operator.names, operator.compile_backend
            )
            if compiled
            else eager
        )

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        op = self.operator
        op.check_finite_losses()
        primals = tuple(p.detach() for p in op.params)  # in the products' dtype
        tangents = tuple(op.split(block))
        total = torch.zeros_like(block)
        for batch, weight in zip(op.batches, op.batch_weights, strict=True):
            with measurement_context(op.model, op.seed):
                products = self.product(primals, tangents, batch)
            total += weight * op.flatten(list(products), block.shape[0])
        return total

    @property
    def _key(self) -> tuple:
        op = self.operator
        return (op.loss_fn, tuple(op.names), op.reduction, self.compiled)

    def checked_against_double_backward(self) -> bool:
        """Whether :meth:`check_agreement` has run for this model, loss, selection and path.

        Raises:
            DisagreeingProducts: Where it found them to disagree (the reason it gave then).
        """
        outcomes = _AGREEMENT.get(self.operator.model, {})
        if self._key not in outcomes:
            return False
        if outcomes[self._key] is not None:
            raise DisagreeingProducts(outcomes[self._key])
        return True

    def check_agreement(
        self,
        vector: torch.Tensor,
        product: torch.Tensor,
        reference: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """This path's ``product`` of ``vector`` (a ``(1, n)`` row it has computed) against
        ``reference(vector)``, double backward's; the outcome is kept per model, loss,
        selection and path. ``functional_call`` replaces registered parameters only; a
        model that computes with others (a ``torch.jit.script`` module, a parameter kept in
        a plain list) would have those terms read as 0, silently.

        Raises:
            DisagreeingProducts: If the two differ beyond rounding (the same decision on
                every process).
        """
        op = self.operator
        mine, theirs = product.detach().double(), reference(vector).detach().double()
        scale = torch.maximum(mine.norm(), theirs.norm()).clamp_min(torch.finfo(torch.float64).tiny)
        difference = ((mine - theirs).norm() / scale).reshape(1)
        difference = float(op.all_reduce(difference, op="max")[0])
        roundoff = torch.finfo(op.product_dtype).eps / 2
        reason = None
        if difference > min(0.1, max(1e4 * roundoff, 1e-10)):
            hooked = op.hooked_parameters
            cause = (
                f"gradient hooks on {hooked} shape the backward pass, which forward-mode "
                "products do not run"
                if hooked
                else "the model computes with parameters that torch.func.functional_call "
                "cannot replace (a parameter kept outside the module's registered ones, such "
                "as in a plain list), so their terms read as 0"
            )
            reason = (
                f"forward-over-reverse products differ from double backward's by "
                f"{difference:.2g} (relative): {cause}; use hvp='reuse_graph' (or 'auto')"
            )
        self.record(reason)
        if reason is not None:
            raise DisagreeingProducts(reason)

    def record(self, reason: str | None) -> None:
        """Keep the outcome of a check for this model, loss, selection and path (``None``:
        agreed, or nothing to compare with)."""
        _AGREEMENT.setdefault(self.operator.model, {})[self._key] = reason

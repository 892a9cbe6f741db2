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
    graph; each product is a backward pass through it
    (:mod:`~spectral_callbacks.curvature.products.reuse_graph`).
``"forward_over_reverse"``
    ``torch.func.jvp`` of ``torch.func.grad`` of the loss, vmapped over a block of vectors;
    nothing is kept between products
    (:mod:`~spectral_callbacks.curvature.products.forward_over_reverse`).
``"compiled"``
    The same vmapped function under ``torch.compile``, compiled once per model, loss,
    parameter selection, block width and batch shape, checked against the eager product and
    eager again if compiling fails (:mod:`~spectral_callbacks.curvature.products.compiled`).
``"gradient_difference"``
    Products from first-order gradients alone, ``(∇L(θ + h v) − ∇L(θ − h v)) / 2h`` with a
    calibrated step and a stated error, for losses without double backward and parameters
    sharded by ``fully_shard`` (:mod:`~spectral_callbacks.curvature.products.gradient_difference`).

``"auto"`` takes ``reuse_graph`` for single vectors (a vmapped block of one is several times
slower) and on the CPU, and ``forward_over_reverse`` for blocks on CUDA, where the block
amortises it below the reused graph's cost per vector (docs/benchmarks.md). Where the
loss has no double backward (and the cause is not attention, which runs on the math kernel)
``auto`` switches to ``gradient_difference`` and warns once.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._checks import check_callable
from ..linalg._precision import autocast_disabled
from ..settings import HVP_PATHS, HvpPath, OperatorSettings, ParameterFilter, Reduction
from .data import fresh_batch, select_parameters
from .first_order import weighted_gradient
from .isolation import measurement_context
from .operator import CurvatureOperator, NonFiniteLossError
from .products import (
    COMPILED_CACHE_SIZE,
    ForwardOverReverseProducts,
    GradientDifferenceProducts,
    NoSecondDerivative,
    ReusedGraphProducts,
    clear_compiled_products,
    explain_second_order_failure,
)
from .sharding import reshard

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

#: ``loss_fn(model, batch) -> scalar tensor`` (the mean loss of the batch).
LossFunction = Callable[[nn.Module, Any], torch.Tensor]

#: model -> the (loss function, parameter names) for which ``auto``'s switch to gradient
#: differences was announced.
_SWITCH_WARNED: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()


class HessianOperator(CurvatureOperator):
    """Exact Hessian of ``loss_fn`` over ``data`` w.r.t. (a subset of) a model's parameters.

    The operator is matrix free: :meth:`matmat` multiplies a ``(b, n)`` block of row vectors
    (``n`` the number of selected parameter entries, flattened in model order). Every forward
    pass runs under :func:`~spectral_callbacks.curvature.isolation.measurement_context` (math
    attention kernel, float32 without autocast, BatchNorm statistics frozen, RNG forked and
    seeded), and :meth:`close` restores every buffer. Use it as a context manager::

        with HessianOperator(model, loss_fn, (x, y)) as H:
            hv = H.matvec(v)

    What it shares with every curvature operator (selection, dtypes, batch weights,
    distributed reduce, lifecycle) is
    :class:`~spectral_callbacks.curvature.operator.CurvatureOperator`'s.

    Args:
        model: The model. Its train/eval modes are used as they are.
        loss_fn: ``loss_fn(model, batch) -> scalar`` loss of a batch, reduced over its samples
            as ``reduction`` says.
        data: One batch, or an iterable of batches (see
            :func:`~spectral_callbacks.curvature.data.as_batch_list`; wrap a list of batches
            in :class:`~spectral_callbacks.curvature.data.Batches` to say it is one); moved
            to the model's device and kept for the operator's lifetime.
        params: Parameter filter (regular expression, predicate, or names / module prefixes);
            default all trainable parameters.
        hvp: ``"auto"``, ``"reuse_graph"``, ``"forward_over_reverse"``, ``"compiled"`` or
            ``"gradient_difference"`` (module docstring).
        batch_size_fn: ``batch -> int`` number of samples, when the first tensor's leading
            dimension is not it (unused with ``reduction="sum"``).
        seed: Seed of the RNG inside forward passes (fixes dropout masks).
        distributed: Under an initialised ``torch.distributed`` process group of several
            processes, make this the Hessian of the union of every process's ``data``: batch
            weights use the global sample count and every product is all-reduced, so all
            processes hold the same operator. Every process must then make the same calls in
            the same order (the solvers do, being deterministic given equal products).
        compile_backend: ``torch.compile`` backend of the ``"compiled"`` path.
        reduction: ``"mean"`` if ``loss_fn`` returns a batch's mean loss (batches weighted by
            size), ``"sum"`` if it returns the sum over the batch's samples (every batch
            weight 1); module docstring.
        richardson: With ``hvp="gradient_difference"``, a Richardson step (four gradients
            per product, error of order ``ε^{4/5}`` instead of ``ε^{2/3}``).

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
            two of the one-time symmetry probe on the first product for a model, loss and
            parameter selection.
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
        settings = OperatorSettings.from_arguments(locals())
        self._build(model, loss_fn, data, settings, distributed)

    @classmethod
    def from_settings(
        cls,
        model: nn.Module,
        loss_fn: LossFunction,
        data: Any,
        settings: OperatorSettings,
        distributed: bool = False,
    ) -> HessianOperator:
        """The operator of checked ``settings`` (what
        :func:`~spectral_callbacks.curvature.curvature_operator` builds)."""
        operator = cls.__new__(cls)
        operator._build(model, loss_fn, data, settings, distributed)
        return operator

    def _build(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        data: Any,
        settings: OperatorSettings,
        distributed: bool,
    ) -> None:
        check_callable("loss_fn", loss_fn, "loss_fn(model, batch) -> scalar", arguments=2)
        super().__init__(model, data, settings, distributed)
        self.loss_fn = loss_fn
        self.hvp = settings.hvp
        self.richardson = settings.richardson
        self.compile_backend = settings.compile_backend
        if self.sharded:
            if self.hvp not in ("auto", "gradient_difference"):
                raise ValueError(
                    f"hvp={self.hvp!r} needs double backward, which parameters sharded by "
                    "fully_shard (FSDP2) do not support: use hvp='gradient_difference' "
                    "(or 'auto')"
                )
            if not self.distributed:
                raise ValueError(
                    "parameters sharded by fully_shard (FSDP2) need distributed=True: the "
                    "operator is then the Hessian of every process's batches together"
                )
        scripted = _scripted_submodules(model)
        if scripted and self.hvp in ("forward_over_reverse", "compiled"):
            raise ValueError(
                f"hvp={self.hvp!r} cannot differentiate through TorchScript modules "
                f"({', '.join(scripted[:3])}: torch.jit.script): torch.func.functional_call "
                "cannot hand them the parameters it differentiates, so their Hessian terms "
                "would be missing; use hvp='reuse_graph' or 'auto'"
            )
        self.checked_finite = False
        self._reused = ReusedGraphProducts(self)
        self._vmapped: dict[bool, ForwardOverReverseProducts] = {}
        self._differences: GradientDifferenceProducts | None = None
        if self.hvp == "gradient_difference" or self.sharded:
            self._switch_to_differences()
        # "auto" keeps TorchScript modules off the forward-over-reverse path (it would read
        # their Hessian terms as 0, silently).
        self._vmap_failed = bool(scripted)

    def _switch_to_differences(self) -> None:
        self._reused.release()
        self._differences = GradientDifferenceProducts(self, self.richardson)

    # -- losses and gradients ------------------------------------------------------------------
    def batch_loss(self, batch: Any) -> torch.Tensor:
        """``loss_fn(model, batch)`` checked to be a scalar that depends on the parameters
        (on a fresh copy of the batch: :func:`~spectral_callbacks.curvature.data.fresh_batch`)."""
        loss = self.loss_fn(self.model, fresh_batch(batch))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor (the mean loss), got {shape}")
        if not loss.requires_grad:
            raise ValueError(
                "loss_fn returned a tensor that does not depend on the selected parameters "
                "(requires_grad=False): was it computed under torch.no_grad() or detached?"
            )
        return loss.reshape(())

    def check_finite_losses(self, math_attention: bool = True) -> None:
        """The loss at ``θ`` on every batch, checked once (all processes together)."""
        if self.checked_finite:
            return
        losses = []
        for batch in self.batches:
            with measurement_context(self.model, self.seed, math_attention=math_attention):
                losses.append(self.batch_loss(batch).detach())
        if self.sharded:
            reshard(self.model)
        self.raise_if_non_finite(losses)
        self.checked_finite = True

    def loss(self) -> float:
        """The dataset loss ``Σ_b w_b L_b`` at the parameters' current values (summed over
        processes when distributed)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch, weight in zip(self.batches, self.batch_weights, strict=True):
            with measurement_context(self.model, self.seed, math_attention=False):
                total += weight * self.batch_loss(batch).detach().double()
        return float(self.reduce_products(total))

    def gradient(self, for_products: bool = False) -> torch.Tensor:
        """The gradient of the dataset loss, ``Σ_b w_b ∇L_b``, flat like the products (summed
        over processes when distributed). Free on the reused-graph path once a product has
        built its first-order graphs; one gradient per batch otherwise. ``for_products``:
        products follow, so on the reused-graph path build those graphs now and read the
        gradient off them."""
        if for_products and self.path_for(1) == "reuse_graph":
            try:
                self._reused.first_order_graphs()
            except NoSecondDerivative as error:
                self._switch_or_raise(error)
        flat = self._reused.gradient()
        if flat is None:
            flat = torch.cat([g.reshape(-1) for g in weighted_gradient(self)])
        return self.reduce_products(flat)

    @property
    def errors_vary_by_direction(self) -> bool:
        """Whether a product's error depends on its vector beyond what
        :attr:`product_relative_error` states: on the gradient-difference path, whose step
        was calibrated along one vector only. The eigensolvers then bound each returned
        pair with :meth:`product_errors_along`."""
        return self._differences is not None and self._differences.step is not None

    def product_errors_along(self, vectors: torch.Tensor) -> torch.Tensor:
        """The estimated error of a gradient-difference product of each row of ``vectors``,
        measured along that row, as a ``(b, n)`` block in :attr:`dtype`
        (:meth:`GradientDifferenceProducts.errors_along`; counted in :attr:`num_hvps` as two
        products per row)."""
        if not self.errors_vary_by_direction:
            raise RuntimeError("product_errors_along is measured on the gradient-difference path")
        self.num_hvps += 2 * vectors.shape[0]
        rows = vectors.to(dtype=self.dtype, device=self.device)
        with autocast_disabled(self.device):
            return self._differences.errors_along(rows)

    def adapt_products(self) -> bool:
        """Re-choose the gradient-difference step for the directions that
        :meth:`product_errors_along` last measured, where their truncation makes their
        eigenvalues' bounds far worse than a shorter step would
        (:meth:`GradientDifferenceProducts.adapt_step`).

        Returns:
            Whether the products changed (the step shortened): the eigensolvers then solve
            once more from the vectors found. False on the exact paths.
        """
        return self._differences is not None and self._differences.adapt_step()

    def release(self) -> None:
        """Free the cached first-order graphs (rebuilt at the next product)."""
        self._reused.release()

    # -- products ------------------------------------------------------------------------------
    @property
    def product_relative_error(self) -> float:
        """The stated relative error of a product: 0 for the exact paths; for gradient
        differences the one measured when the step was chosen, before that the a-priori
        ``ε^{2/3}`` (``ε^{4/5}`` with Richardson)."""
        return 0.0 if self._differences is None else self._differences.relative_error

    def path_for(self, width: int) -> str:
        """The path a block of ``width`` vectors takes now (module docstring)."""
        if self._differences is not None:
            return "gradient_difference"
        if self.hvp in ("reuse_graph", "forward_over_reverse"):
            return self.hvp
        if self._vmap_failed:  # "auto" and "compiled" fall back to the path that always works
            return "reuse_graph"
        if self.hvp == "compiled":
            return "compiled"
        return "forward_over_reverse" if width > 1 and self.device.type == "cuda" else "reuse_graph"

    def _products(self, block: torch.Tensor) -> torch.Tensor:
        try:
            if self.path_for(1) == "reuse_graph":
                # Only the reused graph: the forward-over-reverse paths go through
                # forward-mode AD, which raises for such an op instead of dropping terms.
                self._reused.check_symmetry()
            return self._products_by_path(block)
        except NoSecondDerivative as error:
            self._switch_or_raise(error)
            return self._differences.matmat(block)

    def _switch_or_raise(self, error: NoSecondDerivative) -> None:
        """The loss has no double backward for a reason other than attention (which runs on
        the math kernel): under ``hvp="auto"`` switch to products from gradients alone (and
        say so once per model, loss and selection); under any other path raise why."""
        if self.hvp != "auto":
            raise error.explained from error.original
        self._switch_to_differences()
        told = _SWITCH_WARNED.setdefault(self.model, set())
        if (self.loss_fn, tuple(self.names)) not in told:  # once, not every measurement
            told.add((self.loss_fn, tuple(self.names)))
            warnings.warn(
                f"{error.explained}\nhvp='auto' switches to hvp='gradient_difference' "
                "(products from two gradients each, relative error about "
                f"{self.product_relative_error:.0e}); pass hvp='gradient_difference' to "
                "say so",
                RuntimeWarning,
                stacklevel=4,
            )

    def _products_by_path(self, block: torch.Tensor) -> torch.Tensor:
        path = self.path_for(block.shape[0])
        if path == "gradient_difference":
            return self._differences.matmat(block)
        if path in ("forward_over_reverse", "compiled"):
            compiled = path == "compiled"
            try:
                if compiled not in self._vmapped:
                    vmapped = ForwardOverReverseProducts(self, compiled)
                    # A disagreement found for an earlier operator of the model raises here.
                    if not vmapped.checked_against_double_backward():
                        products = vmapped.matmat(block)
                        self._check_against_double_backward(vmapped, block[:1], products[:1])
                        self._vmapped[compiled] = vmapped
                        return products
                    self._vmapped[compiled] = vmapped
                return self._vmapped[compiled].matmat(block)
            except RuntimeError as error:
                explained = explain_second_order_failure(error)
                if self.hvp == "forward_over_reverse":
                    if explained is not None:
                        raise explained from error
                    if "would mutate a captured Tensor" in str(error):
                        raise RuntimeError(
                            f"{error}\nThe loss changes a tensor in place that it did not "
                            "create (a torchmetrics metric updated in training_step, a "
                            "counter), which forward-mode products cannot run. Pass a loss_fn "
                            "that only computes the loss, or use hvp='reuse_graph' or 'auto'."
                        ) from error
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
        return self._reused.matmat(block)

    def _check_against_double_backward(
        self, vmapped: ForwardOverReverseProducts, vector: torch.Tensor, product: torch.Tensor
    ) -> None:
        """``vmapped``'s first ``product`` against the reused graph's product of its
        ``vector`` (not counted), where double backward works: else there is nothing to
        compare with and the vmapped path stands alone."""
        try:
            self._reused.check_symmetry()
            vmapped.check_agreement(vector, product, self._reused.matmat)
        except NoSecondDerivative:
            vmapped.record(None)  # nothing to compare with: not tried again
        finally:
            self._reused.release()  # the vmapped path keeps no graph; neither does the check

    def __repr__(self) -> str:
        return (
            f"HessianOperator(size={self.size}, parameters={len(self.params)}, "
            f"batches={len(self.batches)}, hvp={self.hvp!r}, device={self.device})"
        )


def _scripted_submodules(model: nn.Module) -> list[str]:
    """Names of the ``torch.jit.script`` modules in ``model`` ("the model" for itself)."""
    scripted = torch.jit.RecursiveScriptModule
    return [name or "the model" for name, m in model.named_modules() if isinstance(m, scripted)]


def flat_size(model: nn.Module, params: ParameterFilter = None) -> int:
    """Number of entries of the parameters ``params`` selects (the Hessian's dimension)."""
    return sum(p.numel() for _, p in select_parameters(model, params))

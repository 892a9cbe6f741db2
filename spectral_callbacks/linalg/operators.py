"""The symmetric-operator protocol the eigensolvers work on, and two explicit operators.

Every solver in :mod:`spectral_callbacks.linalg` sees a matrix only through products with
blocks of vectors. A block of ``b`` vectors of length ``n`` is stored as the *rows* of a
``(b, n)`` tensor: rows are contiguous, so one row splits into parameter-shaped views without
copies, and ``torch.func.vmap`` maps over dimension 0.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["DenseOperator", "DerivedOperator", "ScaledOperator", "SymmetricOperator"]


@runtime_checkable
class SymmetricOperator(Protocol):
    """A symmetric linear map ``A`` on ``R^n`` known through products with vectors.

    Attributes:
        size: The dimension ``n``.
        dtype: The floating dtype of the vectors ``matmat`` takes and returns.
        device: The device of those vectors.

    Optionally, for operators whose products are less exact than ``dtype`` suggests (read
    by the solvers' convergence test): ``product_dtype``, the dtype the products are
    computed in, and ``product_relative_error``, the relative error of one product beyond
    its rounding (a finite difference's truncation, say). Where that error depends on the
    vector, ``errors_vary_by_direction`` is true and ``product_errors_along(vectors)`` gives
    an estimate of each row's product error (a ``(b, n)`` block, counted as two products
    per row by the operator and the solvers alike; an infinite row for a direction the
    products cannot resolve): the solvers then bound each returned pair ``(λ, v)`` by
    ``‖δ(v)‖ / ‖v‖ ≥ |vᵀ δ(v)| / ‖v‖²`` (infinite where that is not finite). And where
    ``adapt_products()`` re-tunes the products to the errors measured there (returning
    True), a solve whose pairs missed the tolerance runs once more from its vectors.
    """

    size: int
    dtype: torch.dtype
    device: torch.device

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        """Return ``block @ A`` for a ``(b, n)`` block of row vectors (``A`` is symmetric)."""
        ...


class DenseOperator:
    """An explicit symmetric matrix as a :class:`SymmetricOperator`.

    Args:
        matrix: A square symmetric ``(n, n)`` tensor. Symmetry is checked to a relative
            tolerance of ``1e-6`` (in the Frobenius norm) because the solvers assume it.

    Raises:
        ValueError: If ``matrix`` is not square or not symmetric.
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square (n, n), got shape {tuple(matrix.shape)}")
        asym = torch.linalg.matrix_norm(matrix - matrix.T)
        scale = torch.linalg.matrix_norm(matrix).clamp_min(torch.finfo(matrix.dtype).tiny)
        if float(asym / scale) > 1e-6:
            raise ValueError(
                f"matrix must be symmetric; relative asymmetry {float(asym / scale):.2e}"
            )
        self.matrix = matrix
        self.size = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.num_matvecs = 0

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        """Return ``block @ A`` for a ``(b, n)`` block."""
        self.num_matvecs += block.shape[0]
        return block @ self.matrix

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """Return ``A v`` for a vector of length ``n``."""
        return self.matmat(vector.unsqueeze(0)).squeeze(0)


class DerivedOperator:
    """Base of an operator built on another: the same ``size``, ``dtype`` and ``device``, and
    what the solvers' convergence test reads of the products' accuracy, read from the inner
    operator when asked (its stated error is measured at its first product):
    ``product_dtype`` and ``product_relative_error``.

    A subclass of the form ``M A M`` (plus terms computed exactly) for a symmetric ``M``
    sets ``congruent = True`` and defines :meth:`congruence` (``block ↦ block M``); the
    inner operator's per-direction product errors then carry through it
    (``δ(v) = M δ_A(M v)``), so ``errors_vary_by_direction`` and ``product_errors_along``
    hold for it too.
    """

    #: Whether this operator is ``M A M`` (plus exact terms) for :meth:`congruence`'s ``M``.
    congruent: bool = False

    def __init__(self, operator: SymmetricOperator) -> None:
        self.operator = operator
        self.size = operator.size
        self.dtype = operator.dtype
        self.device = operator.device

    @property
    def product_dtype(self) -> torch.dtype:
        """The dtype the inner operator computes its products in."""
        return getattr(self.operator, "product_dtype", self.operator.dtype)

    @property
    def product_relative_error(self) -> float:
        """The inner operator's stated relative error of a product, as it stands now."""
        return float(getattr(self.operator, "product_relative_error", 0.0))

    @property
    def errors_vary_by_direction(self) -> bool:
        """Whether the inner operator's product errors depend on the vector and carry through
        this operator (``congruent``)."""
        return self.congruent and bool(getattr(self.operator, "errors_vary_by_direction", False))

    def congruence(self, block: torch.Tensor) -> torch.Tensor:
        """Return ``block M`` for a ``(b, n)`` block, where this operator is ``M A M``."""
        raise NotImplementedError(f"{type(self).__name__} is not of the form M A M")

    def product_errors_along(self, vectors: torch.Tensor) -> torch.Tensor:
        """The estimated product error of each row ``v``, ``M δ_A(M v)``, from the inner
        operator's (``(b, n)``; only where ``errors_vary_by_direction``)."""
        inner = self.operator.product_errors_along(self.congruence(vectors))
        return self.congruence(inner.to(dtype=self.dtype, device=self.device))

    def adapt_products(self) -> bool:
        """The inner operator's ``adapt_products`` where errors carry through
        (``congruent``); else False."""
        adapt = getattr(self.operator, "adapt_products", None)
        return self.congruent and adapt is not None and bool(adapt())


class ScaledOperator(DerivedOperator):
    """The symmetric product ``D^½ (A + diag(w)) D^½`` of an operator with a diagonal ``D ≥ 0``.

    ``D^½ A D^½`` has the eigenvalues of ``D A`` (a similarity transform of it), which is the
    matrix that governs a preconditioned gradient step ``θ ← θ - D ∇L``; ``w`` adds a
    diagonal (L2 weight decay enters the gradient as ``w ⊙ θ``).

    Args:
        operator: The symmetric operator ``A``.
        diagonal: The diagonal of ``D`` as a length-``n`` tensor of non-negative values.
        shift: Optional diagonal ``w`` added to ``A`` (length ``n``).
    """

    congruent = True

    def __init__(
        self, operator: SymmetricOperator, diagonal: torch.Tensor, shift: torch.Tensor | None = None
    ) -> None:
        if diagonal.shape != (operator.size,):
            raise ValueError(
                f"diagonal must have shape ({operator.size},), got {tuple(diagonal.shape)}"
            )
        if bool((diagonal < 0).any()) or not bool(torch.isfinite(diagonal).all()):
            raise ValueError("diagonal must be finite and non-negative")
        if shift is not None and shift.shape != (operator.size,):
            raise ValueError(f"shift must have shape ({operator.size},), got {tuple(shift.shape)}")
        super().__init__(operator)
        self.sqrt_diagonal = diagonal.to(dtype=operator.dtype, device=operator.device).sqrt()
        self.shift = (
            None if shift is None else shift.to(dtype=operator.dtype, device=operator.device)
        )

    def congruence(self, block: torch.Tensor) -> torch.Tensor:
        """Return ``block D^½`` for a ``(b, n)`` block."""
        return block * self.sqrt_diagonal

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        """Return ``block D^½ (A + diag(w)) D^½`` for a ``(b, n)`` block."""
        scaled = self.congruence(block)
        product = self.operator.matmat(scaled)
        if self.shift is not None:
            product = product + scaled * self.shift
        return self.congruence(product)

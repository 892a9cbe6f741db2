"""Krylov recurrences shared by the eigensolvers and stochastic Lanczos quadrature.

Three recurrences live here. Every decision inside a step (breakdown, restart) is taken
with tensor masks (``torch.where``), so a step is a fixed sequence of kernels; the
single-vector recurrences never synchronise with the host, the block one only inside its
``p × p`` SVD (see :class:`BlockLanczos`). The solvers read the tridiagonal coefficients
back to the host only when they check convergence.

* :class:`IndependentLanczos` runs ``b`` independent single-vector Lanczos recurrences that
  share one operator product per step (``b = 1`` for the eigensolver, ``b = num_probes`` for
  quadrature). With ``b = 1`` it can shrink its basis to chosen Ritz vectors and go on
  (:meth:`IndependentLanczos.thick_restart`), which bounds the eigensolver's memory.
* :class:`BlockLanczos` runs one block Lanczos recurrence on a block of ``p`` vectors.
* :class:`ThreeTermLanczos` is :class:`IndependentLanczos` keeping two basis vectors instead
  of all: for quadrature on large operators, where the whole basis would not fit.

The first two reorthogonalise fully: classical Gram-Schmidt applied twice ("CGS2"), written
as batched matrix products so it runs at memory bandwidth.

Every recurrence runs on the operator times a power of two (:class:`ProductScale`), chosen
from the first product so that its largest entry is about 1, and hands its coefficients back
divided by it, in float64: norms are sums of squares, which in float32 overflow for an
operator of scale 1e19 and underflow below 1e-19 (a loss multiplied by 1e20 or 1e-25).
"""

from __future__ import annotations

import math

import torch

from .operators import SymmetricOperator

#: A new Lanczos direction whose norm (after one projection pass) falls below this multiple
#: of machine epsilon times the operator's running scale is treated as a breakdown: the
#: Krylov space is invariant, the coupling coefficient is set to exactly zero and the
#: recurrence restarts from a random vector orthogonal to everything seen so far.
BREAKDOWN_EPS_FACTOR = 100.0


def breakdown_tolerance(dtype: torch.dtype) -> float:
    """Relative size under which a new Krylov direction counts as a breakdown."""
    return BREAKDOWN_EPS_FACTOR * torch.finfo(dtype).eps


class ProductScale:
    """The power of two ``c`` a recurrence multiplies every product by (module docstring).

    Chosen on the device from the first product ``W``: ``c = 2^-round(log2 max|W|)``, kept
    within the exponent range of the vectors' dtype (1 for a zero or non-finite product).
    Multiplying by a power of two is exact, so the recurrence sees ``c A`` exactly; its
    eigenvalues and residuals are divided by ``c`` on the host.
    """

    def __init__(self) -> None:
        self.factor: torch.Tensor | None = None

    def apply(self, products: torch.Tensor) -> torch.Tensor:
        """``c · products``; the first call chooses ``c`` (no host synchronisation)."""
        if self.factor is None:
            info = torch.finfo(products.dtype)
            peak = products.detach().abs().amax()
            usable = torch.isfinite(peak) & (peak > 0)
            exponent = torch.round(torch.log2(torch.where(usable, peak, torch.ones_like(peak))))
            exponent = exponent.clamp(math.log2(info.tiny) + 1, math.log2(info.max) - 1)
            self.factor = torch.exp2(-exponent)
        return products * self.factor

    def scale(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Float64 coefficients of ``A`` (on the factor's device) as those of ``c A``."""
        if self.factor is None:
            return coefficients
        return coefficients * self.factor.to(coefficients.dtype)

    def unscale(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Float64 coefficients of ``c A`` as those of ``A``."""
        if self.factor is None:
            return coefficients
        return coefficients / self.factor.to(coefficients.dtype)


def _grow(buffer: torch.Tensor, dim: int, needed: int, limit: int) -> torch.Tensor:
    """Return ``buffer`` with at least ``needed`` slots along ``dim`` (doubling, capped)."""
    size = buffer.shape[dim]
    if needed <= size:
        return buffer
    new_size = min(max(needed, 2 * size), limit)
    shape = list(buffer.shape)
    shape[dim] = new_size
    grown = buffer.new_zeros(shape)
    grown.narrow(dim, 0, size).copy_(buffer)
    return grown


class _IndependentRecurrences:
    """What :class:`IndependentLanczos` and :class:`ThreeTermLanczos` share: ``b`` processes,
    float64 coefficients, the breakdown test and the restart candidates. A subclass says how
    many steps its buffers hold at first (:meth:`_capacity`) and sets up its basis
    (:meth:`_begin`)."""

    def __init__(
        self,
        operator: SymmetricOperator,
        start: torch.Tensor,
        max_steps: int,
        generator: torch.Generator,
        preallocate: bool = False,
    ) -> None:
        capacity = self._capacity(max_steps, preallocate)
        self.operator = operator
        self.max_steps = max_steps
        self.width = start.shape[0]
        self.alpha = torch.zeros(self.width, capacity, dtype=torch.float64, device=start.device)
        self.beta = torch.zeros(self.width, capacity, dtype=torch.float64, device=start.device)
        self.scale = torch.zeros(self.width, dtype=start.dtype, device=start.device)
        self.tolerance = breakdown_tolerance(start.dtype)
        # Restart candidates: cyclic shifts of one random block, by the step index. Distinct
        # shifts of a Gaussian vector are almost surely linearly independent, so a second
        # breakdown never reuses a direction already in the basis, and a shift costs a copy
        # where a fresh randn per step cost ~5x more on a CPU.
        restart = torch.randn(
            start.shape, generator=generator, dtype=start.dtype, device=start.device
        )
        self._restart_seed = restart / restart.norm(dim=1, keepdim=True)
        self.steps = 0
        # Steps ever taken; differs from ``steps`` (the basis position) after a thick restart.
        self.products = 0
        self.product_scale = ProductScale()
        self._begin(start / start.norm(dim=1, keepdim=True), capacity)

    def _capacity(self, max_steps: int, preallocate: bool) -> int:
        """Steps the coefficient buffers hold at first."""
        return max_steps

    def _begin(self, start: torch.Tensor, capacity: int) -> None:
        """Set up the basis storage from the normalised ``(b, n)`` start vectors."""
        raise NotImplementedError

    def _broken(self, alpha: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """Which processes broke down: a new direction negligible at the operator's scale."""
        self.scale = torch.maximum(self.scale, torch.maximum(alpha.abs(), norm))
        return norm <= self.tolerance * self.scale

    def _record(self, alpha: torch.Tensor, norm: torch.Tensor, broken: torch.Tensor) -> None:
        """Store step ``j``'s coefficients; a breakdown's coupling is exactly zero."""
        j = self.steps
        self.alpha[:, j] = alpha.to(torch.float64)
        self.beta[:, j] = torch.where(broken, torch.zeros_like(norm), norm).to(torch.float64)
        self.steps = j + 1
        self.products += 1

    def tridiagonal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(alpha, beta)`` on the host: ``(b, m)`` diagonals and ``(b, m)`` couplings.

        ``beta[:, m-1]`` couples the basis to the next, not yet used, direction; it is the
        factor of the Ritz residuals. This is the only host transfer of the recurrence.
        """
        m = self.steps
        coefficients = torch.stack([self.alpha[:, :m], self.beta[:, :m]])
        coefficients = self.product_scale.unscale(coefficients).cpu()
        return coefficients[0], coefficients[1]


class IndependentLanczos(_IndependentRecurrences):
    """``b`` independent Lanczos recurrences ``A q_j = β_{j-1} q_{j-1} + α_j q_j + β_j q_{j+1}``.

    Column ``c`` of the state is a single-vector Lanczos process started from row ``c`` of
    ``start``; the processes share each operator product (one ``matmat`` of ``b`` rows per
    step) but are otherwise unrelated. The tridiagonal coefficients are kept in float64.

    On breakdown (the new direction vanishes: the Krylov space is invariant) the coupling
    ``β_j`` is set to exactly zero and the process continues from a random vector
    orthogonal to its basis, so the tridiagonal matrix becomes block diagonal and stays the
    exact projection ``Qᵀ A Q``.

    Args:
        operator: The symmetric operator.
        start: ``(b, n)`` start vectors (normalised here).
        max_steps: Upper bound on the number of steps (sets the basis capacity limit).
        generator: Random generator for the restart vectors, on the operator's device.
        preallocate: Allocate the basis for ``max_steps`` at once (for a known number of
            steps: growing by doubling holds the old and the new buffer at the same time).
    """

    def _capacity(self, max_steps: int, preallocate: bool) -> int:
        return max_steps + 1 if preallocate else min(max_steps + 1, 32)

    def _begin(self, start: torch.Tensor, capacity: int) -> None:
        # Layout (b, step, n): each process's basis is a contiguous (steps, n) matrix, so
        # the projections below are plain batched matrix products without copies.
        self.basis = start.new_zeros(self.width, capacity, start.shape[1])
        self.basis[:, 0] = start
        # After a thick restart: the couplings ``β_m s_{m,i}`` of the kept Ritz vectors
        # (basis rows ``0..l-1``) to basis row ``l``, on the host in float64.
        self.arrow = torch.zeros(0, dtype=torch.float64)

    def step(self) -> None:
        """Advance every process by one Lanczos step (one operator product each)."""
        j = self.steps
        self.basis = _grow(self.basis, 1, j + 2, self.max_steps + 1)
        self.alpha = _grow(self.alpha, 1, j + 1, self.max_steps + 1)
        self.beta = _grow(self.beta, 1, j + 1, self.max_steps + 1)
        q = self.basis[:, j]
        w = self.product_scale.apply(self.operator.matmat(q))
        alpha = (q * w).sum(dim=1)
        basis = self.basis[:, : j + 1]
        # Full reorthogonalisation subsumes the three-term recurrence: the projection onto
        # q_j and q_{j-1} removes alpha_j q_j and beta_{j-1} q_{j-1}.
        w = w - torch.bmm(torch.bmm(basis, w.unsqueeze(2)).transpose(1, 2), basis).squeeze(1)
        broken = self._broken(alpha, w.norm(dim=1))
        restart = torch.roll(self._restart_seed, shifts=self.products, dims=1)
        # Second Gram-Schmidt pass: for w it restores orthogonality lost to cancellation; for
        # a restart vector it is the one pass a random vector needs.
        w = torch.where(broken.unsqueeze(1), restart, w)
        w = w - torch.bmm(torch.bmm(basis, w.unsqueeze(2)).transpose(1, 2), basis).squeeze(1)
        norm2 = w.norm(dim=1)
        self._record(alpha, norm2, broken)
        self.basis[:, j + 1] = w / norm2.unsqueeze(1)

    def projected_matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``T = Qᵀ A Q`` (``m × m``) and the residual coupling ``β_m``, on the host.

        For one process (``b = 1``). ``T`` is tridiagonal, bordered after a thick restart by
        the arrow that couples the kept Ritz vectors to the direction after them; in either
        case ``A Q = Q T + β_m q_{m+1} e_mᵀ``, so the Ritz residuals are ``|β_m s_{m,i}|``.
        """
        alpha, beta = self.tridiagonal()
        projected = tridiagonal_matrix(alpha[0], beta[0])
        kept = self.arrow.shape[0]
        if kept:
            projected[:kept, kept] = self.arrow
            projected[kept, :kept] = self.arrow
        return projected, beta[0, -1]

    def thick_restart(
        self, ritz_vectors: torch.Tensor, ritz_values: torch.Tensor, coupling: torch.Tensor
    ) -> None:
        """Shrink the basis to ``l`` Ritz vectors and the next direction (Wu & Simon 2000).

        For one process (``b = 1``), at a convergence check. With ``T = S Θ Sᵀ`` and ``C``
        the ``l`` columns of ``S`` kept (``ritz_vectors``, ``m × l``, float64, with their
        ``ritz_values`` and the residual coupling ``β_m`` from :meth:`projected_matrix`,
        all on the host, so a restart adds no synchronisation to its check), the Ritz
        vectors ``Y = Q C`` satisfy ``A Y = Y Θ_C + β_m q_{m+1} (e_mᵀ C)``: in the basis
        ``[Y, q_{m+1}]`` the projected matrix is ``diag(Θ_C)`` bordered by the arrow
        ``β_m e_mᵀ C``, and the recurrence goes on from ``q_{m+1}`` unchanged (full
        reorthogonalisation against ``Y`` supplies the arrow's terms). ``Y`` overwrites the
        basis column chunk by column chunk, so the restart needs about one vector of
        scratch memory.
        """
        m = self.steps
        kept = ritz_vectors.shape[1]
        if self.width != 1 or ritz_vectors.shape[0] != m or not 0 < kept < m:
            raise ValueError(f"a thick restart keeps 0 < l < {m} Ritz vectors of one process")
        basis = self.basis[0]
        combination = ritz_vectors.T.to(dtype=basis.dtype, device=basis.device)
        n = basis.shape[1]
        chunk = -(-n // kept)
        for first in range(0, n, chunk):
            columns = basis[:, first : first + chunk]
            columns[:kept] = combination @ columns[:m]
        basis[kept] = basis[m]
        self.arrow = coupling * ritz_vectors[m - 1]
        # The buffers hold the coefficients of the scaled operator (ProductScale).
        self.alpha[0, :kept] = self.product_scale.scale(ritz_values.to(self.alpha.device))
        self.beta[0, :kept] = 0.0
        self.steps = kept


class ThreeTermLanczos(_IndependentRecurrences):
    """``b`` independent Lanczos recurrences that keep only their last two basis vectors.

    Memory is ``3 b n`` entries instead of the ``b (m + 1) n`` of
    :class:`IndependentLanczos`. Each new direction is orthogonalised against the two
    vectors kept, twice (local reorthogonalisation), not against the whole basis, so
    orthogonality is lost once Ritz values converge and the tridiagonal gains copies
    ("ghosts") of converged extreme eigenvalues. For quadrature that is harmless: the
    finite-precision recurrence is an exact one for a matrix whose eigenvalues cluster at
    the true ones (Greenbaum 1989), so the Gauss rule still integrates the spectral measure
    (Chen, Trogdon & Ubaru 2021 analyse SLQ in exactly this setting). On breakdown the
    process restarts from a random vector orthogonal to the two kept vectors only.

    Args:
        operator: The symmetric operator.
        start: ``(b, n)`` start vectors (normalised here).
        max_steps: Number of steps the coefficient buffers hold.
        generator: Random generator for the restart vectors, on the operator's device.
        preallocate: No effect: the coefficient buffers always hold ``max_steps`` steps and
            there is no basis to grow.
    """

    def _begin(self, start: torch.Tensor, capacity: int) -> None:
        self.current = start
        self.previous = torch.zeros_like(start)

    def _project_out_kept(self, w: torch.Tensor) -> torch.Tensor:
        for vector in (self.current, self.previous):
            w = w - (vector * w).sum(dim=1, keepdim=True) * vector
        return w

    def step(self) -> None:
        """Advance every process by one Lanczos step (one operator product each)."""
        q = self.current
        w = self.product_scale.apply(self.operator.matmat(q))
        alpha = (q * w).sum(dim=1)
        # Two passes against q_j and q_{j-1}: the first is the three-term recurrence itself.
        w = self._project_out_kept(self._project_out_kept(w))
        broken = self._broken(alpha, w.norm(dim=1))
        restart = self._project_out_kept(
            torch.roll(self._restart_seed, shifts=self.products, dims=1)
        )
        w = torch.where(broken.unsqueeze(1), restart, w)
        norm2 = w.norm(dim=1)
        self._record(alpha, norm2, broken)
        self.previous, self.current = q, w / norm2.unsqueeze(1)


def tridiagonal_matrix(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Dense ``(m, m)`` symmetric tridiagonal matrix with diagonal ``alpha`` and off-diagonal
    ``beta[:m-1]`` (``beta[m-1]``, the residual coupling, is not part of the matrix)."""
    m = alpha.shape[-1]
    off = beta[..., : m - 1]
    return torch.diag_embed(alpha) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)


class BlockLanczos:
    """Block Lanczos with full reorthogonalisation.

    The recurrence is ``A Q_j = Q_{j-1} B_{j-1}ᵀ + Q_j A_j + Q_{j+1} B_j``.

    Each step applies the operator to a block of ``p`` orthonormal vectors (one ``matmat``),
    so the operator can batch the ``p`` products. Blocks are stored as rows. New blocks are
    orthonormalised twice by a rank-revealing QR (Householder QR, then the SVD of the small
    triangular factor): a direction whose singular value falls below
    the breakdown tolerance is replaced by a random direction orthogonal to the basis and
    its coupling is set to exactly zero. The decision is a tensor mask, but the ``p × p``
    SVD itself checks its result on the host, so on CUDA each block step synchronises once
    (a small cost next to ``p`` Hessian-vector products).

    The projected matrix ``T = Qᵀ A Q`` is block tridiagonal with diagonal blocks ``A_j`` and
    sub-diagonal blocks ``B_j``; both are kept in float64.

    Args:
        operator: The symmetric operator.
        start: ``(p, n)`` start block (orthonormalised here).
        max_blocks: Upper bound on the number of steps.
        generator: Random generator for replacement directions.
    """

    def __init__(
        self,
        operator: SymmetricOperator,
        start: torch.Tensor,
        max_blocks: int,
        generator: torch.Generator,
    ) -> None:
        self.operator = operator
        self.generator = generator
        p, n = start.shape
        self.block_size = p
        self.max_rows = (max_blocks + 1) * p
        self.basis = start.new_zeros(min(self.max_rows, 8 * p), n)
        self.tolerance = breakdown_tolerance(start.dtype)
        self.scale = torch.zeros((), dtype=start.dtype, device=start.device)
        block, _ = self._orthonormalise(start, self.basis[:0])
        self.basis[:p] = block
        self.diagonal_blocks: list[torch.Tensor] = []
        self.coupling_blocks: list[torch.Tensor] = []
        self.steps = 0
        self.product_scale = ProductScale()

    def _random_rows(self, like: torch.Tensor) -> torch.Tensor:
        rows = torch.randn(
            like.shape, generator=self.generator, dtype=like.dtype, device=like.device
        )
        return rows / rows.norm(dim=1, keepdim=True)

    def _orthonormal_rows(
        self, rows: torch.Tensor, reference: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-revealing orthonormalisation: ``rows = Cᵀ Q`` with ``Q`` orthonormal rows.

        Householder QR of ``rowsᵀ = Q_h R`` is backward stable, and the SVD of the small
        factor ``R = U S Vᵀ`` reveals the rank to working precision (a Gram-matrix method
        would square the condition number). Then ``Q = (Q_h U)ᵀ`` and ``C = S Vᵀ``.
        Directions with singular value at most ``tolerance * reference`` are rank deficient:
        their rows of ``C`` are zero and their rows of ``Q`` are random unit vectors.
        """
        householder, factor = torch.linalg.qr(rows.T)
        left, singular, right_t = torch.linalg.svd(factor.to(torch.float64))
        keep = singular > self.tolerance * reference.to(torch.float64)
        orthonormal = (householder @ left.to(rows.dtype)).T
        orthonormal = torch.where(keep.unsqueeze(1), orthonormal, self._random_rows(orthonormal))
        coefficients = torch.where(keep.unsqueeze(1), singular.unsqueeze(1) * right_t, 0.0)
        return orthonormal, coefficients

    @staticmethod
    def _project_out(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        return rows - (rows @ basis.T) @ basis

    def _orthonormalise(
        self, rows: torch.Tensor, basis: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``Q`` orthonormal to ``basis`` and ``C`` with ``(I - P_basis) rows = Cᵀ Q``."""
        rows = self._project_out(self._project_out(rows, basis), basis)
        self.scale = torch.maximum(self.scale, rows.norm(dim=1).max())
        block, coefficients = self._orthonormal_rows(rows, self.scale)
        # Second pass: random replacement rows still need projecting out. The rows are unit
        # vectors now, so rank is judged relative to 1.
        block = self._project_out(self._project_out(block, basis), basis)
        block, correction = self._orthonormal_rows(block, torch.ones_like(self.scale))
        return block, correction @ coefficients

    def step(self) -> None:
        """One block step: ``p`` operator products."""
        p = self.block_size
        j = self.steps
        self.basis = _grow(self.basis, 0, (j + 2) * p, self.max_rows)
        block = self.basis[j * p : (j + 1) * p]
        w = self.product_scale.apply(self.operator.matmat(block))
        diagonal = (block @ w.T).to(torch.float64)
        diagonal = 0.5 * (diagonal + diagonal.T)
        self.scale = torch.maximum(self.scale, diagonal.abs().max().to(self.scale.dtype))
        # A non-finite product reaches the host through ``diagonal`` at the next check; the
        # decompositions below need finite input, so they see zeros instead.
        w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
        new_block, coupling = self._orthonormalise(w, self.basis[: (j + 1) * p])
        self.basis[(j + 1) * p : (j + 2) * p] = new_block
        self.diagonal_blocks.append(diagonal)
        self.coupling_blocks.append(coupling)
        self.steps = j + 1

    def projected_matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``T`` (mp × mp) and the last coupling block ``B_m`` on the host, in float64."""
        p, m = self.block_size, self.steps
        blocks = torch.stack(self.diagonal_blocks + self.coupling_blocks)
        blocks = self.product_scale.unscale(blocks).cpu()
        diagonal, coupling = blocks[:m], blocks[m:]
        projected = torch.zeros(m * p, m * p, dtype=torch.float64)
        for j in range(m):
            projected[j * p : (j + 1) * p, j * p : (j + 1) * p] = diagonal[j]
            if j + 1 < m:
                projected[(j + 1) * p : (j + 2) * p, j * p : (j + 1) * p] = coupling[j]
                projected[j * p : (j + 1) * p, (j + 1) * p : (j + 2) * p] = coupling[j].T
        return projected, coupling[m - 1]

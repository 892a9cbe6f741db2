"""Independent float64 references: dense Hessians and Gauss–Newton matrices from
``torch.func`` or row-by-row double backward, matrices of a given spectrum, and a dense
operator whose products carry a known error."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from spectral_callbacks.linalg import DenseOperator


def matrix_with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(λ) Qᵀ with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = (q * eigenvalues.double()) @ q.T
    return 0.5 * (a + a.T)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def dense_hessian_func(model: nn.Module, loss_fn, batches, reduction="mean") -> torch.Tensor:
    """Σ_b (n_b/N) ∇²L_b (``reduction="sum"``: Σ_b ∇²L_b) by torch.func.hessian of a
    flat-parameter function (no BatchNorm)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    theta = flat_parameters(model)
    total = sum(b[0].shape[0] for b in batches) if reduction == "mean" else None

    def weight(batch) -> float:
        return 1.0 if total is None else batch[0].shape[0] / total

    def loss_of(flat, batch):
        values, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = shape.numel()
            values[name] = flat[offset : offset + size].reshape(shape)
            offset += size
        return loss_fn(_Reparametrised(model, values), batch)

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return sum(weight(b) * torch.func.hessian(loss_of)(theta, b) for b in batches)


class _Reparametrised(nn.Module):
    def __init__(self, model, values):
        super().__init__()
        self.model, self.values = model, values

    def forward(self, x):
        return torch.func.functional_call(self.model, self.values, (x,))


def dense_hessian_rows(model: nn.Module, loss_fn, batches) -> torch.Tensor:
    """Σ_b (n_b/N) ∇²L_b row by row with plain double backward, on a deep copy of the model."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    total = sum(b[0].shape[0] for b in batches)
    hessian = torch.zeros(n, n, dtype=torch.float64)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), params, create_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            rows = [
                torch.cat(
                    [r.reshape(-1) for r in torch.autograd.grad(flat[i], params, retain_graph=True)]
                )
                for i in range(n)
            ]
            hessian += (batch[0].shape[0] / total) * torch.stack(rows).double()
    return 0.5 * (hessian + hessian.T)


def dense_ggn(model, batches, loss: str) -> torch.Tensor:
    """Σ_b (n_b/N) J_bᵀ H_out,b J_b with J from jacrev of a flat-parameter function."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = flat_parameters(model)
    total = sum(b[0].shape[0] for b in batches)

    def outputs_of(flat, x):
        values, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            values[name] = flat[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return torch.func.functional_call(model, values, (x,))

    result = 0
    for x, y in batches:
        f = outputs_of(theta, x)
        jacobian = torch.func.jacrev(outputs_of)(theta, x).reshape(f.numel(), -1)

        def loss_of(out, y=y, shape=f.shape):
            if loss == "cross_entropy":
                return F.cross_entropy(out.reshape(shape), y)
            if loss == "mse":
                return F.mse_loss(out.reshape(shape), y)
            return F.binary_cross_entropy_with_logits(out.reshape(shape), y)

        h_out = torch.func.hessian(loss_of)(f.reshape(-1))
        result = result + (x.shape[0] / total) * jacobian.T @ h_out @ jacobian
    return result


def assert_within_stated_bounds(result, exact: torch.Tensor, tol: float, slack: float = 0.0):
    """Every pair the result flags converged lies within its stated error bound of the exact
    eigenvalue (``exact`` in the result's order), and that bound within ``tol·|θ|``;
    ``slack`` (relative to the largest |λ|) covers rounding the bound cannot see."""
    scale = float(exact.abs().max())
    # An eigenvalue zero to float64 precision converges with a bound at that precision.
    zero = 1e-13 * scale
    values, errors = result.eigenvalues, result.errors
    for flag, value, error, truth in zip(result.converged, values, errors, exact, strict=True):
        if flag:
            bound = max(tol * abs(float(value)) * (1 + 1e-12), zero)
            assert float(error) <= bound, (error, value, tol)
            assert abs(float(value) - float(truth)) <= float(error) + slack * scale, (
                float(value),
                float(truth),
                float(error),
            )


class InexactDense(DenseOperator):
    """``A + E`` for a fixed symmetric ``E`` of norm ``δ ‖A‖``, stating ``δ`` as its products'
    relative error: every eigenvalue of the products is within ``δ ‖A‖`` of ``A``'s."""

    def __init__(self, matrix: torch.Tensor, relative_error: float, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(matrix.shape, generator=g, dtype=matrix.dtype)
        noise = noise + noise.T
        scale = float(torch.linalg.matrix_norm(matrix, ord=2))
        noise *= relative_error * scale / float(torch.linalg.matrix_norm(noise, ord=2))
        super().__init__(matrix + noise)
        self.product_relative_error = relative_error

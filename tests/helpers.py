"""Small models, data and independent float64 oracles shared by the tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from spectral_callbacks.workloads import mlp


class TinyAttention(nn.Module):
    """One causal self-attention block through F.scaled_dot_product_attention (default kernel)."""

    def __init__(self, dim: int = 8, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = self.out(y.transpose(1, 2).reshape(b, t, d))
        return self.head(torch.tanh(y).mean(dim=1))


def tanh_mlp(widths=(4, 6, 5, 3)) -> nn.Module:
    """The benchmarks' MLP at the size of a dense float64 reference."""
    return mlp(widths)


def bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 2),
    )


def cross_entropy_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_case(name: str, seed: int = 0):
    """(model, batches of unequal sizes) in float64; the CNN's BatchNorm stays in train mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        model, sizes, shape, classes = tanh_mlp(), (7, 4, 9), (4,), 3
    elif name == "cnn":
        model, sizes, shape, classes = bn_cnn(), (5, 8, 3), (2, 5, 5), 2
    elif name == "attention":
        model, sizes, shape, classes = TinyAttention(), (3, 5), (5, 8), 3
    else:
        raise ValueError(name)
    model = model.double()
    model.train()
    batches = [
        (
            torch.randn(n, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g),
        )
        for n in sizes
    ]
    return model, batches


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


def model_state(model: nn.Module) -> dict:
    """Everything a measurement must leave untouched, cloned."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state().clone(),
    }


def assert_same_state(before: dict, after: dict) -> None:
    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys()
        for name in before[key]:
            assert torch.equal(before[key][name], after[key][name]), f"{key} {name} changed"
    for name, grad in before["grads"].items():
        other = after["grads"][name]
        assert (grad is None) == (other is None), f"grad {name} appeared or vanished"
        if grad is not None:
            assert torch.equal(grad, other), f"grad {name} changed"
    assert before["requires_grad"] == after["requires_grad"]
    assert before["modes"] == after["modes"]
    assert torch.equal(before["rng"], after["rng"]), "the global RNG stream moved"


class BasisSpy:
    """Records, for every single-vector Lanczos solve, the basis capacity it allocated and the
    basis position (``steps``) of each thick restart; checks the basis stays orthonormal."""

    def __init__(self, monkeypatch) -> None:
        from spectral_callbacks.linalg import _krylov

        self.capacities: list[int] = []
        self.restart_steps: list[int] = []
        original_init = _krylov.IndependentLanczos.__init__
        original_restart = _krylov.IndependentLanczos.thick_restart

        def init(recurrence, *args, **kwargs):
            original_init(recurrence, *args, **kwargs)
            self.capacities.append(recurrence.basis.shape[1])

        def restart(recurrence, *args, **kwargs):
            self.restart_steps.append(recurrence.steps)
            original_restart(recurrence, *args, **kwargs)
            m = recurrence.steps + 1
            q = recurrence.basis[0, :m]
            atol = 1e-12 if q.dtype == torch.float64 else 1e-5
            assert torch.allclose(q @ q.T, torch.eye(m, dtype=q.dtype), atol=atol)

        monkeypatch.setattr(_krylov.IndependentLanczos, "__init__", init)
        monkeypatch.setattr(_krylov.IndependentLanczos, "thick_restart", restart)

    @property
    def restarts(self) -> int:
        return len(self.restart_steps)

"""The models and data every benchmark measures on, written down once.

A workload is a model, one batch and a loss, seeded so that every tool and every run sees
the same weights and data: :func:`make_workload` after 20 SGD steps (the protocol of
docs/benchmarks.md), :func:`initial_workload` before any step (for training runs).

- ``tiny``: MLP 64-64-10 (smoke runs); ``W1``: MLP 784-512-512-10 on 512 samples.
- ``W2``: torchvision's ResNet-18, batch 128 of 3×32×32 (needs torchvision).
- ``W3``: GPT, 6 layers, d = 384, 6 heads, context 256, vocabulary 8192, batch 8.
- ``C1``: :func:`small_cnn`, 0.54 M parameters with BatchNorm, batch 128 of 3×32×32.
- ``G1``: GPT, 4 layers, d = 256, 4 heads, context 128, vocabulary 2048, batch 8.
- ``gpt-small``: GPT, 2 layers, d = 96, context 64, vocabulary 512 (many CPU solves).

Attention runs on ``F.scaled_dot_product_attention``'s default kernels, which have no
double backward and no forward-mode AD.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # default kernels
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, context: int) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[GPTBlock(dim, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        return self.head(self.norm(self.blocks(x)))


def small_cnn(classes: int = 10) -> nn.Module:
    """C1: five 3×3 convolutions with BatchNorm and ReLU (0.54 M parameters), average pool,
    a linear head; for 3×32×32 inputs."""
    layers: list[nn.Module] = []
    for a, b, stride in ((3, 32, 1), (32, 64, 2), (64, 128, 2), (128, 128, 2), (128, 256, 1)):
        layers += [nn.Conv2d(a, b, 3, stride, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, classes))


def tiny_cnn(channels: int) -> nn.Module:
    """Two 3×3 convolutions of ``channels`` with BatchNorm and ReLU, pool, linear head."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 10),
    )


def mlp(widths: list[int]) -> nn.Module:
    """Linear layers of ``widths`` with tanh between them."""
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of ``model(x)`` against ``y`` (sequences flattened)."""
    x, y = batch
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


#: The workloads: a smoke one, the GPU set (W1-W3), the CPU-sized ones (C1, G1; W1 too) and
#: the small GPT of the solver studies.
WORKLOADS = ("tiny", "W1", "W2", "W3", "C1", "G1", "gpt-small")


def _tokens(vocab: int, context: int, batch: int, generator: torch.Generator) -> tuple:
    tokens = torch.randint(0, vocab, (batch, context + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def initial_workload(name: str, device: torch.device) -> tuple[nn.Module, tuple]:
    """(model, batch) of workload ``name`` at its seeded initialisation, before any step."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the same initial weights for every tool and every run
    if name == "tiny":
        model, x = mlp([64, 64, 10]), torch.randn(128, 64, generator=g)
        y = torch.randint(0, 10, (128,), generator=g)
    elif name == "W1":
        model, x = mlp([784, 512, 512, 10]), torch.randn(512, 784, generator=g)
        y = torch.randint(0, 10, (512,), generator=g)
    elif name == "W2":
        import torchvision

        model, x = (
            torchvision.models.resnet18(num_classes=10),
            torch.randn(128, 3, 32, 32, generator=g),
        )
        y = torch.randint(0, 10, (128,), generator=g)
    elif name == "W3":
        model = GPT(vocab=8192, dim=384, heads=6, layers=6, context=256)
        x, y = _tokens(8192, 256, 8, g)
    elif name == "C1":
        model, x = small_cnn(), torch.randn(128, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (128,), generator=g)
    elif name == "G1":
        model = GPT(vocab=2048, dim=256, heads=4, layers=4, context=128)
        x, y = _tokens(2048, 128, 8, g)
    elif name == "gpt-small":
        model = GPT(vocab=512, dim=96, heads=4, layers=2, context=64)
        x, y = _tokens(512, 64, 8, g)
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return model.to(device), (x.to(device), y.to(device))


def make_workload(name: str, device: torch.device):
    """(model, batch, loss_fn): the same for every tool; 20 SGD steps, then eval mode."""
    model, batch = initial_workload(name, device)
    sgd_steps(model, batch, classification_loss, steps=20)
    return model, batch, classification_loss


def sgd_steps(model: nn.Module, batch, loss_fn, steps: int, lr: float = 0.05) -> nn.Module:
    """``steps`` full-batch SGD steps in train mode; gradients dropped, eval mode after."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model.eval()

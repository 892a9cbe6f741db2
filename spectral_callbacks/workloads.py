"""The models and data that the demo, the examples, the tests and the benchmarks share.

Written down once so that a number in a test, a figure in the docs and a row of a benchmark
refer to one model. Everything is seeded: the same call gives the same weights and data.

Lightning modules and their data (the demo, the examples, the callback tests):

- :class:`TanhRegressor` on :func:`teacher_regression`, by full-batch gradient descent
  (:class:`FullBatch`): the edge-of-stability run.
- :class:`MixtureClassifier` on :func:`gaussian_mixture`: the representation run.
- :class:`Classifier` wraps any ``nn.Module`` of this module (a CNN, a GPT) for training.

Benchmark workloads (``bench/``, docs/benchmarks.md): a workload is a model, one batch and
:func:`classification_loss`; :func:`make_workload` gives it after 20 SGD steps,
:func:`initial_workload` before any step.

- ``tiny``: :func:`mlp` 64-64-10 (smoke runs); ``W1``: MLP 784-512-512-10 on 512 samples.
- ``W2``: torchvision's ResNet-18, batch 128 of 3×32×32 (needs torchvision).
- ``W3``: :class:`GPT`, 6 layers, d = 384, 6 heads, context 256, vocabulary 8192, batch 8.
- ``C1``: :func:`small_cnn`, 0.54 M parameters with BatchNorm, batch 128 of 3×32×32.
- ``G1``: GPT, 4 layers, d = 256, 4 heads, context 128, vocabulary 2048, batch 8.
- ``gpt-small``: GPT, 2 layers, d = 96, context 64, vocabulary 512 (many CPU solves).

Attention runs on ``F.scaled_dot_product_attention``'s default kernels, which have no
double backward and no forward-mode AD: the Hessian paths must cope with them as they are.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Literal

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GPT",
    "WORKLOADS",
    "Classifier",
    "FullBatch",
    "GPTBlock",
    "MixtureClassifier",
    "TanhRegressor",
    "classification_loss",
    "gaussian_mixture",
    "initial_workload",
    "make_workload",
    "mlp",
    "sgd_steps",
    "small_cnn",
    "teacher_regression",
    "tiny_cnn",
    "token_sequences",
]


# -- data -------------------------------------------------------------------------------------


class FullBatch(torch.utils.data.Dataset):
    """One epoch of ``steps`` items, each the same full batch ``(x, y)`` (full-batch gradient
    descent without Lightning's per-epoch overhead); load it with ``batch_size=None``.

    A map-style dataset: it has a length (progress bars know the epoch's end) without the
    warning Lightning gives an ``IterableDataset`` that defines ``__len__``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        self.x, self.y, self.steps = x, y, steps

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.steps:
            raise IndexError(f"index {index} outside the epoch of {self.steps} steps")
        return self.x, self.y

    def __len__(self) -> int:
        return self.steps


def teacher_regression(
    n: int = 64,
    d: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    noise: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``x ~ N(0, I_d)`` and targets ``tanh(x W₁) W₂ + noise · ε`` of a random
    teacher with 16 hidden units (``W₁ ~ N(0, 1/d)``, ``W₂ ~ N(0, 1/16)``, ``ε ~ N(0, 1)``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    hidden = torch.tanh(x @ (torch.randn(d, 16, generator=g, dtype=dtype) / math.sqrt(d)))
    y = hidden @ (torch.randn(16, 1, generator=g, dtype=dtype) / 4)
    return x, y + noise * torch.randn(n, 1, generator=g, dtype=dtype)


def gaussian_mixture(
    n: int, d: int = 32, classes: int = 10, seed: int = 1, means_seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of ``classes`` unit-variance Gaussians in ``d`` dimensions whose means
    span an 8-dimensional subspace. The means depend on ``means_seed`` only, so a training
    and a validation set that differ in ``seed`` come from one mixture (the labels are drawn
    with ``seed``, the noise with ``seed + 1``: give sets seeds at least 2 apart)."""
    g = torch.Generator().manual_seed(means_seed)
    basis = torch.linalg.qr(torch.randn(d, 8, generator=g)).Q
    means = 3.0 * torch.randn(classes, 8, generator=g) @ basis.T
    labels = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))
    noise = torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 1))
    return means[labels] + noise, labels


def token_sequences(
    n: int, vocab: int = 64, context: int = 32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token pairs ``(tokens, next tokens)`` of shape ``(n, context)`` from noisy
    arithmetic progressions modulo ``vocab`` (5 % of the tokens replaced at random)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 5, (n, 1), generator=g)
    tokens = (start + stride * torch.arange(context + 1)) % vocab
    noise = torch.rand(n, context + 1, generator=g) < 0.05
    tokens = torch.where(noise, torch.randint(0, vocab, (n, context + 1), generator=g), tokens)
    return tokens[:, :-1], tokens[:, 1:]


# -- models -----------------------------------------------------------------------------------


def mlp(widths: list[int] | tuple[int, ...]) -> nn.Module:
    """Linear layers of ``widths`` with tanh between them."""
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def small_cnn(classes: int = 10) -> nn.Module:
    """C1: five 3×3 convolutions with BatchNorm and ReLU (0.54 M parameters), average pool,
    a linear head; for 3×32×32 inputs."""
    layers: list[nn.Module] = []
    for a, b, stride in ((3, 32, 1), (32, 64, 2), (64, 128, 2), (128, 128, 2), (128, 256, 1)):
        layers += [nn.Conv2d(a, b, 3, stride, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, classes))


def tiny_cnn(channels: int, classes: int = 10) -> nn.Module:
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
        nn.Linear(channels, classes),
    )


class GPTBlock(nn.Module):
    """Pre-norm causal self-attention and a 4× GELU MLP, each with a residual."""

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
    """Token and position embeddings, ``layers`` blocks (:class:`GPTBlock`), a final
    LayerNorm and a linear head: ``(B, T)`` tokens to ``(B, T, vocab)`` logits."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, context: int) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[GPTBlock(dim, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        return self.head(self.norm(self.blocks(x)))


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy of ``model(x)`` against ``y`` (sequences flattened)."""
    x, y = batch
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


# -- Lightning modules --------------------------------------------------------------------------


class TanhRegressor(L.LightningModule):
    """A tanh MLP ``d``-``width``-``width``-1 with MSE loss, trained by gradient descent
    (heavy-ball ``momentum`` optional); logs ``train/loss``."""

    def __init__(self, lr: float = 0.1, d: int = 8, width: int = 32, momentum: float = 0.0) -> None:
        super().__init__()
        self.lr, self.momentum = lr, momentum
        self.net = mlp([d, width, width, 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class Classifier(L.LightningModule):
    """Trains ``model`` on :func:`classification_loss` with SGD (heavy-ball ``momentum``),
    Adam or AdamW at ``lr``; logs ``train/loss`` (and ``val/accuracy`` on a validation
    loader)."""

    def __init__(
        self,
        model: nn.Module | None,
        lr: float,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        momentum: float = 0.0,
    ) -> None:
        super().__init__()
        self.model, self.lr, self.optimizer, self.momentum = model, lr, optimizer, momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        loss = classification_loss(self, batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/accuracy", (self(x).argmax(dim=-1) == y).float().mean())

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class MixtureClassifier(Classifier):
    """A :class:`Classifier` of an MLP ``encoder`` (``d``-128-128-64, ReLU) and a linear
    ``head`` on its ReLU, trained with Adam; for :func:`gaussian_mixture`."""

    def __init__(self, d: int = 32, classes: int = 10, lr: float = 1e-3) -> None:
        super().__init__(None, lr, optimizer="adam")
        self.encoder = nn.Sequential(
            nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.encoder(x)))


# -- benchmark workloads ------------------------------------------------------------------------


def _random_tokens(vocab: int, context: int, batch: int, generator: torch.Generator) -> tuple:
    tokens = torch.randint(0, vocab, (batch, context + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def _classes(x: torch.Tensor, generator: torch.Generator, classes: int = 10) -> tuple:
    return x, torch.randint(0, classes, (x.shape[0],), generator=generator)


def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def _gpt(vocab: int, dim: int, heads: int, layers: int, context: int, batch: int):
    """A builder of a GPT workload on random tokens."""

    def build(g: torch.Generator) -> tuple:
        model = GPT(vocab=vocab, dim=dim, heads=heads, layers=layers, context=context)
        return model, _random_tokens(vocab, context, batch, g)

    return build


#: Every benchmark workload: name -> builder of ``(model, (x, y))`` from a seeded generator
#: (the model is built first, after ``torch.manual_seed(0)``). "tiny" is the smoke run; W1-W3
#: the GPU set; C1, G1 (and W1) the CPU-sized ones; the rest the solver and product studies
#: ("-tiny" ones their smoke sizes).
_BUILDERS: dict[str, Callable[[torch.Generator], tuple]] = {
    "tiny": lambda g: (mlp([64, 64, 10]), _classes(torch.randn(128, 64, generator=g), g)),
    "W1": lambda g: (
        mlp([784, 512, 512, 10]),
        _classes(torch.randn(512, 784, generator=g), g),
    ),
    "W2": lambda g: (_resnet18(), _classes(torch.randn(128, 3, 32, 32, generator=g), g)),
    "W3": _gpt(vocab=8192, dim=384, heads=6, layers=6, context=256, batch=8),
    "C1": lambda g: (small_cnn(), _classes(torch.randn(128, 3, 32, 32, generator=g), g)),
    "G1": _gpt(vocab=2048, dim=256, heads=4, layers=4, context=128, batch=8),
    "gpt-small": _gpt(vocab=512, dim=96, heads=4, layers=2, context=64, batch=8),
    "mlp-128": lambda g: (
        mlp([784, 128, 128, 10]),
        _classes(torch.randn(256, 784, generator=g), g),
    ),
    "cnn-16": lambda g: (tiny_cnn(16), _classes(torch.randn(64, 3, 16, 16, generator=g), g)),
    "cnn-4": lambda g: (tiny_cnn(4), _classes(torch.randn(16, 3, 8, 8, generator=g), g)),
    "gpt-2L": _gpt(vocab=512, dim=128, heads=4, layers=2, context=128, batch=4),
    "gpt-2L-1024": _gpt(vocab=512, dim=128, heads=4, layers=2, context=1024, batch=4),
    "gpt-tiny": _gpt(vocab=64, dim=32, heads=4, layers=2, context=16, batch=2),
    "gpt-tiny-32": _gpt(vocab=64, dim=32, heads=4, layers=2, context=32, batch=2),
}
WORKLOADS = tuple(_BUILDERS)


def initial_workload(name: str, device: torch.device) -> tuple[nn.Module, tuple]:
    """(model, batch) of workload ``name`` at its seeded initialisation, before any step."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the same initial weights for every tool and every run
    model, (x, y) = _BUILDERS[name](g)
    return model.to(device), (x.to(device), y.to(device))


def make_workload(name: str, device: torch.device, steps: int = 20):
    """(model, batch, loss_fn): the same for every tool; ``steps`` SGD steps, then eval mode."""
    model, batch = initial_workload(name, device)
    sgd_steps(model, batch, classification_loss, steps=steps)
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

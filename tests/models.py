"""Small models, losses and data the tests share (fast on 2 CPU cores)."""

from __future__ import annotations

import collections
import dataclasses
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

# The workloads shared with the demo, examples and benchmarks.
from spectral_callbacks.workloads import FullBatch, TanhRegressor, mlp
from spectral_callbacks.workloads import teacher_regression as regression_data  # noqa: F401


def mse(model: nn.Module, batch) -> torch.Tensor:
    """``loss_fn`` of a regression batch ``(x, y)``: the mean squared error."""
    return F.mse_loss(model(batch[0]), batch[1])


class Quadratic(nn.Module):
    """``L(θ) = ½ θᵀAθ``: Hessian ``A`` exactly, gradient ``Aθ``.

    ``a`` is the matrix, or its eigenvalues (then ``A = Q diag(a) Qᵀ`` with a random
    orthogonal ``Q`` from ``seed``); ``θ`` is drawn from ``seed``. ``forward`` ignores its
    batch, so ``loss_fn(model, batch) = model(batch)`` measures ``L``.
    """

    def __init__(self, a=(10.0, 3.0, 1.0, 0.5), seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        a = torch.as_tensor(a, dtype=torch.float64)
        if a.ndim == 1:
            n = a.numel()
            q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
            a = (q * a) @ q.T
        self.register_buffer("A", a)
        self.theta = nn.Parameter(torch.randn(a.shape[0], generator=g, dtype=a.dtype))

    def forward(self, batch=None) -> torch.Tensor:
        return 0.5 * self.theta @ self.A @ self.theta

    def loss(self) -> torch.Tensor:
        return self()


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


def noisy_mlp(
    inputs: int, hidden: int, outputs: int, dropout: float, activation=nn.Tanh
) -> nn.Sequential:
    """Linear, BatchNorm, activation, Dropout, Linear: randomness and running statistics in
    train mode, everything a measurement must leave untouched."""
    return nn.Sequential(
        nn.Linear(inputs, hidden),
        nn.BatchNorm1d(hidden),
        activation(),
        nn.Dropout(dropout),
        nn.Linear(hidden, outputs),
    )


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


#: The small float64 cases of :func:`make_case`: a tanh MLP, a CNN with BatchNorm in train
#: mode and a causal attention block on the default SDPA kernel, each with unequal batches.
CASES = ("mlp", "cnn", "attention")


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


def full_batch_loader(x, y, steps: int):
    """One epoch of ``steps`` full-batch gradient steps (the demo's dataset)."""
    return torch.utils.data.DataLoader(FullBatch(x, y, steps), batch_size=None)


class NoisyClassifier(LightningModule):
    """Dropout and BatchNorm in train mode, Adam: everything a probe could disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.net = noisy_mlp(6, 16, 3, dropout=0.2)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def host_random_masks(x: torch.Tensor) -> torch.Tensor:
    """``x`` with features masked from NumPy's global RNG and scaled from Python's
    ``random``, as Hugging Face's wav2vec2 draws its SpecAugment masks."""
    keep = torch.as_tensor(np.random.rand(x.shape[-1]) > 0.3, dtype=x.dtype, device=x.device)
    return x * keep * random.uniform(0.5, 1.5)


class HostRandomClassifier(NoisyClassifier):
    """:class:`NoisyClassifier` whose training forward also draws from NumPy and ``random``."""

    def forward(self, x):
        return self.net(host_random_masks(x) if self.training else x)


class RenormalisedEmbeddingClassifier(NoisyClassifier):
    """:class:`NoisyClassifier` that also looks up each feature's sign-and-size bucket in an
    ``nn.Embedding(max_norm=...)``: every forward pass rescales the looked-up rows in place,
    so a probe batch's forward writes a parameter (rows the training batch has not reached)."""

    def __init__(self) -> None:
        super().__init__()
        self.buckets = nn.Embedding(6 * 8, 4, max_norm=0.5)
        self.net[0] = nn.Linear(6 + 4, self.net[0].out_features)

    def forward(self, x):
        tokens = (x * 2).floor().long().clamp(-4, 3) + 4 + 8 * torch.arange(6)
        return self.net(torch.cat([x, self.buckets(tokens).mean(1)], dim=1))


class PaddedTokens(nn.Module):
    """Token embeddings with ``padding_idx``, RMS-normalised (a padding token's zero row
    meets ``rsqrt(eps)``, as in Gemma's first norm) before a linear head."""

    def __init__(self, padding_idx: int | None = 0) -> None:
        super().__init__()
        self.embedding = nn.Embedding(6, 3, padding_idx=padding_idx)
        self.head = nn.Linear(3, 2)

    def forward(self, tokens):
        x = self.embedding(tokens)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3)
        return self.head(x.mean(1))


def padded_tokens_case():
    """A float64 :class:`PaddedTokens` with padding row 0 (the first 3 flat coordinates),
    a batch with token 0 inside sequences, and the same function without ``padding_idx``
    (which changes only the backward pass), for dense references."""
    torch.manual_seed(0)
    model = PaddedTokens().double()
    tokens = torch.tensor([[0, 1, 2], [2, 0, 4], [1, 5, 0], [3, 3, 2]])
    plain = PaddedTokens(padding_idx=None).double()
    plain.load_state_dict(model.state_dict())
    return model, (tokens, torch.tensor([0, 1, 1, 0])), plain


def classification_loader(n: int = 96, batch_size: int = 16, seed: int = 0, shuffle: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle
    )


def trainer_kwargs(**overrides):
    kwargs = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "deterministic": True,
    }
    kwargs.update(overrides)
    return kwargs


def cli_round_trip(module_class, callback_class, init_args: dict, folder):
    """A LightningCLI config naming ``callback_class`` with ``init_args`` is dumped without a
    serialisation failure and read back; returns the callback the second CLI built."""
    from lightning.pytorch.cli import LightningCLI

    config = {
        "trainer": {
            "max_steps": 1,
            "accelerator": "cpu",
            "logger": False,
            "callbacks": [
                {
                    "class_path": f"spectral_callbacks.{callback_class.__name__}",
                    "init_args": init_args,
                }
            ],
        }
    }
    cli = LightningCLI(module_class, run=False, args=config, save_config_callback=None)
    dumped = cli.parser.dump(cli.config)
    assert "Unable to serialize" not in dumped
    path = folder / "config.yaml"
    path.write_text(dumped)
    again = LightningCLI(
        module_class, run=False, args=["--config", str(path)], save_config_callback=None
    )
    (callback,) = [cb for cb in again.trainer.callbacks if isinstance(cb, callback_class)]
    return callback


# -- batches of every shape (dict, named tuple, dataclass, list, tuple) ---------------------

Pair = collections.namedtuple("Pair", ["x", "y"])


@dataclasses.dataclass
class Example:
    x: torch.Tensor
    y: torch.Tensor


def pack_batch(kind: str, x: torch.Tensor, y: torch.Tensor):
    return {
        "tuple": lambda: (x, y),
        "list": lambda: [x, y],
        "dict": lambda: {"x": x, "y": y},
        "namedtuple": lambda: Pair(x, y),
        "dataclass": lambda: Example(x, y),
    }[kind]()


def unpack_batch(batch):
    if isinstance(batch, dict):
        return batch["x"], batch["y"]
    if isinstance(batch, (Pair, Example)):
        return batch.x, batch.y
    return batch[0], batch[1]


class AnyBatchRegressor(LightningModule):
    """lr 0: the model measured at any step is the model at the end."""

    def __init__(self, width: int = 5) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = unpack_batch(batch)
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, batches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


class CountingBackend:
    """``aot_eager`` that counts the graphs it is given to compile."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs += 1
        return lookup_backend("aot_eager")(graph_module, example_inputs)


class ManualMSERegressor(TanhRegressor):
    """``training_step`` writes the squared error out: ``F.mse_loss`` has no forward-over-reverse
    derivative in torch 2.13 (its double backward writes into a ZeroTensor, pytorch#123996)."""

    def training_step(self, batch, batch_idx):
        loss = (self(batch[0]) - batch[1]).pow(2).mean()
        self.log("train_loss", loss)
        return loss


class Skewed(nn.Module):
    """``½‖w‖² + a cosh(b u)`` (its forward, whatever the batch): the top eigenvector is
    ``u``, along which the loss is far from quadratic, while a random vector (the step's
    calibration) sees mostly the quadratic ``w``. ``H = diag(1, …, 1, a b²)`` at ``u = 0``."""

    def __init__(self, a: float = 0.01, b: float = 60.0) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.w = nn.Parameter(torch.full((400,), 5.0))
        self.u = nn.Parameter(torch.zeros(1))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.w**2).sum() + self.a * torch.cosh(self.b * self.u).sum()


class Saturating(nn.Module):
    """``½‖w‖² + a log cosh(b u)``: ``H = diag(1, …, 1, a b²)`` at ``u = 0``, but along ``u``
    the gradient ``a b tanh(b u)`` saturates, so a difference whose step is long for ``1/b``
    falls short of the curvature, and so does a two-step estimate of its error (the
    higher-order terms alternate in sign). By default in bfloat16, whose step, ``ε^{1/3}``
    of the parameters' scale, is that long; ``w`` holds ``size`` entries of ``w0``."""

    def __init__(
        self,
        a: float = 0.01,
        b: float = 30.0,
        size: int = 400,
        w0: float = 0.05,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.w = nn.Parameter(torch.full((size,), w0, dtype=dtype))
        self.u = nn.Parameter(torch.zeros(1, dtype=dtype))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = self.b * self.u
        log_cosh = F.softplus(2.0 * x) - x - math.log(2.0)
        return 0.5 * (self.w**2).sum() + self.a * log_cosh.sum()


def skewed_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The loss is the model's output (through its forward, so that FSDP gathers ``w``)."""
    return model(batch)

"""Figure 1 of docs/benchmarks.md: cost of a gradient and of a Hessian-vector product by each path.

Usage::

    python bench/hvp_paths.py --device cpu --workloads mlp-small cnn-small
    python bench/hvp_paths.py --device cuda --workloads W1 W2

Writes ``bench/results/hvp-paths-<device name>-<date>.json`` and prints a markdown table
(milliseconds per vector, and as a multiple of one gradient). Timings synchronise the
device, warm up first, and report the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pathlib
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import itertools

from spectral_callbacks.curvature import HessianOperator


def _mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _cnn(channels: int) -> nn.Module:
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


def workload(name: str, device: torch.device):
    """Model, batch and loss of a named workload."""
    g = torch.Generator().manual_seed(0)
    if name in ("W1", "mlp-small"):
        widths, batch = ([784, 512, 512, 10], 512) if name == "W1" else ([784, 128, 128, 10], 256)
        model = _mlp(widths)
        x = torch.randn(batch, 784, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
    elif name in ("W2", "cnn-small"):
        if name == "W2":
            import torchvision

            model = torchvision.models.resnet18(num_classes=10)
            x = torch.randn(128, 3, 32, 32, generator=g)
        else:
            model = _cnn(16)
            x = torch.randn(64, 3, 16, 16, generator=g)
        y = torch.randint(0, 10, (x.shape[0],), generator=g)
    else:
        raise ValueError(f"unknown workload {name!r}")
    model = model.to(device).eval()
    batch = (x.to(device), y.to(device))
    return model, batch, lambda m, b: F.cross_entropy(m(b[0]), b[1])


def _timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(name: str, device: torch.device, repeats: int, blocks: list[int]) -> dict:
    model, batch, loss_fn = workload(name, device)
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient():
        torch.autograd.grad(loss_fn(model, batch), params)

    row = {"workload": name, "parameters": sum(p.numel() for p in params)}
    row["grad_ms"] = _timed(gradient, device, repeats)
    operator = HessianOperator(model, loss_fn, batch, hvp="reuse_graph")
    vector = torch.randn(1, operator.size, device=device)

    def fresh():
        operator._graphs = None
        operator.matmat(vector)

    row["fresh_double_backward_ms"] = _timed(fresh, device, repeats)
    row["reuse_graph_ms"] = _timed(lambda: operator.matmat(vector), device, repeats)
    for width in blocks:
        block = torch.randn(width, operator.size, device=device)
        row[f"reuse_graph_batched_{width}_ms_per_vector"] = (
            _timed(lambda b=block: operator.matmat(b), device, repeats) / width
        )
    operator.close()
    vmapped = HessianOperator(model, loss_fn, batch, hvp="forward_over_reverse")
    for width in [1, *blocks]:
        block = torch.randn(width, vmapped.size, device=device)
        row[f"forward_over_reverse_{width}_ms_per_vector"] = (
            _timed(lambda b=block: vmapped.matmat(b), device, repeats) / width
        )
    vmapped.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", nargs="+", default=["mlp-small", "cnn-small"])
    parser.add_argument("--blocks", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"
    )
    rows = [measure(name, device, args.repeats, args.blocks) for name in args.workloads]
    stamp = dt.date.today().isoformat()
    result = {"device": device_name, "date": stamp, "torch": torch.__version__, "rows": rows}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = device_name.replace(" ", "-")
    (out / f"hvp-paths-{slug}-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    keys = [k for k in rows[0] if k.endswith("_ms") or k.endswith("per_vector")]
    print(f"device: {device_name}, torch {torch.__version__}, median of {args.repeats}")
    print("| workload | " + " | ".join(k.removesuffix("_ms") for k in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for row in rows:
        cells = [f"{row[k]:.2f} ms ({row[k] / row['grad_ms']:.1f}x)" for k in keys]
        print(f"| {row['workload']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

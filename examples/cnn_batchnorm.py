"""A CNN with BatchNorm: sharpness and the Hessian spectrum while it trains.

BatchNorm stays in train mode during the probe (the Hessian of the loss being optimised,
with batch statistics), and its running statistics do not move because of the callbacks.

    python examples/cnn_batchnorm.py --fast
"""

import argparse

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from spectral_callbacks import HessianSpectrumMonitor, SharpnessMonitor
from spectral_callbacks.workloads import Classifier, tiny_cnn


def stripes(n, seed=0):
    """Images of oriented stripes in 4 classes (horizontal, vertical, two diagonals), with noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    i, j = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    patterns = torch.stack(
        [torch.sin(i), torch.sin(j), torch.sin((i + j) / 1.4), torch.sin((i - j) / 1.4)]
    )
    x = patterns[labels].unsqueeze(1).repeat(1, 3, 1, 1) + 0.8 * torch.randn(
        n, 3, 16, 16, generator=g
    )
    return x, labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--out", default="runs/cnn")
    args = parser.parse_args(argv)
    x, y = stripes(256 if args.fast else 2048)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True
    )
    sharpness = SharpnessMonitor(every_n_steps=10)
    spectrum = HessianSpectrumMonitor(every_n_steps=50, k=5, density_steps=32 if args.fast else 64)
    trainer = L.Trainer(
        max_epochs=1 if args.fast else 5,
        callbacks=[sharpness, spectrum],
        logger=TensorBoardLogger(args.out, name="cnn_batchnorm"),
        enable_checkpointing=False,
    )
    # Two 16-channel convolutions with BatchNorm, SGD with momentum.
    trainer.fit(Classifier(tiny_cnn(16, classes=4), lr=0.05, momentum=0.9), loader)
    step, last = spectrum.history[-1]
    print(
        f"step {step}: top-5 eigenvalues",
        [round(last[f"spectral/hessian/eig_{i}"], 3) for i in range(1, 6)],
    )
    print(
        f"trace {last['spectral/hessian/trace']:.2f} ± {last['spectral/hessian/trace_stderr']:.2f}"
    )
    return spectrum.history


if __name__ == "__main__":
    main()

"""Edge of stability: full-batch gradient descent sharpens until λ_max ≈ 2/lr, then hovers.

Cohen et al. (2021). A tanh MLP with MSE loss on a random teacher's data; every step uses
the whole data set (one epoch that yields the same batch again and again).

    python examples/edge_of_stability.py            # 3000 steps, logs to runs/eos
    python examples/edge_of_stability.py --fast     # a few seconds
"""

import argparse

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from spectral_callbacks import HessianSpectrumMonitor, SharpnessMonitor
from spectral_callbacks.workloads import FullBatch, TanhRegressor, teacher_regression


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--out", default="runs/eos")
    args = parser.parse_args(argv)
    steps = 60 if args.fast else 3000

    x, y = teacher_regression(noise=0.0)  # 64 samples of a random tanh teacher
    torch.manual_seed(1)
    sharpness = SharpnessMonitor(every_n_steps=20)
    spectrum = HessianSpectrumMonitor(every_n_steps=500 if not args.fast else 30, k=5)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[sharpness, spectrum],
        logger=TensorBoardLogger(args.out, name="edge_of_stability"),
        enable_checkpointing=False,
    )
    trainer.fit(
        TanhRegressor(lr=args.lr),
        torch.utils.data.DataLoader(FullBatch(x, y, steps), batch_size=None),
    )
    for step, values in sharpness.history[:: max(1, len(sharpness.history) // 10)]:
        lam = values["spectral/hessian/lambda_max"]
        limit = values["spectral/hessian/stability_limit"]
        print(f"step {step:5d}  lambda_max {lam:7.3f}  2/lr {limit:6.3f}  ratio {lam / limit:.3f}")
    return sharpness.history


if __name__ == "__main__":
    main()

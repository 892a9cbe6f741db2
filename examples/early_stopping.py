"""Stop a run whose step size is past the edge of stability.

Full-batch gradient descent at lr = 0.6 on a tanh MLP: λ_max·lr/2 stays above 1.1, so
SpectralEarlyStopping.sharpness stops the run after two such measurements, and says why.

    python examples/early_stopping.py --fast
"""

import argparse

import lightning.pytorch as L
import torch

from spectral_callbacks import SharpnessMonitor, SpectralEarlyStopping
from spectral_callbacks.workloads import FullBatch, TanhRegressor, teacher_regression


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--lr", type=float, default=0.6)
    args = parser.parse_args(argv)
    x, y = teacher_regression(noise=0.0)  # 64 samples of a random tanh teacher
    torch.manual_seed(1)
    stopper = SpectralEarlyStopping.sharpness(margin=0.1, patience=2)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[SharpnessMonitor(every_n_steps=10), stopper],
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(
        TanhRegressor(lr=args.lr),
        torch.utils.data.DataLoader(FullBatch(x, y, 100 if args.fast else 2000), batch_size=None),
    )
    print(f"stopped at step {stopper.stopped_step}: {stopper.stopped_reason}")
    return stopper


if __name__ == "__main__":
    main()

"""Stop a run whose step size is past the edge of stability.

Full-batch gradient descent at lr = 0.6 on a tanh MLP: λ_max·lr/2 stays above 1.1, so
SpectralEarlyStopping.sharpness stops the run after two such measurements, and says why.

    python examples/early_stopping.py --fast
"""

import argparse

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn

from spectral_callbacks import SharpnessMonitor, SpectralEarlyStopping
from spectral_callbacks.demo import FullBatch  # the same full batch, `steps` times


class Regressor(L.LightningModule):
    def __init__(self, lr):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
        )

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--lr", type=float, default=0.6)
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (
        torch.tanh(x @ torch.randn(8, 16, generator=g) / 8**0.5)
        @ torch.randn(16, 1, generator=g)
        / 4
    )
    torch.manual_seed(1)
    stopper = SpectralEarlyStopping.sharpness(margin=0.1, patience=2)
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[SharpnessMonitor(every_n_steps=10), stopper],
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(
        Regressor(args.lr),
        torch.utils.data.DataLoader(FullBatch(x, y, 100 if args.fast else 2000), batch_size=None),
    )
    print(f"stopped at step {stopper.stopped_step}: {stopper.stopped_reason}")
    return stopper


if __name__ == "__main__":
    main()

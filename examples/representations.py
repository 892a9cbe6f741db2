"""Representations of an encoder: RankMe, α-ReQ and effective rank per layer.

A classifier on a 10-class Gaussian mixture whose class means span 8 of 32 dimensions. As
it learns, deeper layers compress towards the class structure: RankMe falls. The probe is
the validation set. A rank-collapse rule warns (instead of stopping) if a layer's RankMe
falls below a quarter of its peak.

    python examples/representations.py --fast
"""

import argparse

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from spectral_callbacks import RepresentationMonitor, SpectralEarlyStopping
from spectral_callbacks.workloads import MixtureClassifier, gaussian_mixture


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--out", default="runs/representations")
    args = parser.parse_args(argv)
    # One mixture (the means), two samples of it.
    train = torch.utils.data.TensorDataset(*gaussian_mixture(512 if args.fast else 8192, seed=1))
    val = torch.utils.data.TensorDataset(*gaussian_mixture(1024, seed=3))
    layers = ["encoder.1", "encoder.3", "encoder"]
    monitor = RepresentationMonitor(
        layers=layers, every_n_steps=2 if args.fast else 32, num_samples=1024
    )
    collapse = SpectralEarlyStopping.rank_collapse(
        "encoder", fraction=0.25, warmup_steps=50, action="warn"
    )
    trainer = L.Trainer(
        max_epochs=1 if args.fast else 10,
        callbacks=[monitor, collapse],
        logger=TensorBoardLogger(args.out, name="representations"),
        enable_checkpointing=False,
    )
    trainer.fit(
        MixtureClassifier(),
        torch.utils.data.DataLoader(train, batch_size=128, shuffle=True),
        torch.utils.data.DataLoader(val, batch_size=512),
    )
    (_, first), (_, last) = monitor.history[0], monitor.history[-1]
    for layer in layers:
        key = f"spectral/repr/{layer}/"
        print(
            f"{layer:10s} RankMe {first[key + 'rankme']:6.2f} -> {last[key + 'rankme']:6.2f}   "
            f"alpha-ReQ {first[key + 'alpha_req']:5.2f} -> {last[key + 'alpha_req']:5.2f}"
        )
    return monitor.history


if __name__ == "__main__":
    main()

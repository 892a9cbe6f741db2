"""A small GPT on F.scaled_dot_product_attention with PyTorch's default kernels.

The flash / memory-efficient kernels have no double backward; the callbacks switch every
Hessian-vector product to the math kernel by themselves, so the model needs no change.
RepresentationMonitor watches each block's output, one row per token. The model is
`spectral_callbacks.workloads.GPT`, the benchmarks' GPT at a smaller size.

    python examples/small_gpt.py --fast
"""

import argparse

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from spectral_callbacks import RepresentationMonitor, SharpnessMonitor
from spectral_callbacks.workloads import GPT, Classifier, token_sequences


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--out", default="runs/gpt")
    args = parser.parse_args(argv)
    # Next-token pairs of noisy arithmetic progressions, 32 tokens each.
    data = torch.utils.data.TensorDataset(*token_sequences(256 if args.fast else 4096))
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
    sharpness = SharpnessMonitor(every_n_steps=4 if args.fast else 50)
    representation = RepresentationMonitor(
        layers=["model.blocks.0", "model.blocks.1"],
        every_n_steps=4 if args.fast else 50,
        num_samples=64,
    )
    trainer = L.Trainer(
        max_epochs=1 if args.fast else 3,
        callbacks=[sharpness, representation],
        logger=TensorBoardLogger(args.out, name="small_gpt"),
        enable_checkpointing=False,
    )
    gpt = GPT(vocab=64, dim=64, heads=4, layers=2, context=32)
    trainer.fit(Classifier(gpt, lr=3e-3, optimizer="adamw"), loader)
    for step, values in sharpness.history:
        print(f"step {step:4d}  lambda_max {values['spectral/hessian/lambda_max']:.3f}")
    return sharpness.history, representation.history


if __name__ == "__main__":
    main()

"""A small GPT built on F.scaled_dot_product_attention with PyTorch's default kernels.

The flash / memory-efficient kernels have no double backward; the callbacks switch every
Hessian-vector product to the math kernel by themselves, so the model needs no change.
RepresentationMonitor watches each block's output, one row per token.

    python examples/small_gpt.py --fast
"""

import argparse

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from spectral_callbacks import RepresentationMonitor, SharpnessMonitor


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyGPT(L.LightningModule):
    def __init__(self, vocab=64, dim=64, heads=4, layers=2, context=32):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(self.blocks(self.embed(tokens) + self.position(positions)))

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        logits = self(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def sequences(n, vocab=64, length=33, seed=0):
    """Noisy arithmetic progressions modulo the vocabulary: learnable next-token structure."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 5, (n, 1), generator=g)
    tokens = (start + stride * torch.arange(length)) % vocab
    noise = torch.rand(n, length, generator=g) < 0.05
    return torch.where(noise, torch.randint(0, vocab, (n, length), generator=g), tokens)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--out", default="runs/gpt")
    args = parser.parse_args(argv)
    data = torch.utils.data.TensorDataset(sequences(256 if args.fast else 4096))
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
    sharpness = SharpnessMonitor(every_n_steps=4 if args.fast else 50)
    # Batches hold 33 tokens (inputs and shifted targets); the model sees the first 32.
    representation = RepresentationMonitor(
        layers=["blocks.0", "blocks.1"],
        every_n_steps=4 if args.fast else 50,
        num_samples=64,
        forward_fn=lambda model, batch: model(batch[0][:, :-1]),
    )
    trainer = L.Trainer(
        max_epochs=1 if args.fast else 3,
        callbacks=[sharpness, representation],
        logger=TensorBoardLogger(args.out, name="small_gpt"),
        enable_checkpointing=False,
    )
    trainer.fit(TinyGPT(), loader)
    for step, values in sharpness.history:
        print(f"step {step:4d}  lambda_max {values['spectral/hessian/lambda_max']:.3f}")
    return sharpness.history, representation.history


if __name__ == "__main__":
    main()

"""Spectral callbacks for PyTorch Lightning."""

__version__ = "0.1.0"

"""Spectral callbacks for PyTorch Lightning: Hessian sharpness and spectra during training.

The callbacks live at the top level; the math is importable without Lightning from
:mod:`spectral_callbacks.linalg`, :mod:`spectral_callbacks.curvature` and
:mod:`spectral_callbacks.functional`.
"""

from .callbacks import (
    HessianSpectrumMonitor,
    RepresentationMonitor,
    SharpnessMonitor,
    SpectralEarlyStopping,
)
from .curvature import Batches

__version__ = "0.1.0"

__all__ = [
    "Batches",
    "HessianSpectrumMonitor",
    "RepresentationMonitor",
    "SharpnessMonitor",
    "SpectralEarlyStopping",
    "__version__",
]

"""Spectral callbacks for PyTorch Lightning: Hessian, representation and weight spectra
during training.

The callbacks live at the top level; the math is importable without Lightning from
:mod:`spectral_callbacks.linalg`, :mod:`spectral_callbacks.curvature`,
:mod:`spectral_callbacks.weights` and :mod:`spectral_callbacks.functional`. The top-level
names are imported on first use, so ``spectral-callbacks --help`` and ``--version`` answer
without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# name -> submodule that defines it
_EXPORTS = {
    "BatchSharpnessMonitor": ".callbacks",
    "Batches": ".curvature",
    "HessianSpectrumMonitor": ".callbacks",
    "RepresentationMonitor": ".callbacks",
    "SharpnessMonitor": ".callbacks",
    "SpectralEarlyStopping": ".callbacks",
    "WeightSpectrumMonitor": ".callbacks",
}

__all__ = [
    "BatchSharpnessMonitor",
    "Batches",
    "HessianSpectrumMonitor",
    "RepresentationMonitor",
    "SharpnessMonitor",
    "SpectralEarlyStopping",
    "WeightSpectrumMonitor",
    "__version__",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports lazily
    from .callbacks import (
        BatchSharpnessMonitor,
        HessianSpectrumMonitor,
        RepresentationMonitor,
        SharpnessMonitor,
        SpectralEarlyStopping,
        WeightSpectrumMonitor,
    )
    from .curvature import Batches


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

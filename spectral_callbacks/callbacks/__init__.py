"""Thin Lightning callbacks over the functional layer: scheduling, probe data, logging."""

from .base import SpectralMonitor, training_step_loss
from .batch import BatchSharpnessMonitor
from .early_stopping import SpectralEarlyStopping
from .hessian import HessianSpectrumMonitor, SharpnessMonitor
from .representation import RepresentationMonitor
from .weights import WeightSpectrumMonitor

__all__ = [
    "BatchSharpnessMonitor",
    "HessianSpectrumMonitor",
    "RepresentationMonitor",
    "SharpnessMonitor",
    "SpectralEarlyStopping",
    "SpectralMonitor",
    "WeightSpectrumMonitor",
    "training_step_loss",
]

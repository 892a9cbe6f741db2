"""Thin Lightning callbacks over the functional layer: scheduling, probe data, logging."""

from .base import SpectralMonitor, training_step_loss
from .hessian import HessianSpectrumMonitor, SharpnessMonitor

__all__ = ["HessianSpectrumMonitor", "SharpnessMonitor", "SpectralMonitor", "training_step_loss"]

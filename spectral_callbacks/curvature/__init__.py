"""Curvature operators: a model, a loss and data turned into a matrix-free symmetric operator."""

from .data import ParameterFilter, as_batch_list, batch_size, select_parameters
from .hessian import HVP_PATHS, HessianOperator, LossFunction, NonFiniteLossError, flat_size
from .isolation import measurement_context

__all__ = [
    "HVP_PATHS",
    "HessianOperator",
    "LossFunction",
    "NonFiniteLossError",
    "ParameterFilter",
    "as_batch_list",
    "batch_size",
    "flat_size",
    "measurement_context",
    "select_parameters",
]

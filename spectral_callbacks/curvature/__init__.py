"""Curvature operators: a model, a loss and data turned into a matrix-free symmetric operator."""

from .batch import BatchSharpness, batch_sharpness_of
from .data import (
    REDUCTIONS,
    Batches,
    ParameterFilter,
    Reduction,
    as_batch_list,
    batch_size,
    module_groups,
    select_parameters,
)
from .factory import curvature_operator
from .flatness import SamSharpness, sam_sharpness_of
from .ggn import CURVATURES, GGN_LOSSES, Curvature, GgnLoss, GGNOperator
from .hessian import (
    HVP_PATHS,
    HessianOperator,
    HvpPath,
    LossFunction,
    flat_size,
)
from .isolation import measurement_context
from .layers import layer_lambda_max, layer_traces
from .operator import CurvatureOperator, NonFiniteLossError
from .preconditioner import (
    SUPPORTED_OPTIMIZERS,
    EdgeOfStability,
    StabilityPreconditioner,
    StabilityRatio,
    UnsupportedOptimizerError,
    edge_of_stability,
    stability_preconditioner,
    stability_ratio,
)
from .products import clear_compiled_products

__all__ = [
    "CURVATURES",
    "GGN_LOSSES",
    "HVP_PATHS",
    "REDUCTIONS",
    "SUPPORTED_OPTIMIZERS",
    "BatchSharpness",
    "Batches",
    "Curvature",
    "CurvatureOperator",
    "EdgeOfStability",
    "GGNOperator",
    "GgnLoss",
    "HessianOperator",
    "HvpPath",
    "LossFunction",
    "NonFiniteLossError",
    "ParameterFilter",
    "Reduction",
    "SamSharpness",
    "StabilityPreconditioner",
    "StabilityRatio",
    "UnsupportedOptimizerError",
    "as_batch_list",
    "batch_sharpness_of",
    "batch_size",
    "clear_compiled_products",
    "curvature_operator",
    "edge_of_stability",
    "flat_size",
    "layer_lambda_max",
    "layer_traces",
    "measurement_context",
    "module_groups",
    "sam_sharpness_of",
    "select_parameters",
    "stability_preconditioner",
    "stability_ratio",
]

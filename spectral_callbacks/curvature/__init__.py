"""Curvature operators: a model, a loss and data turned into a matrix-free symmetric operator."""

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
from .flatness import SamSharpness, sam_sharpness
from .ggn import CURVATURES, GGN_LOSSES, Curvature, GgnLoss, GGNOperator, curvature_operator
from .hessian import (
    HVP_PATHS,
    HessianOperator,
    HvpPath,
    LossFunction,
    NonFiniteLossError,
    clear_compiled_products,
    flat_size,
)
from .isolation import measurement_context
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

__all__ = [
    "CURVATURES",
    "GGN_LOSSES",
    "HVP_PATHS",
    "REDUCTIONS",
    "SUPPORTED_OPTIMIZERS",
    "Batches",
    "Curvature",
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
    "batch_size",
    "clear_compiled_products",
    "curvature_operator",
    "edge_of_stability",
    "flat_size",
    "measurement_context",
    "module_groups",
    "sam_sharpness",
    "select_parameters",
    "stability_preconditioner",
    "stability_ratio",
]

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
from .ggn import CURVATURES, GGN_LOSSES, GGNOperator, curvature_operator
from .hessian import (
    HVP_PATHS,
    HessianOperator,
    LossFunction,
    NonFiniteLossError,
    clear_compiled_products,
    flat_size,
)
from .isolation import measurement_context
from .preconditioner import (
    SUPPORTED_OPTIMIZERS,
    StabilityPreconditioner,
    StabilityRatio,
    UnsupportedOptimizerError,
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
    "GGNOperator",
    "HessianOperator",
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
    "flat_size",
    "measurement_context",
    "module_groups",
    "sam_sharpness",
    "select_parameters",
    "stability_preconditioner",
    "stability_ratio",
]

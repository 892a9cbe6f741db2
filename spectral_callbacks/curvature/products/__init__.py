"""The product paths of :class:`~spectral_callbacks.curvature.HessianOperator`, one module
each: ``reuse_graph``, ``forward_over_reverse`` (eager, and ``compiled`` under
``torch.compile``) and ``gradient_difference``. Each path is a small class over its
operator, which holds the parameters, the batches and their weights; ``auto`` and the
fallbacks between paths are the operator's."""

from .compiled import COMPILED_CACHE_SIZE, clear_compiled_products
from .errors import NoSecondDerivative, explain_second_order_failure
from .forward_over_reverse import DisagreeingProducts, ForwardOverReverseProducts
from .gradient_difference import GradientDifferenceProducts
from .reuse_graph import ReusedGraphProducts

__all__ = [
    "COMPILED_CACHE_SIZE",
    "DisagreeingProducts",
    "ForwardOverReverseProducts",
    "GradientDifferenceProducts",
    "NoSecondDerivative",
    "ReusedGraphProducts",
    "clear_compiled_products",
    "explain_second_order_failure",
]

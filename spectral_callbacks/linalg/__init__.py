"""Matrix-free linear algebra on symmetric operators (pure torch, device-agnostic).

Nothing here knows about models or Lightning: every routine sees a matrix only through
:meth:`SymmetricOperator.matmat` on blocks of row vectors.
"""

from .eigsh import WHICH, EigenResult, block_lanczos, lanczos
from .operators import DenseOperator, ScaledOperator, SymmetricOperator
from .quadrature import ZERO_TOLERANCE, SpectralDensity, slq
from .trace import TraceEstimate, exact_trace, hutchinson, hutchpp, trace

__all__ = [
    "WHICH",
    "ZERO_TOLERANCE",
    "DenseOperator",
    "EigenResult",
    "ScaledOperator",
    "SpectralDensity",
    "SymmetricOperator",
    "TraceEstimate",
    "block_lanczos",
    "exact_trace",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "slq",
    "trace",
]

"""Matrix-free linear algebra on symmetric operators (pure torch, device-agnostic).

Nothing here knows about models or Lightning: every routine sees a matrix only through
:meth:`SymmetricOperator.matmat` on blocks of row vectors.
"""

from .deflation import ComplementOperator, DeflatedSpectrum, deflated_spectrum
from .eigsh import (
    EIGEN_METHODS,
    KRYLOV_BASIS_BYTES,
    WARM_START_MIXING,
    WHICH,
    EigenMethod,
    EigenResult,
    Which,
    block_lanczos,
    default_max_iter,
    eigenpairs,
    eigensolve,
    lanczos,
)
from .operators import DenseOperator, DerivedOperator, ScaledOperator, SymmetricOperator
from .outliers import OutlierReport, count_outliers
from .quadrature import (
    DENSITY_PROBE_COORDINATES,
    FULL_REORTHOGONALISATION_BYTES,
    ZERO_TOLERANCE,
    SpectralDensity,
    default_density_probes,
    slq,
)
from .subspace import principal_angles, subspace_fraction, subspace_overlap
from .trace import (
    TraceEstimate,
    TraceMethod,
    block_traces,
    deflated_hutchinson,
    estimate_trace,
    exact_trace,
    hutchinson,
    hutchpp,
)

__all__ = [
    "DENSITY_PROBE_COORDINATES",
    "EIGEN_METHODS",
    "FULL_REORTHOGONALISATION_BYTES",
    "KRYLOV_BASIS_BYTES",
    "WARM_START_MIXING",
    "WHICH",
    "ZERO_TOLERANCE",
    "ComplementOperator",
    "DeflatedSpectrum",
    "DenseOperator",
    "DerivedOperator",
    "EigenMethod",
    "EigenResult",
    "OutlierReport",
    "ScaledOperator",
    "SpectralDensity",
    "SymmetricOperator",
    "TraceEstimate",
    "TraceMethod",
    "Which",
    "block_lanczos",
    "block_traces",
    "count_outliers",
    "default_density_probes",
    "default_max_iter",
    "deflated_hutchinson",
    "deflated_spectrum",
    "eigenpairs",
    "eigensolve",
    "estimate_trace",
    "exact_trace",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "principal_angles",
    "slq",
    "subspace_fraction",
    "subspace_overlap",
]

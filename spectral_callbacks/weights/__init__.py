"""Weight spectra (no Lightning): the empirical spectral density (ESD) of each weight
matrix or kernel, the power-law fit of its tail, heavy-tailed self-regularisation metrics
(α, α̂, norms, stable rank, Marchenko–Pastur soft rank and spikes, FARMS α), and the drift of
principal singular subspaces."""

from .drift import (
    DRIFT_METRICS,
    SingularBasis,
    SubspaceDrift,
    singular_basis,
    singular_subspace_drift,
)
from .esd import CONV_EIGENVALUE_SCALE, esd, layer_esds, weight_matrices
from .metrics import (
    FIT_METRICS,
    LAYER_METRICS,
    ZERO_WEIGHT_METRICS,
    MarchenkoPasturBulk,
    farms_eigenvalues,
    layer_metrics,
    marchenko_pastur_bulk,
)
from .model import (
    AVERAGED_METRICS,
    LayerFilter,
    LayerSpectrum,
    check_layer_filter,
    model_averages,
    spectra_of,
    weight_layers,
    weight_spectra,
)
from .powerlaw import EIGENVALUE_FLOOR, PowerLawFit, fit_power_law

__all__ = [
    "AVERAGED_METRICS",
    "CONV_EIGENVALUE_SCALE",
    "DRIFT_METRICS",
    "EIGENVALUE_FLOOR",
    "FIT_METRICS",
    "LAYER_METRICS",
    "ZERO_WEIGHT_METRICS",
    "LayerFilter",
    "LayerSpectrum",
    "MarchenkoPasturBulk",
    "PowerLawFit",
    "SingularBasis",
    "SubspaceDrift",
    "check_layer_filter",
    "esd",
    "farms_eigenvalues",
    "fit_power_law",
    "layer_esds",
    "layer_metrics",
    "marchenko_pastur_bulk",
    "model_averages",
    "singular_basis",
    "singular_subspace_drift",
    "spectra_of",
    "weight_layers",
    "weight_matrices",
    "weight_spectra",
]

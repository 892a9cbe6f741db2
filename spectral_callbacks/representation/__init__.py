"""Spectra of representations: RankMe, α-ReQ, effective rank and friends; feature capture."""

from .capture import (
    LAYER_LAYOUTS,
    LayerLayout,
    capture_features,
    infer_layout,
    resolve_layers,
)
from .metrics import (
    COLLAPSED,
    AlphaReqFit,
    alpha_req,
    alpha_req_fit,
    effective_rank,
    participation_ratio,
    rankme,
    stable_rank,
    von_neumann_entropy,
)
from .spectra import (
    LAYOUTS,
    CovarianceAccumulator,
    Layout,
    as_embedding_matrix,
    covariance_spectrum,
    second_moment_spectrum,
)

__all__ = [
    "COLLAPSED",
    "LAYER_LAYOUTS",
    "LAYOUTS",
    "AlphaReqFit",
    "CovarianceAccumulator",
    "LayerLayout",
    "Layout",
    "alpha_req",
    "alpha_req_fit",
    "as_embedding_matrix",
    "capture_features",
    "covariance_spectrum",
    "effective_rank",
    "infer_layout",
    "participation_ratio",
    "rankme",
    "resolve_layers",
    "second_moment_spectrum",
    "stable_rank",
    "von_neumann_entropy",
]

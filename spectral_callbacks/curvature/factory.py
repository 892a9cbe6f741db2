"""One way to build a curvature operator: from checked
:class:`~spectral_callbacks.settings.OperatorSettings`."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..settings import OperatorSettings
from .ggn import GGNOperator
from .hessian import HessianOperator, LossFunction
from .operator import CurvatureOperator

__all__ = ["curvature_operator"]


def curvature_operator(
    model: nn.Module,
    loss_fn: LossFunction | None,
    data: Any,
    settings: OperatorSettings | None = None,
    distributed: bool = False,
) -> CurvatureOperator:
    """The operator ``settings.curvature`` names, over ``data``.

    ``"hessian"``: the :class:`~spectral_callbacks.curvature.HessianOperator` of ``loss_fn``;
    ``"ggn"``: the :class:`~spectral_callbacks.curvature.GGNOperator` of
    ``settings.ggn_loss`` on ``settings.outputs_fn``'s outputs (``loss_fn`` unused).
    ``settings`` default to :class:`~spectral_callbacks.settings.OperatorSettings`'s
    defaults; ``distributed`` as for the operators.
    """
    settings = settings or OperatorSettings()
    if settings.curvature == "ggn":
        return GGNOperator.from_settings(model, data, settings, distributed)
    if loss_fn is None:
        raise ValueError("curvature='hessian' needs loss_fn(model, batch) -> scalar")
    return HessianOperator.from_settings(model, loss_fn, data, settings, distributed)

"""Curvature of each module's diagonal block ``H_ll``: its trace and its top eigenvalue.

The blocks are the selected parameters grouped by the module that owns them
(``"encoder.0.weight"`` and ``"encoder.0.bias"`` make ``"encoder.0"``;
:func:`~spectral_callbacks.curvature.module_groups`). The functional API
(:func:`~spectral_callbacks.functional.hessian_layer_traces`,
:func:`~spectral_callbacks.functional.hessian_layer_lambda_max`) and
:class:`~spectral_callbacks.HessianSpectrumMonitor` both compute them here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..linalg import EigenResult, TraceEstimate, block_traces, eigensolve
from ..settings import EigenSettings, OperatorSettings
from .data import module_groups, module_of, select_parameters
from .hessian import HessianOperator, LossFunction
from .operator import CurvatureOperator

__all__ = ["layer_lambda_max", "layer_traces"]


def layer_traces(
    operator: CurvatureOperator, num_hvps: int, seed: int = 0
) -> dict[str, tuple[int, TraceEstimate]]:
    """module -> (its parameter count, the trace of its block ``H_ll``), in model order.

    One Hutchinson estimate with ``num_hvps`` products serves every block
    (:func:`~spectral_callbacks.linalg.block_traces`, a standard error per block; exact with
    ``num_hvps >= n``): HAWQ-V2's per-layer sensitivity.
    """
    groups = module_groups(operator.names, operator.numels)
    estimates = block_traces(operator, list(groups.values()), num_hvps=num_hvps, seed=seed)
    return {
        module: (size, estimate)
        for (module, size), estimate in zip(groups.items(), estimates, strict=True)
    }


def layer_lambda_max(
    model: nn.Module,
    loss_fn: LossFunction,
    data: Any,
    settings: OperatorSettings,
    tol: float,
    seed: int = 0,
    distributed: bool = False,
) -> dict[str, EigenResult]:
    """module -> the top eigenvalue of its block ``H_ll``: Lanczos to ``tol`` on the Hessian
    restricted to that module's parameters (one solve, and one first-order graph, per module;
    ``settings.params`` selects the parameters, grouped by module). Each result's
    ``num_hvps`` counts that module's products."""
    names = [name for name, _ in select_parameters(model, settings.params)]
    solver = EigenSettings(tol=tol, seed=seed)
    results = {}
    for module in module_groups(names, [1] * len(names)):
        members = [name for name in names if module_of(name) == module]
        block_settings = dataclasses.replace(settings, params=members)
        with HessianOperator.from_settings(
            model, loss_fn, data, block_settings, distributed
        ) as block:
            result = eigensolve(block, solver)
            result.num_hvps = block.num_hvps
        results[module] = result
    return results

"""Fixtures over the shared small models, losses and dense float64 oracles.

The plain pieces live beside this file: ``tests/models.py`` (models, losses, data, state
snapshots) and ``tests/oracles.py`` (dense Hessians and Gauss–Newton matrices from
``torch.func`` or row-by-row double backward, matrices of a given spectrum). The fixtures
here hand them to tests that take them as arguments, and cache what is slow to build.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from .models import CASES, cross_entropy_loss, make_case
from .oracles import dense_hessian_func, dense_hessian_rows


@pytest.fixture(scope="session")
def case_hessian() -> Callable[[str], torch.Tensor]:
    """``case_hessian(name)``: the dense float64 Hessian of ``make_case(name)`` under
    ``cross_entropy_loss`` (batches weighted by size), built once per session. BatchNorm in
    train mode needs the row-by-row oracle; the others use ``torch.func.hessian``."""
    cache: dict[str, torch.Tensor] = {}

    def hessian(name: str) -> torch.Tensor:
        if name not in cache:
            model, batches = make_case(name)
            oracle = dense_hessian_rows if name == "cnn" else dense_hessian_func
            cache[name] = oracle(model, cross_entropy_loss, batches)
        return cache[name]

    return hessian


@pytest.fixture(params=CASES)
def case(request) -> str:
    """Each name of :data:`CASES` in turn."""
    return request.param

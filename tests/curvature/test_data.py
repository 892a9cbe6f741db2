"""Batches and parameters: what an operator is taken over."""

from __future__ import annotations

import pytest
import torch

from spectral_callbacks import (
    Batches,
)
from spectral_callbacks.curvature import as_batch_list


def test_a_plain_tensor_batch_is_one_batch_and_batches_says_it_is_several():
    tokens = torch.randint(0, 11, (4, 7))
    assert len(as_batch_list(tokens)) == 1
    assert len(as_batch_list([tokens])) == 1  # [x] reads as the one batch [x]
    assert len(as_batch_list(Batches([tokens]))) == 1
    assert as_batch_list(Batches([tokens]))[0] is tokens
    assert len(as_batch_list(Batches([tokens, tokens]))) == 2
    with pytest.raises(ValueError, match="holds no batch"):
        as_batch_list([])
    with pytest.raises(ValueError, match="got None: pass a batch or an iterable of batches"):
        as_batch_list(None)

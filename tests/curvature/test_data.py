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


def test_a_dataset_of_samples_is_refused_and_an_iterable_dataset_yields_batches():
    """A map-style dataset read as one batch would reach the loss whole; an
    ``IterableDataset`` may yield batches (as streaming pipelines do), so it is read as one."""
    samples = torch.utils.data.TensorDataset(torch.randn(6, 3), torch.randn(6))
    with pytest.raises(ValueError, match=r"dataset \(TensorDataset\) of samples.*DataLoader"):
        as_batch_list(samples)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from torch.utils.data.DataLoader(samples, batch_size=4)

    assert [len(x) for x, _ in as_batch_list(Stream())] == [4, 2]

"""The outlier count against spectra with a planted number of outliers above a known bulk."""

from __future__ import annotations

import pytest
import torch

from spectral_callbacks.linalg import DenseOperator, SpectralDensity, count_outliers, lanczos, slq

from ..oracles import matrix_with_spectrum

N = 400


def marchenko_pastur_bulk(size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, 2 * N, generator=g, dtype=torch.float64)
    return torch.linalg.eigvalsh(z @ z.T / (2 * N))[:size]  # soft edge near 2.9


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "outliers",
    [[], [4.0, 6.0, 9.0], [3.5 + 0.7 * i for i in range(10)], [4.0, 4.05, 4.1]],
    ids=["none", "three", "ten", "tight-three"],
)
def test_planted_outliers_are_counted(outliers, seed):
    bulk = marchenko_pastur_bulk(N - len(outliers), seed)
    spectrum = torch.cat([bulk, torch.tensor(outliers, dtype=torch.float64)])
    operator = DenseOperator(matrix_with_spectrum(spectrum, seed=seed))
    top = lanczos(operator, k=12, tol=1e-8).eigenvalues
    density = slq(operator, num_probes=8, steps=64, seed=seed)
    report = count_outliers(top, density, operator.size)
    assert report.count == len(outliers)
    assert float(bulk.max()) - 0.5 < report.bulk_edge < min([*outliers, 99.0])
    torch.testing.assert_close(
        report.outliers, torch.tensor(sorted(outliers, reverse=True), dtype=torch.float64)
    )


def test_a_dense_spectrum_reads_like_its_density():
    """The rule on the exact spectrum (one node per eigenvalue, weight 1/n): the reference
    the benchmark compares SLQ's count with."""
    spectrum = torch.cat([marchenko_pastur_bulk(N - 2, 0), torch.tensor([5.0, 7.0]).double()])
    exact = SpectralDensity.of_spectrum(spectrum)
    assert float(exact.moment(1)) == pytest.approx(float(spectrum.mean()), rel=1e-12)
    assert exact.lambda_min == float(spectrum.min()) and exact.support[1] == 7.0
    report = count_outliers(spectrum.sort(descending=True).values[:12], exact, N)
    assert report.count == 2
    with pytest.raises(ValueError, match="min_count must be"):
        count_outliers(spectrum, exact, N, min_count=0)

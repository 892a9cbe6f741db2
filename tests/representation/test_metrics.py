"""Representation spectra against numpy float64 references and closed forms."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spectral_callbacks.representation import (
    COLLAPSED,
    CovarianceAccumulator,
    alpha_req,
    alpha_req_fit,
    as_embedding_matrix,
    capture_features,
    covariance_spectrum,
    effective_rank,
    participation_ratio,
    rankme,
    stable_rank,
    von_neumann_entropy,
)


def gaussian(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def numpy_references(z: np.ndarray) -> dict[str, float]:
    """Every measure written out with numpy from its definition."""
    singular = np.linalg.svd(z, compute_uv=False)
    p = singular / singular.sum() + 1e-7
    cov = np.cov(z, rowvar=False, bias=True)
    lam = np.clip(np.linalg.eigvalsh(cov)[::-1], 0, None)
    q = lam / lam.sum()
    q_pos = q[q > 0]
    entropy = -(q_pos * np.log(q_pos)).sum()
    ranks = np.arange(1, lam.size + 1)
    sel = (ranks >= 11) & (ranks <= 100)
    x, y, w = np.log(ranks[sel]), np.log(lam[sel]), 1.0 / ranks[sel]
    slope = np.polyfit(x, y, 1, w=np.sqrt(w))[0]  # polyfit weights multiply residuals
    return {
        "rankme": float(np.exp(-(p * np.log(p)).sum())),
        "vne": float(entropy),
        "effective_rank": float(np.exp(entropy)),
        "participation_ratio": float(lam.sum() ** 2 / (lam**2).sum()),
        "stable_rank": float(lam.sum() / lam.max()),
        "alpha_req": float(-slope),
    }


def test_all_measures_match_numpy_definitions():
    g = torch.Generator().manual_seed(1)
    # Anisotropic, shifted embeddings so raw and centred spectra differ.
    z = gaussian(600, 120) * torch.linspace(0.05, 2.0, 120) + torch.randn(
        120, generator=g, dtype=torch.float64
    )
    reference = numpy_references(z.numpy())
    ours = {
        "rankme": rankme(z),
        "vne": von_neumann_entropy(z),
        "effective_rank": effective_rank(z),
        "participation_ratio": participation_ratio(z),
        "stable_rank": stable_rank(z),
        "alpha_req": alpha_req(z),
    }
    for name, value in reference.items():
        assert ours[name] == pytest.approx(value, rel=1e-9), name


def test_isotropic_gaussian_follows_marchenko_pastur():
    n, d = 20_000, 64
    z = gaussian(n, d)
    assert rankme(z) > 0.99 * d
    assert participation_ratio(z) == pytest.approx(d / (1 + d / n), rel=0.01)
    assert effective_rank(z) > 0.99 * d


def test_rankme_approaches_d_as_n_over_d_grows():
    d = 32
    values = [rankme(gaussian(n, d, seed=n)) for n in (64, 256, 4096)]
    assert values[0] < values[1] < values[2] <= d
    assert values[2] > 0.99 * d


@pytest.mark.parametrize("rank", [1, 5, 17])
def test_exact_low_rank_embeddings(rank):
    g = torch.Generator().manual_seed(rank)
    # Orthonormal factors with equal singular values: every measure equals the rank.
    left = torch.linalg.qr(torch.randn(500, rank, generator=g, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(64, rank, generator=g, dtype=torch.float64)).Q
    z = left @ right.T
    # The 64 - rank zero singular values get p = ε each: (64 - rank)·ε·|log ε| ≈ 1e-4 of entropy.
    assert rankme(z) == pytest.approx(rank, rel=2e-4)
    centred = z - z.mean(dim=0)
    for measure in (effective_rank, participation_ratio, stable_rank):
        assert measure(z) <= rank + 1e-9
    assert effective_rank(centred) == pytest.approx(effective_rank(z), rel=1e-12)
    # Random factors: unequal singular values, so RankMe is below the rank but close.
    general = torch.randn(500, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, 64, generator=g, dtype=torch.float64
    )
    assert 0.6 * rank <= rankme(general) <= rank + 1e-3


def embeddings_with_covariance(eigenvalues: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Z whose centred covariance has exactly these eigenvalues (to rounding)."""
    g = torch.Generator().manual_seed(seed)
    d = eigenvalues.numel()
    basis = torch.cat(
        [
            torch.ones(n, 1, dtype=torch.float64),
            torch.randn(n, d, generator=g, dtype=torch.float64),
        ],
        dim=1,
    )
    q = torch.linalg.qr(basis).Q[:, 1:]  # orthonormal columns orthogonal to the ones vector
    rotation = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    return math.sqrt(n) * (q * eigenvalues.sqrt()) @ rotation.T + 3.0


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.7])
def test_exact_power_law_recovers_alpha(alpha):
    eigs = torch.arange(1, 201, dtype=torch.float64) ** -alpha
    assert alpha_req(eigs) == pytest.approx(alpha, abs=1e-8)
    assert alpha_req(eigs.flip(0)) == pytest.approx(alpha, abs=1e-8)  # order does not matter
    assert alpha_req(eigs * 7.5, fit_range=(1, 50)) == pytest.approx(alpha, abs=1e-8)
    z = embeddings_with_covariance(eigs, n=1000, seed=int(alpha * 10))
    assert alpha_req(z) == pytest.approx(alpha, abs=1e-8)
    fit = alpha_req_fit(eigs)
    assert torch.allclose(fit.predict(fit.ranks), eigs[10:100], rtol=1e-8)


def test_centred_and_raw_differ_on_a_shifted_cloud():
    z = gaussian(4000, 16)
    shifted = z + 50.0 * torch.ones(16, dtype=torch.float64)
    # Raw RankMe sees the offset as one dominant direction; centred measures do not move.
    assert rankme(shifted) < 0.5 * rankme(z)
    assert rankme(shifted, center=True) == pytest.approx(rankme(z, center=True), rel=1e-9)
    for measure in (effective_rank, participation_ratio, stable_rank, von_neumann_entropy):
        assert measure(shifted) == pytest.approx(measure(z), rel=1e-9)
    assert participation_ratio(shifted, center=False) < 1.1


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=300),
    d=st.integers(min_value=1, max_value=40),
    chunks=st.lists(st.integers(min_value=1, max_value=80), min_size=1, max_size=8),
    offset=st.floats(min_value=-1e3, max_value=1e3),
)
def test_streaming_equals_all_at_once(n, d, chunks, offset):
    z = gaussian(n, d, seed=n * 31 + d) + offset
    whole = CovarianceAccumulator()
    whole.update(z)
    streamed = CovarianceAccumulator()
    start = 0
    for size in chunks * (n // sum(chunks) + 1):
        if start >= n:
            break
        streamed.update(z[start : start + size])
        start += size
    assert streamed.count == whole.count == n
    scale = whole.covariance().abs().max() + 1e-300
    assert torch.allclose(streamed.covariance(), whole.covariance(), rtol=0, atol=1e-12 * scale)
    moment_scale = whole.second_moment().abs().max()
    assert torch.allclose(
        streamed.second_moment(), whole.second_moment(), rtol=0, atol=1e-12 * moment_scale
    )
    exact = torch.from_numpy(np.cov(z.numpy(), rowvar=False, bias=True)).reshape(d, d)
    assert torch.allclose(whole.covariance(), exact, rtol=0, atol=1e-10 * (exact.abs().max() + 1))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(min_value=0.0, max_value=1e6), min_size=1, max_size=50).filter(
        lambda v: sum(v) > 0
    )
)
def test_renyi_ordering_on_one_spectrum(values):
    eigs = torch.tensor(values, dtype=torch.float64)
    tiny = 1e-9
    assert stable_rank(eigs) <= participation_ratio(eigs) * (1 + tiny)
    assert participation_ratio(eigs) <= effective_rank(eigs) * (1 + tiny)
    assert effective_rank(eigs) <= int((eigs > 0).sum()) * (1 + tiny)


def test_fewer_samples_than_dimensions_warns_and_caps():
    z = gaussian(10, 50)
    with pytest.warns(RuntimeWarning, match=r"at most 9 non-zero eigenvalues.*min\(N, D\)"):
        spectrum = covariance_spectrum(z)
    assert int((spectrum > 0).sum()) == 9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert effective_rank(z) <= 9 + 1e-9
        assert rankme(z) <= 10 + 1e-6


def test_token_models_flatten_or_pool():
    tokens = torch.randn(4, 7, 5, dtype=torch.float64)
    assert as_embedding_matrix(tokens).shape == (28, 5)
    assert torch.equal(as_embedding_matrix(tokens, pool="mean"), tokens.mean(dim=1))
    assert torch.equal(as_embedding_matrix(tokens, pool=lambda t: t[:, 0]), tokens[:, 0])
    assert rankme(tokens) == pytest.approx(rankme(tokens.reshape(28, 5)), rel=1e-12)
    with pytest.raises(ValueError, match="pool must be one of"):
        as_embedding_matrix(tokens, pool="max")


def test_a_mask_keeps_the_positions_it_marks():
    """Padding left out: the rows of the kept tokens (flatten), the mean over them per
    sequence (mean; a sequence with none kept gives no row), kept rows of an (N, D) matrix;
    channels-first positions are (N, H, W)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 7, 5, dtype=torch.float64, generator=generator)
    lengths = [7, 3, 0, 5]
    mask = torch.tensor([[t < n for t in range(7)] for n in lengths])
    kept = torch.cat([tokens[b, :n] for b, n in enumerate(lengths)])
    assert torch.equal(as_embedding_matrix(tokens, mask=mask), kept)
    means = torch.stack([tokens[b, :n].mean(dim=0) for b, n in enumerate(lengths) if n])
    torch.testing.assert_close(as_embedding_matrix(tokens, "mean", mask=mask.long()), means)
    rows = tokens[:, 0]
    assert torch.equal(as_embedding_matrix(rows, mask=mask[:, 1]), rows[mask[:, 1]])
    image = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=generator)
    pixels = torch.rand(2, 4, 4, generator=generator) > 0.5
    expected = image.movedim(1, -1)[pixels]
    assert torch.equal(as_embedding_matrix(image, layout="channels_first", mask=pixels), expected)
    with pytest.raises(ValueError, match=r"the mask has shape \(4, 6\).*\(4, 7\)"):
        as_embedding_matrix(tokens, mask=mask[:, :6])
    with pytest.raises(ValueError, match="callable pool"):
        as_embedding_matrix(tokens, pool=lambda t: t[:, 0], mask=mask)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="fit_range"):
        alpha_req(torch.ones(20), fit_range=(5, 5))
    with pytest.raises(ValueError, match="at least 2"):
        alpha_req(torch.ones(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        rankme(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("dead", ["zero", "equal"])
def test_a_collapsed_representation_has_no_dimension(dead):
    """All-zero embeddings have no dimension in any measure; equal embeddings have one raw
    direction (RankMe 1) and no centred one. Equal rows of awkward values leave rounding in
    the covariance, which must read as zero, not as noise's dimension."""
    g = torch.Generator().manual_seed(0)
    row = torch.zeros(1, 48) if dead == "zero" else torch.randn(1, 48, generator=g) * 3 + 0.1
    z = row.repeat(200, 1)
    centred = (effective_rank, stable_rank, participation_ratio)
    assert [measure(z) for measure in centred] == [COLLAPSED] * 3
    assert von_neumann_entropy(z) == 0.0
    expected = COLLAPSED if dead == "zero" else pytest.approx(1.0, abs=1e-3)
    assert rankme(z) == expected
    assert rankme(torch.zeros(5)) == COLLAPSED  # a given spectrum of zeros, too
    with pytest.raises(ValueError, match="at least 2"):
        alpha_req(z, fit_range=(1, 10))  # nothing to fit: the monitor logs NaN by definition


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 9))
        self.pair = _Pair()
        self.head = nn.Linear(9, 2)

    def forward(self, x):
        return self.head(self.pair(self.encoder(x))[0])


class _Pair(nn.Module):
    def forward(self, x):
        return x, x.sum()


def test_hooks_capture_exactly_what_a_direct_forward_returns():
    torch.manual_seed(0)
    model = _Encoder().double()
    x = torch.randn(40, 6, dtype=torch.float64)
    with capture_features(
        model, ["encoder", "encoder.1", "pair"], select={"pair": lambda out: out[0]}
    ) as acc:
        model(x[:15])
        model(x[15:])
    direct = {"encoder": model.encoder(x), "encoder.1": model.encoder[1](model.encoder[0](x))}
    direct["pair"] = direct["encoder"]
    for name, features in direct.items():
        exact = torch.from_numpy(np.cov(features.detach().numpy(), rowvar=False, bias=True))
        assert torch.allclose(acc[name].covariance(), exact, atol=1e-12), name
    assert all(not m._forward_hooks for m in model.modules())


def test_tuple_output_without_select_is_a_clear_error_and_hooks_go_away():
    model = _Encoder().double()
    expected = (
        r"layer 'pair' returned tuple \(Tensor\[3, 9\], Tensor\[\]\), not a tensor; pass "
        r"select=lambda output: output\[0\]"
    )
    with pytest.raises(TypeError, match=expected), capture_features(model, ["pair"]):
        model(torch.randn(3, 6, dtype=torch.float64))
    assert all(not m._forward_hooks for m in model.modules())


def test_a_select_that_returns_no_tensor_is_named_with_what_the_layer_returned():
    model = _Encoder()
    expected = r"select= returned tuple \(Tensor\[3, 9\]\) for layer 'pair', not a tensor; "
    expected += r"the layer returned tuple \(Tensor\[3, 9\], Tensor\[\]\)"
    with (
        pytest.raises(TypeError, match=expected),
        capture_features(model, ["pair"], select=lambda out: out[:1]),
    ):
        model(torch.randn(3, 6))


def test_a_dict_output_error_names_its_keys_and_picks_the_first_matrix():
    class Named(nn.Module):
        def forward(self, x):
            return {"count": 3, "loss": x.sum(), "hidden": x, "pooled": x.mean(1)}

    model = nn.Sequential(nn.Linear(6, 4), Named())
    expected = (
        r"layer '1' returned dict \{'count': int, 'loss': Tensor\[\], 'hidden': Tensor\[2, 4\], "
        r"'pooled': Tensor\[2\]\}, not a tensor; pass select=lambda output: output\['hidden'\]"
    )
    with pytest.raises(TypeError, match=expected), capture_features(model, ["1"]):
        model(torch.randn(2, 6))


def test_unknown_layer_lists_close_matches():
    with (
        pytest.raises(
            ValueError, match=r"'encoderr' is not a submodule.*close matches: \['encoder'"
        ),
        capture_features(_Encoder(), ["encoderr"]),
    ):
        pass


def test_rankme_and_friends_refuse_what_they_cannot_measure():
    assert rankme(torch.zeros(8, 3)) == COLLAPSED  # measurable: no dimension
    with pytest.raises(ValueError, match="empty"):
        rankme(torch.zeros(0))
    with pytest.raises(ValueError, match="complex"):
        rankme(torch.randn(8, 3, dtype=torch.complex64))
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        rankme(torch.full((8, 3), math.nan))

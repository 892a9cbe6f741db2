"""Weight spectra: ESDs against dense eigensolvers, the power-law fit against a direct
implementation of its formulas and against known exponents, the Marchenko–Pastur bulk and
FARMS against random-matrix laws, subspace drift against constructed rotations, and the
whole pipeline against weightwatcher 0.7.7 (installed from the registry by the test extra)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spectral_callbacks.weights import (
    CONV_EIGENVALUE_SCALE,
    esd,
    farms_eigenvalues,
    fit_power_law,
    layer_esds,
    marchenko_pastur_bulk,
    model_averages,
    singular_basis,
    singular_subspace_drift,
    weight_layers,
    weight_spectra,
)
from spectral_callbacks.weights.metrics import FARMS_MAX_WINDOWS, farms_windows


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_esd(weight: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of Wᵀ W per slice by eigvalsh, float64, pooled and scaled."""
    w = weight.detach().double()
    if w.ndim == 2:
        slices, scale = [w], 1.0
    else:
        slices = [w[:, :, i, j] for i in range(w.shape[2]) for j in range(w.shape[3])]
        scale = CONV_EIGENVALUE_SCALE
    values = []
    for m in slices:
        small = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
        values.append(torch.linalg.eigvalsh(small))
    return (torch.cat(values) * scale).sort().values


@pytest.mark.parametrize(
    "shape", [(40, 25), (25, 40), (12, 8, 3, 3), (6, 10, 1, 5)], ids=lambda s: "x".join(map(str, s))
)
def test_esd_equals_the_eigenvalues_of_w_transpose_w(shape):
    weight = torch.randn(*shape, generator=generator())
    assert torch.allclose(esd(weight), dense_esd(weight), rtol=1e-10, atol=1e-12)
    size = min(shape[:2]) * math.prod(shape[2:])
    assert esd(weight).numel() == size


def test_batched_esds_equal_one_at_a_time():
    g = generator(1)
    weights = {f"w{i}": torch.randn(30, 20, generator=g) for i in range(5)}
    weights["kernel"] = torch.randn(30, 20, 3, 3, generator=g)  # slices of the same shape
    weights["other"] = torch.randn(7, 9, generator=g)
    batched = layer_esds(weights)
    assert list(batched) == list(weights)
    for name, weight in weights.items():
        assert torch.allclose(batched[name], dense_esd(weight), rtol=1e-10, atol=1e-12), name


def reference_fit(values: list[float]) -> tuple[float, float, float]:
    """Clauset et al.'s estimator written out candidate by candidate in plain Python."""
    x = sorted(v for v in values if v > 1e-5)
    best = None
    for i in range(len(x) - 1):
        tail = x[i:]
        n = len(tail)
        excess = sum(math.log(t / x[i]) for t in tail)
        alpha = 1 + n / excess if excess > 0 else math.inf  # a tail of ties: no power law
        if 1 < alpha < math.inf:
            distance = max(abs(1 - (t / x[i]) ** (1 - alpha) - k / n) for k, t in enumerate(tail))
        else:
            distance = 1.0
        if best is None or distance < best[2]:
            best = (alpha, x[i], distance)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_law_fit_equals_the_formulas_written_out(seed):
    g = generator(seed)
    values = (torch.rand(300, generator=g, dtype=torch.float64) ** -0.7 * 3).tolist()
    values += [1e-7, 0.0]  # below the floor: left out
    alpha, xmin, distance = reference_fit(values)
    fit = fit_power_law(torch.tensor(values, dtype=torch.float64))
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.xmin == pytest.approx(xmin, rel=1e-15)
    assert fit.ks_distance == pytest.approx(distance, rel=1e-10)
    assert fit.num_fitted == 300
    assert fit.sigma == pytest.approx((alpha - 1) / math.sqrt(fit.num_tail))
    fixed = fit_power_law(torch.tensor(values, dtype=torch.float64), xmin=xmin * 1.0000001)
    assert fixed.xmin == fit.xmin and fixed.alpha == pytest.approx(fit.alpha, rel=1e-12)


def test_ties_at_the_top_are_no_tail():
    """Weights rounded to 16 bits give equal eigenvalues; a tail of ties has no finite α
    and a NaN KS distance, which must not win the minimum (a bfloat16 kernel's FARMS α
    read inf). The fit is the formulas' with such candidates left out."""
    g = generator(5)
    values = (torch.rand(200, generator=g, dtype=torch.float64) ** -0.7 * 3).tolist()
    top = max(values)
    values += [top, top]  # three equal largest eigenvalues
    alpha, xmin, distance = reference_fit(values)
    fit = fit_power_law(torch.tensor(values, dtype=torch.float64))
    assert math.isfinite(fit.alpha) and fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.xmin == pytest.approx(xmin, rel=1e-15)
    assert fit.ks_distance == pytest.approx(distance, rel=1e-10)


@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.0, 4.0])
def test_alpha_of_matrices_with_power_law_spectra(alpha):
    """W = U diag(√λ) Vᵀ with λ drawn from p(λ) ∝ λ^{-α}, λ ≥ 1: the fitted tail exponent is
    within 0.25 (about 3 standard errors at n = 600) of the exponent drawn."""
    g = generator(int(alpha * 10))
    n = 600
    eigenvalues = (1 - torch.rand(n, generator=g, dtype=torch.float64)) ** (-1 / (alpha - 1))
    u, _ = torch.linalg.qr(torch.randn(900, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    weight = u @ torch.diag(eigenvalues.sqrt()) @ v.T
    fit = fit_power_law(esd(weight))
    assert abs(fit.alpha - alpha) <= 0.25
    assert abs(fit.alpha - alpha) <= 4 * fit.sigma


def test_too_few_eigenvalues_for_a_fit():
    with pytest.raises(ValueError, match="at least 2 eigenvalues above floor"):
        fit_power_law(torch.tensor([3.0, 1e-9]))


@pytest.mark.parametrize("rows,columns", [(400, 100), (300, 300), (1000, 200)])
def test_gaussian_matrices_fill_the_marchenko_pastur_bulk(rows, columns):
    spikes = []
    for seed in range(5):
        w = torch.randn(rows, columns, generator=generator(seed), dtype=torch.float64)
        bulk = marchenko_pastur_bulk(esd(w), rows, columns)
        spikes.append(bulk.num_spikes)
        assert bulk.variance == pytest.approx(1.0, abs=1e-12)  # no spike removed
        assert 0.93 <= bulk.soft_rank <= 1.07
        q = rows / columns
        assert bulk.bulk_max == pytest.approx((1 + q**-0.5) ** 2)
    assert sum(spikes) <= 1


@pytest.mark.parametrize("strengths", [(40.0,), (60.0, 45.0, 30.0)])
def test_planted_spikes_are_counted(strengths):
    g = generator(3)
    rows, columns = 500, 200
    noise = torch.randn(rows, columns, generator=g, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(rows, len(strengths), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(columns, len(strengths), generator=g, dtype=torch.float64))
    signal = u @ torch.diag(torch.tensor(strengths, dtype=torch.float64)) @ v.T
    bulk = marchenko_pastur_bulk(esd(noise + signal), rows, columns)
    assert bulk.num_spikes == len(strengths)
    # The bulk's own scale: the noise variance over the mean eigenvalue of noise + signal.
    mean = float(esd(noise + signal).mean())
    assert bulk.variance == pytest.approx(rows / mean, rel=0.05)
    largest = float(esd(noise + signal).max()) / mean
    assert bulk.soft_rank == pytest.approx(bulk.bulk_max / largest) and bulk.soft_rank < 0.75


def test_farms_windows_are_pooled_submatrices():
    w = torch.randn(100, 30, generator=generator(4), dtype=torch.float64)
    windows = farms_windows(100, 30)
    assert len(windows) == 4 and all(w[r, c].shape == (30, 30) for r, c in windows)
    covered = torch.zeros(100, dtype=torch.bool)
    for rows, _ in windows:
        covered[rows] = True
    assert covered.all()
    expected = torch.cat([torch.linalg.eigvalsh(w[r, c].T @ w[r, c]) for r, c in windows])
    assert torch.allclose(farms_eigenvalues(w), expected.sort().values, rtol=1e-10, atol=1e-12)
    # Aspect ratio 2: windows of 60 × 30 rows; a 30 × 100 weight is transposed first.
    assert all(w[r, c].shape == (60, 30) for r, c in farms_windows(100, 30, 2.0))
    assert torch.allclose(farms_eigenvalues(w.T), farms_eigenvalues(w), rtol=1e-10, atol=1e-12)
    # A tall matrix is sampled by 8 evenly spaced windows, the first and last at its ends.
    tall = farms_windows(1000, 10)
    assert len(tall) == FARMS_MAX_WINDOWS == 8
    assert tall[0][0].start == 0 and tall[-1][0].stop == 1000
    kernel = torch.randn(40, 10, 3, 3, generator=generator(5), dtype=torch.float64)
    assert farms_eigenvalues(kernel).numel() == 4 * 10 * 9
    with pytest.raises(ValueError, match="aspect_ratio must be a number >= 1"):
        farms_windows(10, 5, 0.5)


def quarter_circle_cdf(x: torch.Tensor) -> torch.Tensor:
    """CDF of the square (Q = 1) Marchenko–Pastur law of Wᵀ W / M, density
    ``√((4 − x) x) / (2π x)`` on [0, 4]; with ``x = t²`` it integrates in closed form to
    ``(t √(4 − t²) / 2 + 2 arcsin(t / 2)) / π``."""
    t = x.clamp(0, 4).sqrt()
    return (t * (4 - t**2).sqrt() / 2 + 2 * torch.arcsin(t / 2)) / math.pi


def ks_to_quarter_circle(eigenvalues: torch.Tensor, columns: int) -> float:
    x = (eigenvalues / columns).sort().values
    empirical = torch.arange(1, x.numel() + 1, dtype=torch.float64) / x.numel()
    return float((empirical - quarter_circle_cdf(x)).abs().max())


@pytest.mark.parametrize("ratio", [2, 4, 8])
def test_farms_removes_the_aspect_ratio_from_the_esd(ratio):
    """Gaussian N × M matrices: the plain ESD follows MP with Q = N/M, far from the square
    law; the FARMS ESD (square windows) follows the square law at every N/M."""
    columns = 120
    w = torch.randn(ratio * columns, columns, generator=generator(ratio), dtype=torch.float64)
    assert ks_to_quarter_circle(farms_eigenvalues(w), columns) < 0.03
    plain = esd(w) / ratio  # scaled to the same mean, so only the shape differs
    assert ks_to_quarter_circle(plain, columns) > 0.15


def rotation(n: int, i: int, j: int, angle: float) -> torch.Tensor:
    r = torch.eye(n, dtype=torch.float64)
    r[i, i] = r[j, j] = math.cos(angle)
    r[i, j], r[j, i] = -math.sin(angle), math.sin(angle)
    return r


def test_drift_measures_a_constructed_rotation():
    g = generator(6)
    u, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    s = torch.linspace(10, 1, 12, dtype=torch.float64)
    weight = u[:, :12] @ torch.diag(s) @ v.T
    # Turn left singular vector 1 towards vector 15 (outside the top 3) by 0.2 rad.
    turned = u @ rotation(20, 0, 15, 0.2) @ u.T @ weight
    drift = singular_subspace_drift(turned, weight, rank=3)
    assert drift.left_subspace_angle == pytest.approx(0.2, rel=1e-9)
    assert drift.right_subspace_angle == pytest.approx(0.0, abs=1e-7)
    assert drift.singular_value_change == pytest.approx(0.0, abs=1e-12)
    scaled = singular_subspace_drift(1.5 * weight, singular_basis(weight, 3))
    assert scaled.singular_value_change == pytest.approx(0.5)
    assert scaled.left_subspace_angle == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="differ in shape"):
        singular_subspace_drift(weight, weight[:, :5])


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50)
        self.head.weight = self.embedding.weight  # tied: measured once


def test_layer_selection():
    model = Mixed()
    assert list(weight_layers(model)) == ["embedding", "conv"]
    assert list(weight_layers(model, "conv")) == ["conv"]
    assert list(weight_layers(model, ["embedding"])) == ["embedding"]
    assert list(weight_layers(model, lambda name: name.startswith("c"))) == ["conv"]
    with pytest.raises(
        ValueError, match=r"'embeding' names no layer.*close matches: \['embedding'"
    ):
        weight_layers(model, ["embeding"])
    with pytest.raises(ValueError, match="selects no layer"):
        weight_layers(model, "^nothing$")
    with pytest.raises(TypeError, match="layers must be None"):
        weight_layers(model, 3)
    with pytest.raises(ValueError, match="has no layer with a weight"):
        weight_layers(nn.LayerNorm(4))
    compiled = nn.Sequential()
    compiled.add_module("net", torch.compile(nn.Sequential(nn.Linear(4, 4))))
    assert list(weight_layers(compiled)) == ["net.0"]


def test_parametrized_weights_are_read_as_computed_leaving_their_state():
    """spectral_norm read in training mode advances its power iteration (buffers ``_u``,
    ``_v``): the weight is read as eval mode computes it, ``W / (uᵀ W v)`` with the stored
    vectors, and the model is left as it was; an orthogonal weight's ESD is all ones."""
    parametrizations = nn.utils.parametrizations
    torch.manual_seed(0)
    model = nn.Sequential(
        parametrizations.spectral_norm(nn.Linear(12, 20)),
        nn.Tanh(),
        parametrizations.orthogonal(nn.Linear(20, 20)),
    )
    state = {name: value.clone() for name, value in model.state_dict().items()}
    spectra = weight_spectra(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(module.training for module in model.modules())
    norm = model[0].parametrizations.weight[0]
    u, v, w = norm._u.double(), norm._v.double(), model[0].parametrizations.weight.original
    expected = dense_esd(w.double() / torch.dot(u, w.double().mv(v)))
    assert torch.allclose(spectra["0"].eigenvalues, expected, rtol=1e-6)
    assert torch.allclose(spectra["2"].eigenvalues, torch.ones(20, dtype=torch.float64), atol=1e-5)


def test_model_metrics_and_averages():
    model = nn.Sequential(nn.Linear(80, 60), nn.ReLU(), nn.Linear(60, 30), nn.Linear(30, 1))
    spectra = weight_spectra(model)
    assert list(spectra) == ["0", "2", "3"]
    first = spectra["0"]
    x = dense_esd(model[0].weight)
    assert torch.allclose(first.eigenvalues, x, rtol=1e-10)
    m = first.metrics
    assert m["spectral_norm"] == pytest.approx(float(x.max()))
    assert m["log_norm"] == pytest.approx(
        math.log10(float(model[0].weight.double().square().sum()))
    )
    assert m["stable_rank"] == pytest.approx(float(x.sum() / x.max()))
    assert m["alpha"] == pytest.approx(fit_power_law(x).alpha)
    assert m["alpha_weighted"] == pytest.approx(m["alpha"] * math.log10(float(x.max())))
    assert m["log_alpha_norm"] == pytest.approx(math.log10(float(x.pow(m["alpha"]).sum())))
    # A 1 × 30 weight has one eigenvalue: no tail to fit.
    assert math.isnan(spectra["3"].metrics["alpha"]) and spectra["3"].fit is None
    averages = model_averages(spectra)
    assert averages["alpha"] == pytest.approx((m["alpha"] + spectra["2"].metrics["alpha"]) / 2)
    # Square windows of a 60 × 80 weight: FARMS pools two 60 × 60 windows.
    pooled = farms_eigenvalues(model[0].weight)
    assert m["farms_alpha"] == pytest.approx(fit_power_law(pooled).alpha)


def load_crosscheck():
    from bench import weightwatcher_crosscheck

    return weightwatcher_crosscheck


class SmallNet(nn.Module):
    """Layers of every kind weightwatcher reads, some with heavy-tailed weights."""

    def __init__(self) -> None:
        super().__init__()
        g = generator(7)
        self.embedding = nn.Embedding(300, 48)
        self.conv = nn.Conv2d(16, 32, 3)
        self.wide = nn.Linear(200, 120)
        self.heavy = nn.Linear(150, 80)
        with torch.no_grad():
            signs = torch.randint(0, 2, (80, 150), generator=g) * 2 - 1
            self.heavy.weight.copy_(signs * torch.rand(80, 150, generator=g) ** -0.6 / 30)
        self.small = nn.Linear(80, 12)


def test_matches_weightwatcher():
    """The bench's comparison on a small model: eigenvalues to 1e-9 relative, and α, α̂,
    log norms, stable rank and log α-norm to 1e-9 where both fits use the same xmin and
    weightwatcher uses its standard estimator (20 eigenvalues or more)."""
    crosscheck = load_crosscheck()
    model = SmallNet()
    rows = crosscheck.compare(
        weight_spectra(model, farms=False), crosscheck.weightwatcher_layers(model)
    )
    assert [r["layer"] for r in rows] == ["embedding", "conv", "wide", "heavy", "small"]
    for row in rows:
        assert row["eig_rel_diff"] < 1e-9, row["layer"]
        for metric in ("log_norm", "log_spectral_norm", "stable_rank"):
            assert row[f"{metric}_rel_diff"] < 1e-9, (row["layer"], metric)
    comparable = [r for r in rows if r["comparable"]]
    assert [r["layer"] for r in comparable] == ["embedding", "conv", "wide", "heavy"]
    for row in comparable:
        for metric in ("alpha", "alpha_weighted", "log_alpha_norm"):
            assert row[f"{metric}_rel_diff"] < 1e-9, (row["layer"], metric)
    assert rows[-1]["small_sample"]  # 12 eigenvalues: weightwatcher's small-sample estimator


def test_the_layers_measured_are_those_weightwatcher_reads():
    """Attention's packed ``in_proj_weight`` and recurrent ``weight_ih_l0`` are not a
    module's ``.weight``: weightwatcher leaves them out, so do we, and where nothing else is
    left the error names them."""
    model = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    theirs = load_crosscheck().weightwatcher_layers(model)["layers"]
    assert (
        list(weight_layers(model)) == list(theirs) == ["self_attn.out_proj", "linear1", "linear2"]
    )
    with pytest.raises(
        ValueError, match=r"its matrices 0\.weight_ih_l0, 0\.weight_hh_l0 are not a module's"
    ):
        weight_layers(nn.Sequential(nn.LSTM(3, 4)))


def test_convolutions_weightwatcher_leaves_out_are_measured_as_conv2d_kernels():
    """weightwatcher 0.7.7 reads ``nn.Conv2d`` but leaves ``nn.Conv1d``, ``nn.Conv3d`` and
    transposed convolutions out; we measure them as ``Conv2d`` kernels: one matrix per
    kernel position, eigenvalues times 1/2."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(12, 20, 3),
        nn.Conv3d(4, 10, 2),
        nn.ConvTranspose2d(16, 24, 3),
        nn.Conv2d(16, 24, 3),
    )
    assert list(load_crosscheck().weightwatcher_layers(model)["layers"]) == ["3"]
    weights = weight_layers(model)
    assert list(weights) == ["0", "1", "2", "3"]
    for name, spectrum in layer_esds(weights).items():
        kernel = model.get_submodule(name).weight.detach().double()
        slices = kernel.flatten(2).permute(2, 0, 1)  # one matrix per kernel position
        expected = torch.linalg.svdvals(slices).pow(2).flatten().sort().values * 0.5
        assert torch.allclose(spectrum, expected, rtol=1e-12), name

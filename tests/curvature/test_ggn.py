"""The generalised Gauss–Newton operator against a dense Jᵀ H_out J from torch.func.jacrev."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from spectral_callbacks.curvature import GGNOperator, NonFiniteLossError

from ..models import make_case, padded_tokens_case
from ..oracles import dense_ggn


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
def test_ggn_products_match_the_dense_gauss_newton_matrix(loss):
    model, batches = make_case("mlp")  # outputs (n, 3), batches of 7, 4 and 9
    if loss != "cross_entropy":
        g = torch.Generator().manual_seed(5)
        batches = [
            (x, torch.rand(x.shape[0], 3, generator=g, dtype=torch.float64)) for x, _ in batches
        ]
    dense = dense_ggn(model, batches, loss)
    with GGNOperator(model, loss, batches) as ggn:
        g = torch.Generator().manual_seed(6)
        block = torch.randn(4, ggn.size, generator=g, dtype=torch.float64)
        torch.testing.assert_close(ggn.matmat(block), block @ dense, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(dense).min() > -1e-12  # PSD, as G must be


def test_cross_entropy_rows_with_the_ignore_index_add_no_curvature():
    """Targets -100 (torch's ignore_index: padding) add no loss term, and the mean is over
    the rows that remain, as in F.cross_entropy; a batch of ignored rows only adds none."""
    model, batches = make_case("mlp")
    padded = [(x, y.clone()) for x, y in batches]
    padded[0][1][:3] = -100
    padded[2][1][1::2] = -100
    padded[1][1][:] = -100
    dense = dense_ggn(model, [padded[0], padded[2]], "cross_entropy")
    sizes = [x.shape[0] for x, _ in batches]  # batches weighted by size, as always
    dense *= (sizes[0] + sizes[2]) / sum(sizes)
    with GGNOperator(model, "cross_entropy", padded) as ggn:
        block = torch.randn(3, ggn.size, generator=torch.Generator().manual_seed(7)).double()
        torch.testing.assert_close(ggn.matmat(block), block @ dense, rtol=1e-10, atol=1e-12)


def test_functional_and_monitor_measure_the_ggn_beside_the_hessian():
    import lightning as L

    from spectral_callbacks import HessianSpectrumMonitor
    from spectral_callbacks.functional import hessian_eigenvalues, hessian_trace

    from ..models import NoisyClassifier, classification_loader, cross_entropy_loss, trainer_kwargs

    model, batches = make_case("mlp")
    dense = dense_ggn(model, batches, "cross_entropy")
    exact = torch.linalg.eigvalsh(dense).flip(0)
    result = hessian_eigenvalues(
        model, None, batches, k=3, tol=1e-10, curvature="ggn", ggn_loss="cross_entropy"
    )
    torch.testing.assert_close(result.eigenvalues, exact[:3], rtol=1e-8, atol=1e-12)
    trace = hessian_trace(
        model, None, batches, num_hvps=10_000, curvature="ggn", ggn_loss="cross_entropy"
    )
    assert trace.estimate == pytest.approx(float(dense.trace()), rel=1e-10)
    hessian = hessian_eigenvalues(model, cross_entropy_loss, batches, k=1, tol=1e-10)
    assert float(hessian.eigenvalues[0]) != pytest.approx(float(exact[0]), rel=1e-3)
    with pytest.raises(ValueError, match="needs ggn_loss"):
        hessian_eigenvalues(model, None, batches, curvature="ggn")

    L.seed_everything(0, verbose=False)
    ggn = HessianSpectrumMonitor(
        every_n_steps=1,
        k=2,
        tol=1e-8,
        trace=False,
        density=False,
        curvature="ggn",
        ggn_loss="cross_entropy",
        gradient_overlap=False,
        eval_mode=True,
    )
    spectrum = HessianSpectrumMonitor(every_n_steps=1, k=2, trace=False, density=False)
    ((x, y),) = list(classification_loader(n=32, batch_size=32))
    data = torch.utils.data.TensorDataset(x.double(), y)
    loader = torch.utils.data.DataLoader(data, batch_size=32)

    class Optimizerless(NoisyClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    module = Optimizerless().double()
    trainer = L.Trainer(max_steps=1, callbacks=[ggn, spectrum], **trainer_kwargs())
    trainer.fit(module, loader)
    module.eval()
    truth = hessian_eigenvalues(
        module, None, (x.double(), y), k=2, tol=1e-10, curvature="ggn", ggn_loss="cross_entropy"
    )
    assert ggn.last_metrics["spectral/ggn/eig_1"] == pytest.approx(
        float(truth.eigenvalues[0]), rel=1e-6
    )
    assert "spectral/hessian/eig_1" in spectrum.last_metrics
    with pytest.raises(ValueError, match="gradient_overlap=False"):
        HessianSpectrumMonitor(curvature="ggn", ggn_loss="mse")


def test_a_bfloat16_model_gets_float32_vectors_and_products_near_the_dense_ggn():
    """Products run in bfloat16, vectors (and so the solvers' bases) stay float32."""
    model, batches = make_case("mlp")
    low = copy.deepcopy(model).to(torch.bfloat16)
    low_batches = [(x.to(torch.bfloat16), y) for x, y in batches]
    with GGNOperator(low, "cross_entropy", low_batches) as ggn:
        assert (ggn.dtype, ggn.product_dtype) == (torch.float32, torch.bfloat16)
        block = torch.randn(3, ggn.size, generator=torch.Generator().manual_seed(2))
        products = ggn.matmat(block)
        assert products.dtype == torch.float32
    # The reference: the float64 GGN at the bfloat16-rounded weights.
    exact = block.double() @ dense_ggn(low.double(), batches, "cross_entropy")
    error = (products.double() - exact).norm() / exact.norm()
    assert error < 1e-2  # bfloat16 forward and backward passes: a few units of 2^-8


def test_an_empty_batch_is_refused_by_name():
    model, batches = make_case("mlp")
    x, y = batches[0]
    with pytest.raises(ValueError, match="at least one sample"):
        GGNOperator(model, "cross_entropy", [batches[1], (x[:0], y[:0])])


class DictOutputs(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return {"logits": self.inner(x)}


def test_batches_and_outputs_the_default_cannot_read_ask_for_outputs_fn():
    """The default outputs are ``(model(x), y)``: a dict batch (a Hugging Face model's) or
    an output that is not a tensor is refused with what to pass, not a KeyError."""
    model, batches = make_case("mlp")
    x, y = batches[0]
    ones = torch.ones(1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for data, net, said in [
        ({"input": x, "labels": y}, model, r"a dict with keys \['input', 'labels'\]"),
        ((x, y), DictOutputs(model), r"model\(x\) returned dict"),
    ]:
        with (
            GGNOperator(net, "cross_entropy", data) as ggn,
            pytest.raises(TypeError, match=said + r".*outputs_fn=lambda model, batch"),
        ):
            ggn.matmat(ones)
    outputs_fn = lambda m, b: (m(b["input"]), b["labels"])  # noqa: E731
    with (
        GGNOperator(model, "cross_entropy", {"input": x, "labels": y}, outputs_fn) as ggn,
        GGNOperator(model, "cross_entropy", (x, y)) as plain,
    ):
        torch.testing.assert_close(ggn.matmat(ones), plain.matmat(ones))


def test_a_non_finite_output_raises_on_the_first_product():
    model, batches = make_case("mlp")
    x, y = batches[0]
    poisoned = [(torch.full_like(x, math.nan), y)]
    with (
        GGNOperator(model, "cross_entropy", poisoned) as ggn,
        pytest.raises(NonFiniteLossError, match="an output is nan"),
    ):
        ggn.matvec(torch.ones(ggn.size, dtype=torch.float64))


def test_padding_rows_are_held_fixed():
    """An embedding's padding row is held fixed in the GGN as in the Hessian: ``G`` is
    ``P Jᵀ H_out J P`` (its ``J v``, by double vjp, gives the row nothing, like ``Jᵀ u``)."""
    model, batch, plain = padded_tokens_case()
    dense = dense_ggn(plain, [batch], "cross_entropy")
    dense[:3], dense[:, :3] = 0.0, 0.0  # the embedding's row 0 comes first
    with GGNOperator(model, "cross_entropy", batch) as ggn:
        block = torch.randn(3, ggn.size, generator=torch.Generator().manual_seed(2))
        products = ggn.matmat(block.double())
    torch.testing.assert_close(products, block.double() @ dense, rtol=1e-10, atol=1e-12)

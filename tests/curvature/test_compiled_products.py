"""The ``hvp="compiled"`` path: exact products, one compilation per run, a safe fallback.

Most tests compile with small backends (a counting one that returns the traced graph, or
``aot_eager``): they exercise what this library controls (tracing through ``torch.func``,
the cache across operators, the guards, the fallback) in seconds. One test compiles with
the default ``inductor`` backend end to end.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from spectral_callbacks.callbacks.base import muted_lightning_logging, training_step_loss
from spectral_callbacks.curvature import HessianOperator, clear_compiled_products
from spectral_callbacks.curvature.products import ForwardOverReverseProducts
from spectral_callbacks.curvature.products.compiled import (
    COMPILED_CACHE_SIZE,
    INNER_PRODUCT_CRASHES,
    _InnerProductWatch,
    cache_size,
    compiled_entries,
)
from spectral_callbacks.linalg import lanczos

from ..models import (
    CountingBackend,
    ManualMSERegressor,
    cross_entropy_loss,
    make_case,
    mse,
    regression_data,
)
from ..oracles import dense_hessian_func, dense_hessian_rows


def _block(size: int, width: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(width, size, dtype=torch.float64, generator=generator)


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention"])
def test_compiled_products_match_dense(name):
    """BatchNorm in train mode and default-kernel attention included (aot_eager traces the
    joint forward-over-reverse graph as inductor would)."""
    model, batches = make_case(name)
    oracle = dense_hessian_rows if name == "cnn" else dense_hessian_func
    hessian = oracle(model, cross_entropy_loss, batches)
    with HessianOperator(
        model, cross_entropy_loss, batches, hvp="compiled", compile_backend="aot_eager"
    ) as op:
        block = _block(op.size)
        assert torch.allclose(op.matmat(block), block @ hessian, atol=1e-10)
        assert [entry.failed for entry in compiled_entries(model)] == [False]


def test_one_compilation_serves_later_measurements():
    """A new operator per measurement, new parameter values after an optimizer step: the
    compiled function is reused, not recompiled (guards see only shapes and dtypes)."""
    model, batches = make_case("mlp")
    backend = CountingBackend()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        with HessianOperator(
            model, cross_entropy_loss, batches[0], hvp="compiled", compile_backend=backend
        ) as op:
            block = _block(op.size)
            expected = block @ dense_hessian_func(model, cross_entropy_loss, [batches[0]])
            assert torch.allclose(op.matmat(block), expected, atol=1e-10)
        optimizer.zero_grad()
        cross_entropy_loss(model, batches[0]).backward()
        optimizer.step()
    assert backend.graphs == 1


def test_training_step_loss_compiles_once_across_measurements():
    """The probe loss of the callbacks: ``training_step`` with ``self.log`` muted. The muting
    function is one object, so its identity guard holds from one measurement to the next."""
    x, y = regression_data(n=16, d=4, dtype=torch.float64)
    module = ManualMSERegressor(d=4, width=6).double()
    backend = CountingBackend()
    values = []
    for _ in range(2):
        with (
            muted_lightning_logging(module),
            HessianOperator(
                module, training_step_loss, (x, y), hvp="compiled", compile_backend=backend
            ) as op,
        ):
            block = _block(op.size, width=2)
            values.append(op.matmat(block))
    squared_error = lambda model, batch: (model(batch[0]) - batch[1]).pow(2).mean()  # noqa: E731
    expected = block @ dense_hessian_func(module, squared_error, [(x, y)])
    assert torch.allclose(values[1], expected, atol=1e-10)
    assert backend.graphs == 1


def test_failed_compilation_warns_once_and_falls_back():
    model, batches = make_case("attention")
    hessian = dense_hessian_func(model, cross_entropy_loss, batches)
    calls = []

    def broken_backend(graph_module, example_inputs):
        calls.append(1)
        raise RuntimeError("this backend cannot compile anything")

    failure = "torch.compile of the Hessian-vector product failed"
    with (
        pytest.warns(RuntimeWarning, match=failure),
        HessianOperator(
            model, cross_entropy_loss, batches, hvp="compiled", compile_backend=broken_backend
        ) as op,
    ):
        block = _block(op.size)
        assert torch.allclose(op.matmat(block), block @ hessian, atol=1e-10)
    with HessianOperator(
        model, cross_entropy_loss, batches, hvp="compiled", compile_backend=broken_backend
    ) as op:  # the failure is remembered: no second attempt, no second warning
        assert torch.allclose(op.matmat(block), block @ hessian, atol=1e-10)
    assert len(calls) == 1


def test_a_product_that_compiles_no_graph_warns_and_runs_eagerly():
    """A graph break that dynamo cannot split inside the torch.func transforms (here a loss
    under ``torch.compiler.disable``; in torch 2.9 a ``training_step`` loss) makes the whole
    product run eagerly with no graph compiled: the choice of ``compiled`` is then said to
    have no effect, once, and the products stay exact."""
    model, batches = make_case("mlp")
    hessian = dense_hessian_func(model, cross_entropy_loss, batches)
    disabled = torch.compiler.disable(lambda m, batch: cross_entropy_loss(m, batch))
    backend = CountingBackend()
    with (
        pytest.warns(RuntimeWarning, match="it compiled no graph"),
        HessianOperator(model, disabled, batches, hvp="compiled", compile_backend=backend) as op,
    ):
        block = _block(op.size)
        assert torch.allclose(op.matmat(block), block @ hessian, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning
        with HessianOperator(
            model, disabled, batches, hvp="compiled", compile_backend=backend
        ) as op:
            assert torch.allclose(op.matmat(block), block @ hessian, atol=1e-10)
    assert backend.graphs == 0


def test_compiled_path_falls_back_to_the_reused_graph_where_eager_jvp_fails():
    """``F.mse_loss`` fails under forward-over-reverse even eagerly: the eager check runs
    before anything is compiled (compiling it crashes the process in torch 2.13), and the
    products come from the reused first-order graph instead."""
    import torch.nn.functional as F

    model, batches = make_case("mlp")
    x, labels = batches[0]
    target = F.one_hot(labels, 3).double()

    backend = CountingBackend()
    hessian = dense_hessian_func(model, mse, [(x, target)])
    with (
        pytest.warns(RuntimeWarning, match="falling back to the reused first-order graph"),
        HessianOperator(model, mse, (x, target), hvp="compiled", compile_backend=backend) as op,
    ):
        block = _block(op.size)
        assert torch.allclose(op.matmat(block), block @ hessian, atol=1e-10)
        assert torch.allclose(op.matmat(block), block @ hessian, atol=1e-10)
    assert backend.graphs == 0
    with (
        pytest.raises(RuntimeError, match="hvp='reuse_graph'"),
        HessianOperator(model, mse, (x, target), hvp="forward_over_reverse") as op,
    ):
        op.matmat(block)


def test_inductor_lanczos_matches_eigvalsh():
    """The default backend end to end: a Lanczos solve on compiled single-vector products."""
    model, batches = make_case("mlp", seed=3)
    batch = batches[0]
    expected = torch.linalg.eigvalsh(dense_hessian_func(model, cross_entropy_loss, [batch]))
    with HessianOperator(model, cross_entropy_loss, batch, hvp="compiled") as op:
        result = lanczos(op, k=2, tol=1e-10)
        (entry,) = compiled_entries(model)
    assert torch.allclose(result.eigenvalues, expected.flip(0)[:2], rtol=1e-8, atol=1e-12)
    # Inductor's CPU code needs a C++ compiler; without one the fallback (tested above) runs.
    if shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"):
        assert not entry.failed


_SPECTRAL_NORM_SCRIPT = """
import warnings
import torch
from torch import nn
from spectral_callbacks.curvature import HessianOperator
from spectral_callbacks.linalg import lanczos
from tests.oracles import dense_hessian_rows

torch.manual_seed(0)
linear = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 6))
model = nn.Sequential(linear, nn.Tanh(), nn.Linear(6, 1)).double().eval()
batch = (torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64))

def loss(m, b):
    return (m(b[0]) - b[1]).pow(2).mean()

expected = torch.linalg.eigvalsh(dense_hessian_rows(model, loss, [batch]))[-1]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with HessianOperator(model, loss, batch, hvp="compiled") as op:
        result = lanczos(op, k=1, tol=1e-10)
assert abs(float(result.eigenvalues[0]) - float(expected)) <= 1e-8 * float(expected)
print("|".join(str(w.message) for w in caught))
"""


def test_inductor_never_compiles_an_inner_product_of_vectors_where_it_crashes():
    """spectral_norm computes ``torch.vdot(u, W v)``: torch's inductor before 2.14 ends the
    process compiling that product on the CPU (a segmentation fault, run apart here so that
    it fails this test only). There the product stays eager, said once; in later torch it
    compiles. Either way λ_max is the dense Hessian's."""
    result = subprocess.run(
        [sys.executable, "-c", _SPECTRAL_NORM_SCRIPT],
        cwd=pathlib.Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    said = "inner product of two vectors (vdot)"
    assert (said in result.stdout) == INNER_PRODUCT_CRASHES, result.stdout


def test_the_inner_product_watch_sees_vector_inner_products_only():
    u, v, m = torch.randn(3), torch.randn(3), torch.randn(2, 3)
    for compute, seen in [
        (lambda: torch.dot(u, v), "dot"),
        (lambda: u @ v, "matmul"),
        (lambda: torch.inner(u, v), "inner"),
        (lambda: u.vdot(v), "vdot"),
        (lambda: m @ u, None),
        (lambda: torch.inner(m, m), None),
        (lambda: (u * v).sum(), None),
    ]:
        with _InnerProductWatch() as watch:
            compute()
        assert watch.seen == seen


def test_sharpness_monitor_on_compiled_products():
    """In a Lightning run: training stays bit-identical (compilation happens inside the
    measurement's forked RNG), λ_max equals the reused graph's, and one compiled function
    serves every measurement. In train mode the dropout masks of compiled code differ from
    eager ones, so the check rejects it: one warning, eager products, the same training."""
    from spectral_callbacks import SharpnessMonitor

    from ..runs import assert_identical_runs, fit_and_capture

    plain = fit_and_capture([])
    compiled_monitor = SharpnessMonitor(every_n_steps=4, eval_mode=True, hvp="compiled")
    compiled_run = fit_and_capture([compiled_monitor])
    assert_identical_runs(plain, compiled_run)
    entries = compiled_entries(compiled_run[0])
    assert len(entries) == 1 and not entries[0].failed
    assert len(entries[0]._checked) == 1  # one width, one batch shape: checked once

    eager_monitor = SharpnessMonitor(every_n_steps=4, eval_mode=True, hvp="reuse_graph")
    fit_and_capture([eager_monitor])
    key = "spectral/hessian/lambda_max"
    compiled_values = [values[key] for _, values in compiled_monitor.history]
    eager_values = [values[key] for _, values in eager_monitor.history]
    assert len(compiled_values) == len(eager_values) >= 3
    for a, b in zip(compiled_values, eager_values, strict=True):
        assert a == pytest.approx(b, rel=1e-4)

    with pytest.warns(RuntimeWarning, match="differ from eager"):
        dropout_run = fit_and_capture([SharpnessMonitor(every_n_steps=4, hvp="compiled")])
    assert_identical_runs(plain, dropout_run)
    assert [entry.failed for entry in compiled_entries(dropout_run[0])] == [True]


def test_compiled_cache_is_bounded_and_can_be_cleared():
    """Entries hold their models; the cache keeps the most recent few and lets go of older
    models (nothing compiles here: an entry is created before its first call)."""
    import gc
    import weakref

    from ..models import tanh_mlp

    clear_compiled_products()
    batch = (torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))
    models = [tanh_mlp() for _ in range(COMPILED_CACHE_SIZE + 1)]
    first = weakref.ref(models[0])
    for model in models:
        operator = HessianOperator(model, cross_entropy_loss, batch, hvp="compiled")
        ForwardOverReverseProducts(operator, compiled=True)  # creates the cache entry
    assert cache_size() == COMPILED_CACHE_SIZE and not compiled_entries(models[0])
    del models[0]
    gc.collect()
    assert first() is None
    clear_compiled_products()
    assert cache_size() == 0

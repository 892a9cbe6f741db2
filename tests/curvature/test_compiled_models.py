"""Models that hold ``torch.compile``'d modules: measured eagerly, never recompiled, and named
as the user wrote them.

Compiled graphs (aot_autograd) have no double backward, and every probe forward through a
compiled module differs from a training forward (grad mode, batch shape, capture hooks), so
dynamo would compile the user's module again per measurement until its recompile limit sent
the user's model to eager execution for the rest of training. The user's backend here counts
the graphs it compiles: a measurement must add none.
"""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from torch import nn

from spectral_callbacks import RepresentationMonitor, SharpnessMonitor
from spectral_callbacks.curvature import HessianOperator, select_parameters
from spectral_callbacks.curvature.products import explain_second_order_failure
from spectral_callbacks.representation import resolve_layers

from ..models import (
    CountingBackend,
    ManualMSERegressor,
    cross_entropy_loss,
    full_batch_loader,
    make_case,
    regression_data,
    trainer_kwargs,
)
from ..oracles import dense_hessian_func


class Holder(nn.Module):
    """A model whose body is a compiled submodule (``net._orig_mod.*`` in its names)."""

    def __init__(self, net: nn.Module, backend) -> None:
        super().__init__()
        self.net = torch.compile(net, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("hvp", ["reuse_graph", "forward_over_reverse", "compiled"])
def test_products_through_a_compiled_submodule_are_exact_and_compile_nothing_of_the_user(hvp):
    net, batches = make_case("mlp")
    hessian = dense_hessian_func(net, cross_entropy_loss, batches)
    user_backend = CountingBackend()
    model = Holder(net, user_backend)
    for x, y in batches:  # the user's training compiles the module for each batch shape
        cross_entropy_loss(model, (x, y)).backward()
    model.zero_grad()
    compiled_by_user = user_backend.graphs
    assert compiled_by_user >= 1

    our_backend = CountingBackend()
    with HessianOperator(
        model, cross_entropy_loss, batches, hvp=hvp, compile_backend=our_backend
    ) as op:
        block = torch.randn(
            3, op.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
        )
        assert torch.allclose(op.matmat(block), block @ hessian, atol=1e-10)
        assert torch.allclose(op.matmat(block), block @ hessian, atol=1e-10)
    assert user_backend.graphs == compiled_by_user
    # Our own compiled product still compiles (once per batch shape), tracing through the
    # user's module as plain code.
    assert our_backend.graphs == (len(batches) if hvp == "compiled" else 0)


def test_monitors_on_a_compiled_submodule_match_the_uncompiled_model():
    """A Lightning run whose network is compiled: the monitors log what they log for the
    same network uncompiled, the training is the same as without monitors, and the user's
    module is compiled as often as without monitors (layers named without ``_orig_mod``)."""
    x, y = regression_data()

    def fit(compiled: bool, monitored: bool):
        torch.manual_seed(0)
        module = ManualMSERegressor()
        backend = CountingBackend()
        if compiled:
            module.net = torch.compile(module.net, backend=backend)
        callbacks = (
            [
                SharpnessMonitor(every_n_steps=5),
                RepresentationMonitor(layers=["net.1"], every_n_steps=5),
            ]
            if monitored
            else []
        )
        trainer = L.Trainer(max_epochs=1, callbacks=callbacks, **trainer_kwargs())
        trainer.fit(module, full_batch_loader(x, y, 12))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        return metrics, [p.detach().clone() for p in module.parameters()], backend.graphs

    _, plain_parameters, plain_graphs = fit(compiled=True, monitored=False)
    metrics, parameters, graphs = fit(compiled=True, monitored=True)
    reference, _, _ = fit(compiled=False, monitored=True)
    assert graphs == plain_graphs >= 1
    assert all(torch.equal(a, b) for a, b in zip(plain_parameters, parameters, strict=True))
    assert "spectral/repr/net.1/rankme" in metrics
    spectral = [n for n in reference if n.startswith("spectral/") and not n.endswith("overhead")]
    assert len(spectral) >= 8
    for name in spectral:
        assert metrics[name] == pytest.approx(reference[name], rel=1e-4, abs=1e-6), name


def test_parameters_and_layers_are_named_with_or_without_orig_mod():
    net, _ = make_case("mlp")
    model = Holder(net, "eager")
    chosen = [name for name, _ in select_parameters(model, ["net.0"])]
    assert chosen == ["net._orig_mod.0.weight", "net._orig_mod.0.bias"]
    assert [name for name, _ in select_parameters(model, ["net._orig_mod.2.bias"])] == [
        "net._orig_mod.2.bias"
    ]
    assert [name for name, _ in select_parameters(model, r"^net\.4\.")] == [
        "net._orig_mod.4.weight",
        "net._orig_mod.4.bias",
    ]
    with pytest.raises(ValueError, match=r"'net\.9' names no trainable parameter"):
        select_parameters(model, ["net.9"])

    layers = resolve_layers(model, ["net.1", "net._orig_mod.2", "net"])
    assert layers["net.1"] is net[1] and layers["net._orig_mod.2"] is net[2]
    assert layers["net"] is model.net  # a module's own name wins: the compiled wrapper
    with pytest.raises(ValueError, match=r"'net\.7' is not a submodule"):
        resolve_layers(model, ["net.7"])


def test_double_backward_of_compiled_graphs_is_explained():
    """What PyTorch < 2.6 (no ``torch.compiler.set_stance``) would raise."""
    error = RuntimeError(
        "torch.compile with aot_autograd does not currently support double backward"
    )
    explained = str(explain_second_order_failure(error))
    assert "set_stance" in explained and "_orig_mod" in explained and "2.6" in explained

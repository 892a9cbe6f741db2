"""Every public constructor checks its arguments at once, or the object it builds trains.

Random values (wrong types, out of range, NaN, truthy strings, ``True`` for integers) are
thrown at random subsets of each constructor's arguments. Each draw must end in a
``ValueError`` / ``TypeError`` whose message names one of the arguments drawn, or in a
callback with which a short training run finishes.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spectral_callbacks
from spectral_callbacks import (
    HessianSpectrumMonitor,
    RepresentationMonitor,
    SharpnessMonitor,
    SpectralEarlyStopping,
    WeightSpectrumMonitor,
)
from spectral_callbacks.functional import (
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
)

from ..models import (
    AnyBatchRegressor,
    TanhRegressor,
    cli_round_trip,
    regression_data,
    trainer_kwargs,
)
from ..oracles import dense_hessian_func

ODD_VALUES = [
    None,
    True,
    False,
    -1,
    0,
    1,
    2,
    3,
    7,
    0.5,
    1e-3,
    -0.5,
    math.nan,
    math.inf,
    "abc",
    "0.5",
    "no",
    "auto",
    "sum",
    "mean",
    [],
    (),
    {},
    (2, 1),
    (1, 3),
    ["net.0"],
    "^net\\.4\\.",
    "[unclosed",
    lambda *args: None,
    object(),
]

CONSTRUCTORS = {
    "SharpnessMonitor": SharpnessMonitor,
    "HessianSpectrumMonitor": HessianSpectrumMonitor,
    "RepresentationMonitor": RepresentationMonitor,
    "SpectralEarlyStopping": SpectralEarlyStopping,
    "SpectralEarlyStopping.sharpness": SpectralEarlyStopping.sharpness,
    "SpectralEarlyStopping.rank_collapse": SpectralEarlyStopping.rank_collapse,
    "SpectralEarlyStopping.alpha_band": SpectralEarlyStopping.alpha_band,
    "WeightSpectrumMonitor": WeightSpectrumMonitor,
}

# What each constructor needs to be useful in the run below; drawn arguments replace these.
BASE_ARGUMENTS = {
    "SharpnessMonitor": {"every_n_steps": 1},
    "HessianSpectrumMonitor": {
        "every_n_steps": 1,
        "k": 2,
        "trace_hvps": 4,
        "density_probes": 1,
        "density_steps": 3,
    },
    "RepresentationMonitor": {"layers": ["net.1"], "every_n_steps": 1, "num_samples": 16},
    "SpectralEarlyStopping": {"monitor": "spectral/hessian/lambda_max"},
    "SpectralEarlyStopping.sharpness": {},
    "SpectralEarlyStopping.rank_collapse": {"layer": "net.1"},
    "SpectralEarlyStopping.alpha_band": {},
    "WeightSpectrumMonitor": {"every_n_steps": 1},
}


def _parameters(function) -> list[str]:
    return [
        name
        for name, p in inspect.signature(function).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in ("self", "cls")
    ]


def _train(callback) -> None:
    x, y = regression_data(n=16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    callbacks = [callback]
    if isinstance(callback, SpectralEarlyStopping):
        # A producer of whatever it monitors, so that its setup check passes.
        callbacks += [
            SharpnessMonitor(every_n_steps=1),
            RepresentationMonitor(layers=["net.1"], every_n_steps=1, num_samples=16),
            WeightSpectrumMonitor(every_n_steps=1),
        ]
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=2, callbacks=callbacks, **trainer_kwargs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TanhRegressor(), loader)
    assert trainer.global_step == 2


@st.composite
def calls(draw):
    name = draw(st.sampled_from(sorted(CONSTRUCTORS)))
    names = _parameters(CONSTRUCTORS[name])
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    values = {arg: draw(st.sampled_from(ODD_VALUES)) for arg in chosen}
    return name, values


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(calls())
def test_bad_arguments_are_refused_by_name_or_the_callback_trains(call):
    name, drawn = call
    arguments = {**BASE_ARGUMENTS[name], **drawn}
    try:
        callback = CONSTRUCTORS[name](**arguments)
    except (ValueError, TypeError) as error:
        message = str(error)
        assert any(arg in message for arg in drawn), (name, drawn, message)
        return
    try:
        _train(callback)
    except (ValueError, TypeError) as error:
        # Checked against the model at setup (k larger than the parameters, an unknown
        # layer or parameter name): named too.
        message = str(error)
        assert any(arg in message for arg in drawn), (name, drawn, message)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SharpnessMonitor(every_n_steps=True), "every_n_steps must be an integer"),
        (lambda: HessianSpectrumMonitor(k=True), "k must be an integer"),
        (lambda: SharpnessMonitor(optimizer_aware="no"), "optimizer_aware must be True or False"),
        (lambda: SharpnessMonitor(seed="0"), "seed must be an integer"),
        (lambda: SharpnessMonitor(loss_fn=3), "loss_fn must be callable"),
        (lambda: SharpnessMonitor(params="[unclosed"), "not a valid regular expression"),
        (lambda: RepresentationMonitor(forward_fn=1), "forward_fn must be callable"),
        (lambda: RepresentationMonitor(select="x"), "select must be callable"),
        (lambda: RepresentationMonitor(fit_range=(True, 5)), "fit_range must be"),
        (lambda: SpectralEarlyStopping(None), "monitor must be a metric name"),
        (lambda: SpectralEarlyStopping(3), "monitor must be a metric name"),
        (
            lambda: SpectralEarlyStopping("m", rule="above", threshold="abc"),
            "threshold must be a finite number",
        ),
        (
            lambda: SpectralEarlyStopping("m", rule="above", threshold=math.nan),
            "threshold must be a finite number",
        ),
        (
            lambda: SpectralEarlyStopping("m", rule="collapse", fraction="0.5"),
            "fraction must be a number",
        ),
        (lambda: SpectralEarlyStopping("m", min_delta=math.nan), "min_delta must be"),
        (lambda: SpectralEarlyStopping.sharpness(margin=-0.1), "margin must be"),
        (lambda: SharpnessMonitor(probe_data=[]), "probe_data"),
        (
            lambda: SharpnessMonitor(
                probe_data=torch.utils.data.TensorDataset(torch.randn(4, 5), torch.randn(4, 1))
            ),
            r"probe_data: data is a dataset \(TensorDataset\) of samples, not batches: pass "
            r"torch.utils.data.DataLoader\(dataset",
        ),
    ],
)
def test_cases_the_audit_found(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


class LazyRegressor(L.LightningModule):
    """``nn.LazyLinear`` layers: parameters without a shape until the first forward."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.LazyLinear(6), torch.nn.Tanh())
        self.head = torch.nn.LazyLinear(1)

    def forward(self, x):
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("monitor", "settings"),
    [
        ("SharpnessMonitor", {}),
        ("HessianSpectrumMonitor", {"k": 2, "density": False}),
        ("RepresentationMonitor", {"layers": ["encoder"], "num_samples": 8}),
        ("WeightSpectrumMonitor", {}),
        ("BatchSharpnessMonitor", {}),
    ],
)
def test_lazy_parameters_are_refused_at_setup_and_measured_once_initialised(monitor, settings):
    def make():
        return getattr(spectral_callbacks, monitor)(every_n_steps=1, **settings)

    x, y = regression_data(n=8, d=4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = L.Trainer(max_steps=1, callbacks=[make()], **trainer_kwargs())
    with pytest.raises(ValueError, match=r"encoder\.0\.weight, .* not initialised yet"):
        trainer.fit(LazyRegressor(), loader)
    model = LazyRegressor()
    model(x)  # the forward that gives the lazy layers their shapes
    measured = make()
    trainer = L.Trainer(max_steps=1, callbacks=[measured], **trainer_kwargs())
    trainer.fit(model, loader)
    assert measured.history and measured.history[0][0] == 0


def test_an_optimizer_without_the_measured_parameters_is_an_error():
    class Frozen(TanhRegressor):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net[0].parameters(), lr=0.1)

    x, y = regression_data(n=16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    monitor = SharpnessMonitor(every_n_steps=1, params="^net\\.4\\.")
    trainer = L.Trainer(max_steps=1, callbacks=[monitor], **trainer_kwargs())
    with pytest.raises(ValueError, match=r"holds none of the measured parameters"):
        trainer.fit(Frozen(), loader)


def test_two_optimizers_each_step_their_own_parameters_in_eos_ratio():
    class TwoOptimizers(TanhRegressor):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            first, second = self.optimizers()
            loss = F.mse_loss(self(batch[0]), batch[1])
            first.zero_grad()
            second.zero_grad()
            self.manual_backward(loss)
            first.step()
            second.step()

        def configure_optimizers(self):
            return (
                torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                torch.optim.SGD(self.net[2:].parameters(), lr=0.4),
            )

    x, y = regression_data(n=16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    loss = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    monitor = SharpnessMonitor(every_n_steps=1, loss_fn=loss, tol=1e-8)
    model = TwoOptimizers()
    trainer = L.Trainer(max_steps=1, callbacks=[monitor], **trainer_kwargs())
    trainer.fit(model, loader)
    # D = lr / 2 per entry, by the optimizer that holds it: λ_max(D^½ H D^½).
    first = sum(p.numel() for p in model.net[0].parameters())
    scale = torch.full((sum(p.numel() for p in model.parameters()),), 0.4 / 2)
    scale[:first] = 0.1 / 2
    expected = hessian_eigenvalues(model, loss, (x, y), k=1, tol=1e-10, preconditioner=scale)
    assert monitor.last_metrics["spectral/hessian/eos_ratio"] == pytest.approx(
        float(expected.eigenvalues[0]), rel=1e-6
    )


@pytest.mark.parametrize("differs_in", ["threshold", "weight_decay"])
def test_parameter_groups_that_differ_leave_shared_values_nan_without_a_nan_warning(differs_in):
    """Parameter groups with momentum on one part only (threshold 2 against 2 + 2β) have no
    shared threshold; weight decay on the weights only has no single λ_max limit. The ratio
    is still λ_max(D̃^½ (H + W) D̃^½), against a dense float64 Hessian."""
    lr, beta, decay = 0.1, 0.5, 0.3

    class Grouped(TanhRegressor):
        def configure_optimizers(self):
            first, rest = list(self.net[0].parameters()), list(self.net[2:].parameters())
            if differs_in == "threshold":
                groups = [{"params": first}, {"params": rest, "momentum": beta}]
            else:
                weights = [p for p in first + rest if p.ndim == 2]
                biases = [p for p in first + rest if p.ndim == 1]
                groups = [{"params": weights, "weight_decay": decay}, {"params": biases}]
            return torch.optim.SGD(groups, lr=lr)

    x, y = regression_data(n=16, d=4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    loss = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    model = Grouped(d=4, width=6)
    monitor = SharpnessMonitor(every_n_steps=1, tol=1e-8)
    trainer = L.Trainer(max_steps=1, callbacks=[monitor], **trainer_kwargs())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader)
    # NaN by definition warns nothing; tol is below float32's rounding, and both solves say
    # so naming the flag they set.
    ours = [str(w.message) for w in caught if "SharpnessMonitor" in str(w.message)]
    assert {message.split(" ")[1] for message in ours} == {"lambda_max", "eos_ratio"}
    assert all("cannot reach tol=1e-08" in m and "lambda_max_converged < 1" in m for m in ours)

    exact = copy.deepcopy(model).double()
    hessian = dense_hessian_func(exact, loss, [(x.double(), y.double())])
    first = {id(p) for p in exact.net[0].parameters()}

    def per_entry(value_of) -> torch.Tensor:
        return torch.cat(
            [torch.full((p.numel(),), value_of(p), dtype=torch.float64) for p in exact.parameters()]
        )

    momentum_on = lambda p: differs_in == "threshold" and id(p) not in first  # noqa: E731
    scale = per_entry(lambda p: lr / (2 + 2 * beta if momentum_on(p) else 2))
    shift = per_entry(lambda p: decay if differs_in == "weight_decay" and p.ndim == 2 else 0.0)
    root = scale.sqrt()
    ratio = torch.linalg.eigvalsh(root[:, None] * (hessian + torch.diag(shift)) * root)[-1]
    values = monitor.last_metrics
    assert values["spectral/hessian/eos_ratio"] == pytest.approx(float(ratio), rel=1e-5)
    assert math.isnan(values["spectral/hessian/stability_limit"])
    if differs_in == "threshold":
        assert math.isnan(values["spectral/hessian/stability_threshold"])
        assert math.isnan(values["spectral/hessian/preconditioned_sharpness"])
    else:
        assert values["spectral/hessian/stability_threshold"] == 2.0
        assert values["spectral/hessian/preconditioned_sharpness"] == pytest.approx(
            2 * float(ratio), rel=1e-5
        )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"k": True}, "k must be an integer >= 1"),
        ({"k": 0}, "k must be an integer >= 1"),
        ({"which": "largest"}, "which must be one of"),
        ({"tol": "1e-3"}, "tol must be a number > 0 and <= 0.5"),
        ({"tol": math.nan}, "tol must be a number > 0 and <= 0.5"),
        ({"max_iter": 2.5}, "max_iter must be an integer"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"return_eigenvectors": "yes"}, "return_eigenvectors must be True or False"),
        ({"hvp": "fast"}, "hvp must be one of"),
        ({"reduction": "none"}, "reduction must be one of"),
        ({"params": 3}, "params must be None"),
        ({"batch_size_fn": 5}, "batch_size_fn must be callable"),
        ({"method": "power"}, "method must be one of"),
    ],
)
def test_the_functional_api_names_its_bad_arguments(arguments, message):
    x, y = regression_data(n=8)
    loss = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    with pytest.raises((ValueError, TypeError), match=message):
        hessian_eigenvalues(TanhRegressor(), loss, (x, y), **arguments)


def test_the_functional_trace_and_density_name_their_bad_arguments():

    x, y = regression_data(n=8)
    loss = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    with pytest.raises(TypeError, match="num_hvps must be an integer"):
        hessian_trace(TanhRegressor(), loss, (x, y), num_hvps=True)
    with pytest.raises(ValueError, match="method must be one of"):
        hessian_trace(TanhRegressor(), loss, (x, y), method="exact")
    top = hessian_eigenvalues(TanhRegressor(), loss, (x, y), k=2, return_eigenvectors=True)
    with pytest.raises(ValueError, match="method must be one of"):  # unused, still checked
        hessian_trace(TanhRegressor(), loss, (x, y), method="exact", deflate=top)
    with pytest.raises(TypeError, match=r"deflate must be None or the EigenResult.*got Tensor"):
        hessian_density(TanhRegressor(), loss, (x, y), deflate=top.eigenvectors)
    with pytest.raises(TypeError, match="steps must be an integer"):
        hessian_density(TanhRegressor(), loss, (x, y), steps=4.0)
    with pytest.raises(TypeError, match="reorthogonalize must be True or False"):
        hessian_density(TanhRegressor(), loss, (x, y), reorthogonalize="yes")
    with pytest.raises(ValueError, match="data holds no batch"):
        hessian_trace(TanhRegressor(), loss, [])


@pytest.mark.parametrize(
    "callback",
    [
        SharpnessMonitor,
        HessianSpectrumMonitor,
        RepresentationMonitor,
        WeightSpectrumMonitor,
        SpectralEarlyStopping,
    ],
)
def test_every_constructor_argument_is_documented(callback):
    """The callback pages render the class docstrings as the argument reference, so an
    argument missing from ``Args:`` is missing from the documentation."""
    import re

    doc = inspect.getdoc(callback)
    assert "\nArgs:\n" in doc
    args_section = doc.split("\nArgs:\n")[1].split("\n\n")[0]
    documented = set(re.findall(r"^ {4}\**(\w+)(?: \(.*?\))?:", args_section, re.M))
    parameters = list(inspect.signature(callback).parameters)
    assert [p for p in parameters if p not in documented] == []


def test_a_lightning_cli_config_with_a_parameter_list_round_trips(tmp_path):
    init_args = {"every_n_steps": 3, "params": ["net.0"], "reduction": "sum"}
    monitor = cli_round_trip(AnyBatchRegressor, SharpnessMonitor, init_args, tmp_path)
    assert monitor.operator_settings.params == ["net.0"]
    assert monitor.operator_settings.reduction == "sum"


def _fit(callbacks, steps=2, model=None, loader=None):
    x, y = regression_data(n=32)
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, **trainer_kwargs())
    loader = loader or torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=16
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model or TanhRegressor(lr=0.05), loader)
    return trainer


def test_numpy_integers_are_integers():
    import numpy as np

    numpy_seeded = SharpnessMonitor(every_n_steps=1, seed=np.int64(3), tol=1e-6)
    plain = SharpnessMonitor(every_n_steps=1, seed=3, tol=1e-6, name="plain")
    _fit([numpy_seeded, plain])
    assert numpy_seeded.solver.seed == 3 and type(numpy_seeded.solver.seed) is int
    assert numpy_seeded.history[-1][1]["spectral/hessian/lambda_max"] == pytest.approx(
        plain.history[-1][1]["spectral/hessian/plain/lambda_max"], rel=1e-9
    )
    monitor = RepresentationMonitor(layers=["net.1"], fit_range=(np.int64(2), np.int64(10)))
    assert monitor.fit_range == (2, 10)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: SharpnessMonitor(seed=2**70), ValueError, "seed must be an integer >= 0 and <="),
        (lambda: SharpnessMonitor(tol=5.0), ValueError, "tol must be a number > 0 and <= 0.5"),
        (lambda: SharpnessMonitor(loss_fn=lambda m: 0.0), TypeError, "loss_fn must be callable"),
        (
            lambda: RepresentationMonitor(layers=["net"], forward_fn=lambda model: model),
            TypeError,
            "forward_fn must be callable as forward_fn",
        ),
        (lambda: RepresentationMonitor(layers=["net"], num_samples=1), ValueError, ">= 2"),
    ],
)
def test_arguments_the_fuzz_found_are_refused_at_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_two_identical_monitors_are_told_to_take_names_when_the_trainer_is_built():
    with pytest.raises(ValueError, match=r"give each a different name=\.\.\."):
        L.Trainer(
            callbacks=[SharpnessMonitor(every_n_steps=2), SharpnessMonitor(every_n_steps=2)],
            **trainer_kwargs(),
        )


def test_probe_data_the_model_cannot_take_is_refused_before_the_first_step():
    monitor = SharpnessMonitor(every_n_steps=1, probe_data=(torch.randn(4, 5), torch.randn(4, 1)))
    with pytest.raises(ValueError, match=r"probe_data does not fit the model.*mat1 and mat2"):
        _fit([monitor])
    assert monitor.num_measurements == 0


class DictBatchRegressor(TanhRegressor):
    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch["x"]), batch["y"])


def test_dict_batches_under_the_default_forward_point_to_forward_fn():
    x, y = regression_data(n=32)
    batches = [{"x": x[i : i + 16], "y": y[i : i + 16]} for i in (0, 16)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    monitor = RepresentationMonitor(layers=["net.1"], every_n_steps=1, num_samples=16)
    with pytest.raises(TypeError, match="forward_fn=lambda model, batch"):
        _fit([monitor], model=DictBatchRegressor(), loader=loader)


class KeywordRegressor(DictBatchRegressor):
    """Takes a dict batch's keys as keywords, and returns a pair from ``net.1``."""

    def __init__(self):
        super().__init__()
        self.net[1] = PairTanh()

    def forward(self, x, y=None):
        hidden, _ = self.net[1](self.net[0](x))
        return self.net[2:](hidden)

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(**batch), batch["y"])


class PairTanh(torch.nn.Tanh):
    def forward(self, x):
        return super().forward(x), x


def test_an_error_inside_the_forward_of_a_dict_batch_is_not_blamed_on_forward():
    x, y = regression_data(n=32)
    batches = [{"x": x[i : i + 16], "y": y[i : i + 16]} for i in (0, 16)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    monitor = RepresentationMonitor(layers=["net.1"], every_n_steps=1, num_samples=16)
    with pytest.raises(TypeError, match=r"layer 'net.1' returned tuple") as caught:
        _fit([monitor], model=KeywordRegressor(), loader=loader)
    assert "forward_fn" not in str(caught.value)


def test_the_representation_probe_holds_exactly_num_samples():
    monitor = RepresentationMonitor(layers=["net.1"], every_n_steps=1, num_samples=5)
    _fit([monitor])
    assert [batch[0].shape[0] for batch in monitor._probe] == [5]


def test_a_probe_cut_short_by_the_epoch_is_said_once():
    monitor = SharpnessMonitor(every_n_steps=1, probe_batches=10**6)
    with pytest.warns(RuntimeWarning, match=r"probe_batches=1000000, but the epoch ended after 2"):
        trainer = L.Trainer(max_epochs=1, callbacks=[monitor], **trainer_kwargs())
        x, y = regression_data(n=32)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
        trainer.fit(TanhRegressor(lr=0.05), loader)
    assert monitor.num_measurements == 1 and len(monitor._probe) == 2

"""Two CPU processes over gloo (Lightning's ddp strategy) against one process on the union."""

from __future__ import annotations

import copy
import json
import math
import pathlib

import pytest
import torch

from spectral_callbacks.callbacks.schedule import BudgetSchedule
from spectral_callbacks.curvature import curvature_operator
from spectral_callbacks.functional import batch_sharpness, hessian_eigenvalues, rankme
from spectral_callbacks.linalg import deflated_hutchinson
from spectral_callbacks.representation import effective_rank, participation_ratio
from spectral_callbacks.settings import OperatorSettings
from spectral_callbacks.weights import singular_subspace_drift, weight_spectra

from ..models import TanhRegressor, mse
from ..runs import run_worker

WORKER = pathlib.Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_worker(WORKER, str(out), timeout=600, cwd=out)
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    tensors = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    unequal = [json.loads((out / f"unequal{r}.json").read_text()) for r in (0, 1)]
    unequal_tensors = [torch.load(out / f"unequal{r}.pt", weights_only=False) for r in (0, 1)]
    return records, tensors, (unequal, unequal_tensors)


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_every_process_holds_the_same_numbers(ranks):
    (first, second), _, _ = ranks
    keys = ("sharpness", "spectrum", "representation", "poisoned", "weights", "ggn", "budget")
    for key in (*keys, "batch_sharpness"):
        assert first[key], key
        assert same(first[key], second[key]), key


def model_at(snapshot):
    model = TanhRegressor(lr=0.05).double()
    model.load_state_dict(snapshot)
    return model


def test_hessian_values_equal_one_process_on_the_union_of_shards(ranks):
    (record, _), (zero, one), _ = ranks
    # The shards differ (DistributedSampler), and together they are the probe.
    assert not torch.equal(zero["hessian_probe"][0][0], one["hessian_probe"][0][0])
    union = [zero["hessian_probe"][0], one["hessian_probe"][0]]
    for step, values in record["sharpness"]:
        reference = hessian_eigenvalues(
            model_at(zero["snapshots"][step]), mse, union, k=1, tol=1e-11
        )
        assert values["spectral/hessian/lambda_max"] == pytest.approx(
            float(reference.eigenvalues[0]), rel=1e-6
        )
    # Products from gradient differences all-reduce like exact ones (float64: error ~1e-10).
    assert [step for step, _ in record["differences"]] == [0, 4]
    for step, values in record["differences"]:
        reference = hessian_eigenvalues(
            model_at(zero["snapshots"][step]), mse, union, k=1, tol=1e-11
        )
        assert values["spectral/hessian/differences/lambda_max"] == pytest.approx(
            float(reference.eigenvalues[0]), rel=1e-8
        )
    for step, values in record["spectrum"]:
        model = model_at(zero["snapshots"][step])
        reference = hessian_eigenvalues(model, mse, union, k=3, tol=1e-11, return_eigenvectors=True)
        logged = [values[f"spectral/hessian/eig_{i}"] for i in (1, 2, 3)]
        assert logged == pytest.approx(reference.eigenvalues.tolist(), rel=1e-6)
        # The trace: Hutchinson deflated by the top-3 Ritz pairs, as in one process.
        with curvature_operator(model, mse, union) as op:
            trace = deflated_hutchinson(
                op, reference.eigenvectors, reference.eigenvalues, num_hvps=30, seed=0
            )
        assert values["spectral/hessian/trace"] == pytest.approx(trace.estimate, rel=1e-6)


def test_batch_sharpness_is_that_of_the_global_batch(ranks):
    """q(B) of each measured step is that of the union of the processes' batches of the step
    (the all-reduced gradient and product), at the parameters before the step's update."""
    (record, _), (zero, one), _ = ranks
    assert [step for step, _ in record["batch_sharpness"]] == [0, 3]  # the stopper ends at 6
    samples = []
    for step, values in record["batch_sharpness"]:
        assert not torch.equal(zero["batches"][step][0], one["batches"][step][0])
        union = [zero["batches"][step], one["batches"][step]]
        reference = batch_sharpness(model_at(zero["snapshots"][step]), mse, union)
        samples.append(reference.value)
        key = "spectral/hessian/batch_sharpness"
        assert values[key + "_sample"] == pytest.approx(reference.value, rel=1e-10)
        window = samples[-2:]
        assert values[key] == pytest.approx(sum(window) / len(window), rel=1e-10)


def test_ggn_values_equal_one_process_on_the_union_of_shards(ranks):
    (record, _), (zero, _), _ = ranks
    union = [zero["hessian_probe"][0], ranks[1][1]["hessian_probe"][0]]
    assert [step for step, _ in record["ggn"]] == [0, 4]  # the scripted stopper ends at 7
    settings = OperatorSettings(curvature="ggn", ggn_loss="mse")
    for step, values in record["ggn"]:
        model = model_at(zero["snapshots"][step])
        reference = hessian_eigenvalues(
            model,
            None,
            union,
            k=2,
            tol=1e-11,
            curvature="ggn",
            ggn_loss="mse",
            return_eigenvectors=True,
        )
        logged = [values[f"spectral/ggn/eig_{i}"] for i in (1, 2)]
        assert logged == pytest.approx(reference.eigenvalues.tolist(), rel=1e-6)
        # The trace: Hutchinson deflated by the top-2 Ritz pairs, as in one process.
        with curvature_operator(model, None, union, settings) as op:
            trace = deflated_hutchinson(
                op, reference.eigenvectors, reference.eigenvalues, num_hvps=30, seed=0
            )
        assert values["spectral/ggn/trace"] == pytest.approx(trace.estimate, rel=1e-6)


def test_weight_spectra_are_those_of_the_weights_at_each_step(ranks):
    (record, _), (zero, _), _ = ranks
    # The scripted stopper ends the run early; every 4th step until then is measured.
    assert [step for step, _ in record["weights"]] == list(range(0, record["global_step"] + 1, 4))
    assert len(record["weights"]) >= 2
    reference = weight_spectra(model_at(zero["snapshots"][0]))
    for step, values in record["weights"]:
        spectra = weight_spectra(model_at(zero["snapshots"][step]))
        for layer, spectrum in spectra.items():
            for metric in ("alpha", "stable_rank", "log_norm", "mp_softrank"):
                assert values[f"spectral/weights/{layer}/{metric}"] == pytest.approx(
                    spectrum.metrics[metric], rel=1e-12, nan_ok=True
                ), (step, layer, metric)
            drift = singular_subspace_drift(
                model_at(zero["snapshots"][step]).get_submodule(layer).weight,
                model_at(zero["snapshots"][0]).get_submodule(layer).weight,
                rank=3,
            )
            logged = values[f"spectral/weights/{layer}/singular_value_change"]
            assert logged == pytest.approx(drift.singular_value_change, rel=1e-9, abs=1e-15)
    assert set(reference) == {"net.0", "net.2", "net.4"}


def test_representation_values_equal_one_process_on_the_union(ranks):
    (record, _), (zero, one), _ = ranks
    inputs = torch.cat(
        [b[0] for b in zero["representation_probe"]] + [b[0] for b in one["representation_probe"]]
    )
    for step, values in record["representation"]:
        model = copy.deepcopy(model_at(zero["snapshots"][step])).eval()
        with torch.no_grad():
            features = model.net[:2](inputs)
        assert values["spectral/repr/net.1/rankme"] == pytest.approx(rankme(features), rel=1e-6)
        assert values["spectral/repr/net.1/effective_rank"] == pytest.approx(
            effective_rank(features), rel=1e-6
        )
        pr = participation_ratio(features)
        assert values["spectral/repr/net.1/participation_ratio"] == pytest.approx(pr, rel=1e-6)


def test_a_stop_decided_on_one_process_stops_both_at_the_same_step(ranks):
    (first, second), _, _ = ranks
    assert first["global_step"] == second["global_step"] == 6
    assert first["stopped_step"] == second["stopped_step"] == 6
    assert "another process" in first["stopped_reason"]
    assert "above 0.5" in second["stopped_reason"]


def test_a_non_finite_loss_on_one_process_is_nan_everywhere_without_deadlock(ranks):
    (first, second), _, _ = ranks
    assert [step for step, _ in first["poisoned"]] == [0, 3, 6]
    for record in (first, second):
        assert all(
            math.isnan(v["spectral/hessian/poisoned/lambda_max"]) for _, v in record["poisoned"]
        )


def test_the_representation_probe_counts_the_samples_of_every_process(ranks):
    (record, _), (zero, one), _ = ranks
    # 8 samples per process and batch: the union holds 16 after the first batch and 32 after
    # the second, so 24 samples are complete at the second batch, as in one process that
    # trains on the union (batches of 16), and not at the third (24 per process).
    assert [len(zero["representation_probe"]), len(one["representation_probe"])] == [2, 2]
    assert record["representation"][0][0] == 1


def test_unequal_shards_decide_the_probe_together_and_match_one_process(ranks):
    _, _, ((zero, one), (zero_tensors, one_tensors)) = ranks
    # Batches of 4 and 12: 16 samples after one batch, 32 after two (>= 20) on both.
    assert same(zero, one) and [step for step, _ in zero] == [1, 2, 4]
    assert [len(zero_tensors["probe"]), len(one_tensors["probe"])] == [2, 2]
    inputs = torch.cat([b[0] for b in zero_tensors["probe"]] + [b[0] for b in one_tensors["probe"]])
    model = model_at(zero_tensors["state"]).eval()
    with torch.no_grad():
        features = model.net[:2](inputs)
    assert zero[-1][1]["spectral/repr/net.1/rankme"] == pytest.approx(rankme(features), rel=1e-6)


def test_a_budget_decides_alike_on_every_process_by_the_slowest_clock(ranks):
    """Process 1's clock runs 1.5 s per step and 1 s per measurement, process 0's 1 s and
    0.5 s: both follow the schedule of the slower, as one process with its clock would."""
    (record, _), _, _ = ranks
    steps = [step for step, _ in record["budget"]]
    schedule, expected, last = BudgetSchedule(max_overhead=0.5), [], None
    for step in range(record["global_step"] + 1):
        if schedule.due(step, last, lambda step=step: 1.5 * step):
            schedule.record(step, 1.0, 1.5 * step)
            expected.append(step)
            last = step
    assert len(steps) >= 3 and steps == expected[: len(steps)]
    shares = [values["spectral/weights/budget/overhead"] for _, values in record["budget"]]
    assert shares[1:] == pytest.approx([1.0 * k / (1.5 * s) for k, s in enumerate(steps[1:], 2)])

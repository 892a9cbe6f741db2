"""The benchmark harness's smallest workload runs and reports all six figures (CPU, seconds)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from bench import (
    batch_sharpness,
    density_accuracy,
    gradient_difference,
    half_precision,
    monitor_cost,
    outliers,
    probe_size,
    report,
    spectrum_parts,
    train_mode_products,
    warm_mixing,
    weightwatcher_crosscheck,
)
from bench import run as bench_run
from spectral_callbacks import workloads


def test_smoke_run_reports_every_figure(tmp_path):
    bench = bench_run
    results = bench.main(["--device", "cpu", "--smoke", "--repeats", "1", "--out", str(tmp_path)])
    stored = json.loads(next(tmp_path.glob("*-smoke.json")).read_text())
    assert stored["workloads"].keys() == {"tiny"}
    assert next(tmp_path.glob("*-smoke.md")).read_text().count("**") >= 12  # six figure titles
    tiny = results["workloads"]["tiny"]
    paths = tiny["hvp_paths"]
    assert all(
        paths[k] > 0 for k in ("grad_ms", "reuse_graph_ms", "forward_over_reverse_8_ms_per_vector")
    )
    ours = {row["tool"]: row for row in tiny["top1"] if row["tool"].startswith("ours")}
    assert ours["ours (Lanczos, tol=0.001)"]["max_rel_error"] <= 1e-3
    best_top10 = min(
        row["max_rel_error"] for row in tiny["top10"] if row["tool"].startswith("ours")
    )
    assert best_top10 <= 1e-2
    for row in tiny["top1"] + tiny["top10"]:  # a peer is timed, failing, or not installed
        assert "seconds" in row or "status" in row
    assert [w["hvp"] for w in tiny["warm_tracking"]] == ["auto"]  # compiled only with --compiled
    assert tiny["warm_tracking"][0]["measurements"] == 4
    assert math.isfinite(results["training_overhead"]["overhead"])
    representation = results["representation"]
    assert representation["relative_difference"] < 1e-9


def test_runs_of_some_figures_add_to_the_days_file(tmp_path):
    bench = bench_run
    common = ["--device", "cpu", "--smoke", "--repeats", "1", "--out", str(tmp_path)]
    bench.main([*common, "--figures", "hvp", "memory"])
    path = next(tmp_path.glob("*-smoke.json"))
    first = json.loads(path.read_text())["workloads"]["tiny"]
    assert {"hvp_paths", "peak_extra_memory_mib"} <= first.keys() and "top1" not in first
    bench.main([*common, "--figures", "top1", "--no-shared-figures"])
    stored = json.loads(path.read_text())
    tiny = stored["workloads"]["tiny"]
    assert tiny["hvp_paths"] == first["hvp_paths"]  # kept from the first run
    assert any(row["tool"] == "ours (Lanczos, tol=0.001)" for row in tiny["top1"])
    assert "top10" not in tiny and "training_overhead" not in stored
    table = next(tmp_path.glob("*-smoke.md")).read_text()
    assert "**2a." in table and "ours (Lanczos, tol=0.001)" in table


def test_runs_of_some_tools_replace_only_their_rows(tmp_path):
    bench = bench_run
    common = ["--device", "cpu", "--smoke", "--repeats", "1", "--out", str(tmp_path)]
    common += ["--figures", "top1", "--no-shared-figures"]
    bench.main([*common, "--tools", r"tol=0\.001\)"])
    path = next(tmp_path.glob("*-smoke.json"))
    first = json.loads(path.read_text())["workloads"]["tiny"]["top1"]
    assert [row["tool"] for row in first] == ["ours (Lanczos, tol=0.001)"]
    bench.main([*common, "--tools", r"tol=0\.01\)", r"tol=0\.001\)"])
    rows = json.loads(path.read_text())["workloads"]["tiny"]["top1"]
    assert [row["tool"] for row in rows] == [
        "ours (Lanczos, tol=0.001)",
        "ours (Lanczos, tol=0.01)",
    ]
    assert rows[0]["seconds"] != first[0]["seconds"]  # replaced by the second run's timing


def test_a_slow_tool_is_timed_by_its_warm_up_alone():
    bench = bench_run
    model, batch, loss_fn = bench.make_workload("tiny", torch.device("cpu"))
    reference = bench.reference_eigenvalues(model, batch, loss_fn, k=1)
    rows = bench.time_to_accuracy(
        model,
        batch,
        loss_fn,
        torch.device("cpu"),
        repeats=3,
        reference=reference,
        k=1,
        tol=1e-3,
        compiled=False,
        slow_seconds=0.0,
        tools=("ours",),
    )
    assert rows and all(row["repeats"] == 1 for row in rows)
    assert all(row["max_rel_error"] <= 1e-2 for row in rows)


def test_the_gradient_difference_study_runs_on_tiny_workloads(tmp_path, capsys):
    study = gradient_difference
    rows = study.main(["--smoke", "--out", str(tmp_path)])
    costs = [row for row in rows if row["part"] == "costs"]
    assert [row["workload"] for row in costs] == list(study.COST_WORKLOADS[True])
    assert costs[0]["relative_error"]["gradient_difference"] < 1e-3  # tanh MLP: smooth
    convergence = [row for row in rows if row["part"] == "convergence"]
    assert convergence and all(row["paths"]["reuse_graph"]["all_converged"] for row in convergence)
    (memory,) = [row["paths"] for row in rows if row["part"] == "memory"]
    assert memory["gradient_difference"]["lambda_max"] == pytest.approx(
        memory["reuse_graph"]["lambda_max"], rel=1e-2
    )
    assert capsys.readouterr().out.count("**") == 6  # the three parts' titles
    assert not list(tmp_path.iterdir())  # a smoke run records nothing


def test_the_batch_sharpness_study_measures_both_curves(tmp_path):
    (row,) = batch_sharpness.main(["--smoke", "--out", str(tmp_path)])
    assert row["batch_size"] == 8 and [s for s, _ in row["batch_history"]] == [0, 10, 20, 30]
    assert [s for s, _ in row["lambda_max_history"]] == [0, 10, 20, 30, 40]
    assert all(v > 0 for _, v in row["batch_history"] + row["lambda_max_history"])
    assert 0 < row["batch_monitor_overhead"] < 1
    assert not list(tmp_path.iterdir())  # a smoke run records nothing


def test_the_half_precision_study_solves_under_both_rules(tmp_path):
    (row,) = half_precision.main(["--smoke", "--out", str(tmp_path)])
    solves = {(s["path"], s["rule"]): s for s in row["solves"]}
    assert set(solves) == set(itertools.product(half_precision.PATHS, half_precision.RULES))
    for path in half_precision.PATHS:
        stopped, budget = solves[path, "stop at floor"], solves[path, "budget"]
        assert stopped["products"] < budget["products"]  # the rule is what differs
        assert not stopped["converged"] and stopped["relative_bound"] >= 0.039
    assert not list(tmp_path.iterdir())  # a smoke run records nothing


def test_the_outlier_study_runs_on_a_tiny_mlp():
    study = outliers
    (row,) = study.main(["--smoke"])
    assert row["parameters"] == 714 and 0 <= row["slq_count"] <= 20
    assert row["dense_count"] >= 0 and row["top"] == sorted(row["top"], reverse=True)


def test_the_monitor_cost_study_runs_a_few_steps():
    study = monitor_cost
    rows = study.main(["--smoke"])
    assert {row["model"] for row in rows} == {"A", "B"}
    sharp = next(r for r in rows if r["model"] == "A" and "Sharpness" in r["monitor"])
    assert sharp["measurements"] == 11 and sharp["median_products"] > 0
    tiny = study.main(["--smoke", "--workloads", "tiny"])
    assert [r["monitor"] for r in tiny] == [
        "SharpnessMonitor(every_n_steps=100)",
        "SharpnessMonitor(every_n_steps=100, tol=0.01)",
        "HessianSpectrumMonitor(every_n_steps=500)",
    ]
    assert all(r["measurements"] == 1 and r["first_products"] > 0 for r in tiny)  # step 0
    assert all(0 < r["measurement_share"] < math.inf for r in tiny)


def test_the_spectrum_parts_study_runs_on_the_tiny_workload():
    (row,) = spectrum_parts.main(["--smoke"])
    assert row["top_k_cold"]["products"] >= 10 and row["top_k_warm"]["all_converged"]
    assert set(row["trace"]) == {"Hutch++ 99", "Hutch++ 33", "deflated Hutchinson 33"}
    assert row["density"]["products"] == 8 * 64
    assert 0 <= row["density"]["all_probes"]["negative_mass"] <= 1
    spreads = row["density"]["spread_by_probes"]
    assert set(spreads) == {1, 2, 4}
    assert all(value >= 0 for spread in spreads.values() for value in spread.values())
    assert 0 <= row["density"]["all_probes"]["near_zero_mass"] <= 1


def test_the_density_steps_part_runs_the_same_probes_at_each_length():
    (row,) = spectrum_parts.main(["--smoke", "--parts", "density_steps"])
    assert "density" not in row and "trace" not in row
    entries = row["density_steps"]
    assert [e["steps"] for e in entries] == list(spectrum_parts.DENSITY_STEPS)
    assert all(e["products"] == 4 * e["steps"] for e in entries)
    # λ_min only falls as the Krylov space grows (the smallest Ritz value of nested spaces).
    minima = [e["scalars"]["lambda_min"] for e in entries]
    pairs = itertools.pairwise(minima)
    assert all(later <= earlier + 1e-6 * abs(earlier) for earlier, later in pairs)


def test_the_shared_probes_part_saves_the_density_probes_of_the_trace():
    (row,) = spectrum_parts.main(["--smoke", "--parts", "shared_probes"])
    shared, separate = row["shared_probes"]["shared"], row["shared_probes"]["separate"]
    assert separate["products"] == 33 + 4 * 64
    assert shared["products"] == separate["products"] - 4
    # The same deflated Hutchinson estimator on different probes: within four errors.
    difference = abs(shared["trace"] - separate["trace"])
    assert difference <= 4 * math.hypot(shared["trace_stderr"], separate["trace_stderr"])
    # λ_min is a Ritz value of each: never below the solved one (up to its tolerance).
    lowest = row["shared_probes"]["lambda_min"]
    for entry in (shared, separate):
        assert entry["scalars"]["lambda_min"] >= lowest - 1e-3 * abs(lowest)


def test_the_density_accuracy_study_measures_every_setting_against_the_dense_spectrum():
    (row,) = density_accuracy.main(["--smoke"])
    assert set(row["errors"]) == {name for name, *_ in density_accuracy.SETTINGS}
    assert 0 <= row["truth"]["negative_mass"] <= 1 and row["truth"]["lambda_min"] < 0
    for name, _, probes, steps in density_accuracy.SETTINGS:
        entry = row["errors"][name]
        assert entry["products"] == probes * min(steps, row["parameters"])
        assert all(entry[key] >= 0 for key in density_accuracy.SCALARS)
    # Run to near the dimension, the quadrature resolves λ_min to its tolerance.
    assert row["errors"]["slq 4×64"]["lambda_min"] <= 1e-3


def test_the_probe_size_study_splits_the_batch_and_measures_each_part():
    (row,) = probe_size.main(["--smoke"])
    assert [split["parts"] for split in row["splits"]] == [1, 2, 4]
    whole, half, quarter = row["splits"]
    assert whole["max_abs_error"] == 0 and whole["values"] == [row["reference"]]
    assert len(half["values"]) == 2 and len(quarter["values"]) == 4
    assert quarter["samples"] * 4 == half["samples"] * 2 == row["batch"]
    assert all(split["products"] >= 1 for split in row["splits"])


def test_probe_size_parts_are_disjoint_and_cover_the_batch():
    batch = (torch.arange(12.0).reshape(12, 1), torch.arange(12))
    parts = probe_size.split_batch(batch, 4)
    assert torch.equal(torch.cat([part[0] for part in parts]), batch[0])
    assert torch.equal(torch.cat([part[1] for part in parts]), batch[1])


def test_the_warm_mixing_study_tracks_every_strategy_against_a_reference():
    (row,) = warm_mixing.main(["--smoke"])
    strategies = {s["strategy"]: s for s in row["strategies"]}
    assert len(strategies) == len(warm_mixing.STRATEGIES)
    assert len(row["references"]) == row["steps"] // row["every"] + 1
    for label, _, rule, _ in warm_mixing.STRATEGIES:
        measured = strategies[label]
        assert measured["measurements"] == len(row["references"]) - 1
        assert measured["median_products"] >= 1 and measured["max_error"] < 1e-2
        weights = measured["mixing"]
        expected = {"one": [1.0] * len(weights), "pure": [0.0] * len(weights)}.get(rule)
        if expected is not None:
            assert weights == expected
        else:
            assert weights[0] == 1.0 and all(0.05 <= w <= 1.0 for w in weights)


def test_the_warm_mixing_study_runs_some_strategies_in_train_mode():
    (row,) = warm_mixing.main(["--smoke", "--train-mode", "--strategies", "≤ 1e-2"])
    assert row["mode"] == "train"
    assert [s["strategy"] for s in row["strategies"]] == [
        label for label, tol, *_ in warm_mixing.STRATEGIES if tol == 1e-2
    ]
    with pytest.raises(SystemExit):
        warm_mixing.main(["--smoke", "--strategies", "no such strategy"])


def test_the_train_mode_products_study_times_every_path_in_both_modes():
    (row,) = train_mode_products.main(["--smoke"])
    assert set(row["modes"]) == {"eval", "train"}
    for entry in row["modes"].values():
        assert entry["gradient_ms"] > 0
        assert entry["reuse_graph"]["relative_error"] == 0  # the reference itself
        assert entry["forward_over_reverse"]["relative_error"] < 1e-5
        assert all(entry[path]["ms"] > 0 for path in train_mode_products.PATHS)


def test_the_adaptive_mixing_weight_is_the_sine_of_the_observed_turn():
    e1, e2 = torch.eye(2, dtype=torch.float64)
    turned = torch.tensor([3**0.5 / 2, 0.5], dtype=torch.float64)  # 30 degrees from e1
    weight = warm_mixing.mixing_weight
    assert weight("adaptive", [e1]) == 1.0  # one vector: nothing observed yet
    assert weight("adaptive", [e1, turned]) == pytest.approx(0.5)
    assert weight("adaptive", [e1, -e1]) == warm_mixing.ADAPTIVE_FLOOR  # a sign is no turn
    assert weight("adaptive", [e1, e2]) == 1.0
    assert weight("one", [e1, e1]) == 1.0 and weight("pure", []) == 0.0


def test_recorded_tables_are_rendered_from_the_recorded_json():
    """Every ``bench/run.py`` table in ``bench/results/`` (and on the benchmarks page, which
    renders the same files) is what ``bench/report.py`` makes of the JSON beside it."""
    runs = report.peer_comparisons()
    assert runs, "no bench/run.py results are recorded"
    assert runs[0][1]["device"].startswith("cpu")
    for path, results in runs:
        assert path.with_suffix(".md").read_text() == report.markdown(results), path.name


def test_the_recorded_weightwatcher_crosscheck_renders_from_its_json():
    """The cross-check runs in a venv of its own (weightwatcher, timm, transformers); its
    recorded table is what its ``markdown`` makes of the JSON beside it."""
    (path,) = report.RESULTS.glob("weightwatcher-crosscheck-*.json")
    results = json.loads(path.read_text())
    assert path.with_suffix(".md").read_text() == weightwatcher_crosscheck.markdown(results)


def test_a_crosscheck_of_one_model_keeps_the_days_rows_of_the_other(tmp_path):
    def results(models, seconds):
        return {
            "date": "2026-12-06",
            "device": "cpu-test",
            "runs": [{"model": m, "state": "initialised", "layers": []} for m in models],
            "cost": [{"model": m, "weightwatcher_s": seconds} for m in models],
        }

    stem = tmp_path / "weightwatcher-crosscheck-day"
    merge = weightwatcher_crosscheck.merge_by_model
    report.write_day_file(stem, results(["resnet18", "gpt2"], 1.0), merge, json.dumps)
    written = report.write_day_file(stem, results(["gpt2"], 2.0), merge, json.dumps)
    assert json.loads(stem.with_suffix(".json").read_text()) == written
    seconds = {row["model"]: row["weightwatcher_s"] for row in written["cost"]}
    assert seconds == {"resnet18": 1.0, "gpt2": 2.0}
    assert sorted(row["model"] for row in written["runs"]) == ["gpt2", "resnet18"]


def test_cpu_workloads_have_the_advertised_sizes():
    """C1: a BatchNorm CNN of about 0.5 M parameters; G1: a 4-layer GPT, d = 256, 4 heads,
    context 128, vocabulary 2048, on default SDPA kernels (built here without training)."""
    cnn = workloads.small_cnn()
    assert 0.45e6 < sum(p.numel() for p in cnn.parameters()) < 0.6e6
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in cnn.modules()) == 5
    assert cnn(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    gpt, (tokens, _) = workloads.initial_workload("G1", torch.device("cpu"))
    assert len(gpt.blocks) == 4 and gpt.blocks[0].heads == 4
    assert tokens.shape == (8, 128) and gpt(tokens[:2]).shape == (2, 128, 2048)
    assert {"C1", "G1", "W1"} <= set(workloads.WORKLOADS)


def test_a_training_and_a_validation_set_of_the_mixture_share_its_means():
    train_x, train_y = workloads.gaussian_mixture(4000, seed=1)
    val_x, val_y = workloads.gaussian_mixture(4000, seed=3)
    assert not torch.equal(train_x[:10], val_x[:10])
    train_means = torch.stack([train_x[train_y == c].mean(0) for c in range(10)])
    val_means = torch.stack([val_x[val_y == c].mean(0) for c in range(10)])
    # About 400 unit-variance samples per class: the means agree to ~0.07 per coordinate,
    # while different classes' means are several units apart.
    assert (train_means - val_means).norm(dim=1).max() < 1.0
    assert torch.cdist(train_means, train_means).add(torch.eye(10) * 1e9).min() > 2.0
    other = workloads.gaussian_mixture(4000, seed=3, means_seed=5)[0]
    assert not torch.allclose(other.mean(0), val_x.mean(0), atol=0.3)


def test_the_speed_up_line_compares_tools_timed_in_one_command():
    rows = [
        # our row of the last command, on a slower machine phase
        {"tool": "ours (Lanczos, tol=0.01)", "seconds": 2.0, "max_rel_error": 1e-3},
        {
            "tool": "peer A",
            "seconds": 3.0,
            "max_rel_error": 1e-3,
            "ours_beside": {"tool": "ours (Lanczos, tol=0.01)", "seconds": 1.0},
        },
        {
            "tool": "peer B",
            "seconds": 4.0,
            "max_rel_error": 1e-3,
            "ours_beside": {"tool": "ours (Lanczos, tol=0.01)", "seconds": 2.0},
        },
        {"tool": "peer C", "seconds": 0.5, "max_rel_error": 0.5},  # misses the target
    ]
    line = report.speed_up(rows, 1e-2)
    assert line.startswith("2.0×") and "peer B" in line and "one command" in line
    assert report.speed_up(rows[:1], 1e-2) == "no peer setting reached it (ours 2.000 s)"
    assert report.speed_up(rows[1:], 1e-2) is None

"""The benchmark harness's smallest workload runs and reports all six figures (CPU, seconds)."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "run.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_run", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_smoke_run_reports_every_figure(tmp_path):
    bench = load_bench()
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
    bench = load_bench()
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


def test_the_gradient_difference_study_runs_on_tiny_workloads(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_gradient_difference", BENCH.with_name("gradient_difference.py")
    )
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    result = study.main(["--smoke", "--out", str(tmp_path)])
    assert {row["workload"] for row in result["costs"]} == {"mlp", "cnn", "gpt"}
    mlp = next(row for row in result["costs"] if row["workload"] == "mlp")
    assert mlp["relative_error"]["gradient_difference"] < 1e-3  # tanh: smooth
    assert all(row["paths"]["reuse_graph"]["all_converged"] for row in result["convergence"])
    memory = result["memory"][0]["paths"]
    assert memory["gradient_difference"]["lambda_max"] == pytest.approx(
        memory["reuse_graph"]["lambda_max"], rel=1e-2
    )
    assert next(tmp_path.glob("gradient-difference-*-smoke.md")).read_text().count("**") == 6


def test_the_outlier_study_runs_on_a_tiny_mlp():
    spec = importlib.util.spec_from_file_location("bench_outliers", BENCH.with_name("outliers.py"))
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    (row,) = study.main(["--smoke"])
    assert row["parameters"] == 714 and 0 <= row["slq_count"] <= 20
    assert row["dense_count"] >= 0 and row["top"] == sorted(row["top"], reverse=True)


def test_the_monitor_cost_study_runs_a_few_steps():
    spec = importlib.util.spec_from_file_location(
        "bench_monitor_cost", BENCH.with_name("monitor_cost.py")
    )
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    rows = study.main(["--smoke"])
    assert {row["model"] for row in rows} == {"A", "B"}
    sharp = next(r for r in rows if r["model"] == "A" and "Sharpness" in r["monitor"])
    assert sharp["measurements"] == 11 and sharp["median_products"] > 0


def test_recorded_tables_are_rendered_from_the_recorded_json():
    """Every ``bench/run.py`` table in ``bench/results/`` (and on the benchmarks page, which
    renders the same files) is what ``bench/report.py`` makes of the JSON beside it."""
    spec = importlib.util.spec_from_file_location("bench_report", BENCH.with_name("report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    runs = report.peer_comparisons()
    assert runs, "no bench/run.py results are recorded"
    assert runs[0][1]["device"].startswith("cpu")
    for path, results in runs:
        assert path.with_suffix(".md").read_text() == report.markdown(results), path.name


def test_cpu_workloads_have_the_advertised_sizes():
    """C1: a BatchNorm CNN of about 0.5 M parameters; G1: a 4-layer GPT, d = 256, 4 heads,
    context 128, vocabulary 2048, on default SDPA kernels (built here without training)."""
    bench = load_bench()
    cnn = bench.small_cnn()
    assert 0.45e6 < sum(p.numel() for p in cnn.parameters()) < 0.6e6
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in cnn.modules()) == 5
    assert cnn(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    gpt = bench.GPT(vocab=2048, dim=256, heads=4, layers=4, context=128)
    assert len(gpt.blocks) == 4 and gpt.blocks[0].heads == 4
    assert gpt(torch.randint(0, 2048, (2, 128))).shape == (2, 128, 2048)
    assert {"C1", "G1", "W1"} <= set(bench.WORKLOADS)

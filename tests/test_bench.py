"""The benchmark harness's smallest workload runs and reports all six figures (CPU, seconds)."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "run.py"


def test_smoke_run_reports_every_figure(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_run", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
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

"""The demo command and the example scripts, in their fast modes."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import re
import subprocess
import sys
import warnings

from spectral_callbacks.cli import main as cli_main

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def test_demo_writes_logs_figure_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_main(["demo", "--out", str(out), "--fast", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    # Lightning says nothing about the demo's own data (FullBatch is map-style).
    assert not [w for w in caught if "__len__" in str(w.message)]
    assert "1. Edge of stability" in printed and "2. Representations" in printed
    assert f"tensorboard --logdir {out}" in printed
    assert (out / "summary_version_0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "it/s]" not in printed  # no progress bar into a non-terminal output
    # A second run keeps the first one's figure and logs.
    assert cli_main(["demo", "--out", str(out), "--fast"]) == 0
    assert (out / "summary_version_0.png").exists() and (out / "summary_version_1.png").exists()
    assert "it/s]" not in capsys.readouterr().out
    for run in ("edge_of_stability", "representations"):
        assert list((out / run / "version_0").glob("events.out.tfevents.*")), run
    assert "version_0" in printed
    assert "gradient in the top-5 eigenspace: " in printed
    assert "outliers above the bulk (of the top 5): " in printed
    assert "weight spectra (steps 0 → " in printed
    assert re.search(r"encoder\.0 +\d+\.\d+ → +\d+\.\d+", printed)


def test_each_demo_run_logs_to_a_version_of_its_own(tmp_path):
    from spectral_callbacks.demo import next_version

    assert next_version(tmp_path) == 0
    (tmp_path / "representations" / "version_0").mkdir(parents=True)
    assert next_version(tmp_path) == 1
    (tmp_path / "edge_of_stability" / "version_1").mkdir(parents=True)
    assert next_version(tmp_path) == 2


def test_the_printed_tensorboard_command_runs_without_an_activated_environment(monkeypatch):
    from spectral_callbacks import demo

    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    command = demo.tensorboard_command()
    assert command.split()[0] != "tensorboard"
    result = subprocess.run(
        [*command.split(), "--version_tb"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_module_entry_point_shows_help():
    result = subprocess.run(
        [sys.executable, "-m", "spectral_callbacks", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--fast" in result.stdout


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_edge_of_stability_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    history = load_example("edge_of_stability").main(["--fast"])
    ratios = [values["spectral/hessian/eos_ratio"] for _, values in history]
    assert len(ratios) == 4 and ratios[0] < 0.8 and ratios[-1] > 0.95


def test_cnn_batchnorm_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    history = load_example("cnn_batchnorm").main(["--fast"])
    _, last = history[-1]
    assert all(math.isfinite(last[f"spectral/hessian/eig_{i}"]) for i in range(1, 6))


def test_small_gpt_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sharpness, representation = load_example("small_gpt").main(["--fast"])
    assert len(sharpness) >= 2 and all(
        math.isfinite(v["spectral/hessian/lambda_max"]) for _, v in sharpness
    )
    assert all(math.isfinite(v["spectral/repr/model.blocks.1/rankme"]) for _, v in representation)


def test_early_stopping_example():
    stopper = load_example("early_stopping").main(["--fast"])
    assert stopper.stopped_step is not None and "eos_ratio" in stopper.stopped_reason


def test_representations_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    history = load_example("representations").main(["--fast"])
    assert len(history) >= 2
    assert all(0 < v["spectral/repr/encoder/rankme"] <= 64 for _, v in history)


def test_help_and_version_answer_without_importing_torch():
    code = (
        "import sys\n"
        "from spectral_callbacks.cli import main\n"
        "for argv in (['--help'], ['--version'], ['demo', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 0, argv\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    from spectral_callbacks import __version__

    assert f"spectral-callbacks {__version__}" in result.stdout
    assert "torch imported: False" in result.stdout
    import spectral_callbacks

    assert spectral_callbacks.SharpnessMonitor.__name__ == "SharpnessMonitor"  # lazy import


def test_the_readme_quickstart_runs(tmp_path, monkeypatch):
    """The README's quickstart block, as written, trains and logs every monitor's metrics."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    metrics = namespace["trainer"].callback_metrics
    for key in (
        "spectral/hessian/lambda_max",
        "spectral/hessian/eig_1",
        "spectral/repr/encoder/rankme",
        "spectral/weights/all_layers/alpha",
    ):
        assert key in metrics, key
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))

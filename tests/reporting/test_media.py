"""Histograms and figures reach every logger through its own API: W&B (offline), MLflow (file
store), CSV (files under its log_dir); each read back from what the library wrote."""

from __future__ import annotations

import json
import math
import pathlib
import warnings

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger

from spectral_callbacks import HessianSpectrumMonitor, RepresentationMonitor, WeightSpectrumMonitor

from ..models import TanhRegressor, full_batch_loader, regression_data, trainer_kwargs

PNG = b"\x89PNG\r\n\x1a\n"


def _fit(logger, steps: int = 6):
    """Three monitors with figures (density, scree, weight ESDs) at steps 0 and 5."""
    x, y = regression_data(n=64)
    torch.manual_seed(0)
    figures = {"figure_every_n_steps": 5}
    monitors = [
        HessianSpectrumMonitor(every_n_steps=5, k=3, trace_hvps=6, density_steps=8, **figures),
        RepresentationMonitor(
            layers=["net.1"], every_n_steps=5, num_samples=64, fit_range=(2, 8), **figures
        ),
        WeightSpectrumMonitor(every_n_steps=5, **figures),
    ]
    trainer = L.Trainer(max_epochs=1, callbacks=monitors, **trainer_kwargs(logger=logger))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TanhRegressor(lr=0.05), full_batch_loader(x, y, steps))
    return monitors


def _top_k(spectrum_monitor, step: int) -> list[float]:
    values = dict(spectrum_monitor.history)[step]
    return [values[f"spectral/hessian/eig_{i}"] for i in (1, 2, 3)]


FIGURES = (
    "spectral/hessian/density",
    "spectral/repr/net.1/scree",
    "spectral/weights/alpha_by_layer",
)


def test_csv_logger_gets_png_files_and_the_histogram_values(tmp_path):
    logger = CSVLogger(str(tmp_path), name="run")
    spectrum, _, _ = _fit(logger)
    media = pathlib.Path(logger.log_dir) / "media"
    for tag in FIGURES:
        for step in (0, 5):
            path = media / tag / f"step_{step:07d}.png"
            assert path.read_bytes()[:8] == PNG, path
    for step in (0, 5):
        values = np.loadtxt(media / "spectral/hessian/top_k" / f"step_{step:07d}.txt")
        assert sorted(values.tolist(), reverse=True) == pytest.approx(_top_k(spectrum, step))
    # The scalars still go to the CSV file.
    assert "spectral/hessian/eig_1" in (pathlib.Path(logger.log_dir) / "metrics.csv").read_text()


def test_wandb_offline_run_holds_the_figures_and_histograms(tmp_path, monkeypatch):
    import wandb  # the test extra
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="spectral", save_dir=str(tmp_path), offline=True)
    spectrum, _, _ = _fit(logger)
    run_dir = pathlib.Path(logger.experiment.dir).parent
    wandb.finish()
    records = _wandb_history(run_dir)
    images = [
        (record["trainer/global_step"], key, entry["filenames"])
        for record in records
        for key, entry in record.items()
        if isinstance(entry, dict) and entry.get("_type") == "images/separated"
    ]
    for tag in FIGURES:
        logged = [(step, files) for step, key, files in images if key == tag]
        assert [step for step, _ in logged] == [0, 5], (tag, images)
        for _, (file,) in logged:
            assert (run_dir / "files" / file).read_bytes()[:8] == PNG
    histograms = [r for r in records if "spectral/hessian/top_k" in r]
    assert [r["trainer/global_step"] for r in histograms] == [0, 5]
    for record in histograms:
        entry = record["spectral/hessian/top_k"]
        assert entry["_type"] == "histogram"
        step = record["trainer/global_step"]
        low, high = entry["bins"][0], entry["bins"][-1]
        top = _top_k(spectrum, step)
        assert math.isclose(low, min(top), rel_tol=1e-6) and math.isclose(
            high, max(top), rel_tol=1e-6
        )
        assert sum(entry["values"]) == 3


def _wandb_history(run_dir: pathlib.Path, timeout: float = 60.0) -> list[dict]:
    """The history rows of an offline W&B run, read from its ``.wandb`` transaction log: a
    LevelDB-style log (a 7-byte header ``:W&B``, then 32 KiB blocks of records, each with a
    7-byte header: CRC, length, type full/first/middle/last) of protobuf ``Record``s.

    W&B's writer can still be appending after ``wandb.finish()`` returns (a read then found
    14 of 22 history rows, about one run in 25), so the log is read until it holds the run's
    ``exit`` record, which follows every history row."""
    import time

    (path,) = run_dir.glob("*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(path.read_bytes())
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            break
        assert time.monotonic() < deadline, f"no exit record in {path} after {timeout} s"
        time.sleep(0.1)
    rows = []
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:  # a nested key: (tag, field), e.g. ("…/top_k", "bins")
            *parents, leaf = list(item.nested_key) or [item.key]
            node = row
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = json.loads(item.value_json)
        rows.append(row)
    return rows


def _wandb_records(data: bytes) -> list:
    """The protobuf ``Record``s of a ``.wandb`` log's bytes (:func:`_wandb_history`)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    assert data[:4] == b":W&B"
    block, header = 32768, 7
    position, pending, payloads = header, b"", []
    while position + header <= len(data):
        if block - position % block < header:  # the rest of a block is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + header])
        if position + header + length > len(data):  # a record still being written
            break
        chunk = data[position + header : position + header + length]
        position += header + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, last
            payloads.append(pending)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def test_mlflow_file_store_holds_the_figures_and_histograms(tmp_path, monkeypatch):
    # MLflow 3 keeps the file store behind this switch (its default backend is a database).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from lightning.pytorch.loggers import MLFlowLogger  # mlflow-skinny: the test extra
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    logger = MLFlowLogger(experiment_name="spectral", tracking_uri=uri)
    spectrum, _, _ = _fit(logger)
    client = MlflowClient(tracking_uri=uri)
    run_id = logger.run_id
    for tag in FIGURES:
        listed = [entry.path for entry in client.list_artifacts(run_id, tag)]
        assert listed == [f"{tag}/step_0000000.png", f"{tag}/step_0000005.png"], listed
        local = client.download_artifacts(run_id, listed[-1], str(tmp_path / "down"))
        assert pathlib.Path(local).read_bytes()[:8] == PNG
    for step in (0, 5):
        local = client.download_artifacts(
            run_id, f"spectral/hessian/top_k/step_{step:07d}.json", str(tmp_path / "down")
        )
        record = json.loads(pathlib.Path(local).read_text())
        assert record["step"] == step
        assert sorted(record["values"], reverse=True) == pytest.approx(_top_k(spectrum, step))
    # The scalars too, at their steps.
    history = client.get_metric_history(run_id, "spectral/hessian/eig_1")
    assert [m.step for m in history] == [0, 5]


class ScalarsOnly(Logger):
    """A logger with no ``log_dir``: scalars only."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict] = []

    @property
    def name(self):
        return "scalars"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_a_logger_without_a_log_dir_gets_the_scalars_and_one_warning_per_monitor(tmp_path):
    logger = ScalarsOnly()
    x, y = regression_data(n=64)
    monitor = HessianSpectrumMonitor(every_n_steps=5, k=3, trace_hvps=6, density_steps=8)
    trainer = L.Trainer(max_epochs=1, callbacks=[monitor], **trainer_kwargs(logger=logger))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TanhRegressor(lr=0.05), full_batch_loader(x, y, 11))
    messages = [str(w.message) for w in caught if "receives the scalars only" in str(w.message)]
    assert len(messages) == 1 and "ScalarsOnly" in messages[0]
    assert sum("spectral/hessian/eig_1" in m for m in logger.metrics) == 3  # steps 0, 5, 10

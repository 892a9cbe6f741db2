"""Histograms and figures for every logger, each through its own API.

Scalars reach every Lightning logger through ``log_metrics``; histograms and figures have no
common call. A *sink* writes them for one logger:

- ``TensorBoardLogger``: figures as images (``add_image``), histograms (``add_histogram``);
- ``WandbLogger``: figures as ``wandb.Image`` (``log_image``), histograms as
  ``wandb.Histogram``, both at the logger's ``trainer/global_step`` like its scalars;
- ``MLFlowLogger``: figures as PNG artifacts ``{tag}/step_{step}.png`` (``log_figure``),
  histograms as JSON artifacts ``{tag}/step_{step}.json`` of the values (``log_dict``):
  MLflow has no image or histogram series;
- any other logger with a ``log_dir`` (``CSVLogger``): PNG files
  ``{log_dir}/media/{tag}/step_{step}.png`` and text files of the values, one per line,
  ``{log_dir}/media/{tag}/step_{step}.txt``.

A logger of none of these kinds (no ``log_dir``) receives the scalars only; :func:`media_sinks`
names it so the caller can say so once. Steps are zero-padded to seven digits so that file
listings sort in time order.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from .tensorboard import add_figure, figure_to_array, tensorboard_writers

__all__ = [
    "FileSink",
    "Media",
    "MediaSink",
    "MlflowSink",
    "TensorBoardSink",
    "WandbSink",
    "media_sinks",
]


class MediaSink(Protocol):
    """Writes the histograms and figures of one logger."""

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        """``values``: finite float64 on the CPU, at least one."""

    def figure(self, tag: str, figure: Any, step: int) -> None:
        """``figure``: a matplotlib ``Figure`` (not drawn yet)."""


class TensorBoardSink:
    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self.writer.add_histogram(tag, values.numpy(), step)

    def figure(self, tag: str, figure: Any, step: int) -> None:
        add_figure(self.writer, tag, figure, step)


class WandbSink:
    """Through the W&B run of a ``WandbLogger``, at the logger's ``trainer/global_step``
    axis (as its scalars)."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        import wandb

        self.logger.experiment.log(
            {tag: wandb.Histogram(values.numpy()), "trainer/global_step": step}
        )

    def figure(self, tag: str, figure: Any, step: int) -> None:
        self.logger.log_image(key=tag, images=[figure_to_array(figure)], step=step)


class MlflowSink:
    """Artifacts of the run of an ``MLFlowLogger`` (MLflow has no histogram or image series)."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        record = {"step": step, "values": values.tolist()}
        self.logger.experiment.log_dict(self.logger.run_id, record, _step_file(tag, step, "json"))

    def figure(self, tag: str, figure: Any, step: int) -> None:
        self.logger.experiment.log_figure(self.logger.run_id, figure, _step_file(tag, step, "png"))


class FileSink:
    """Files under ``directory/media/`` (a logger's ``log_dir``)."""

    def __init__(self, directory: str | pathlib.Path) -> None:
        self.root = pathlib.Path(directory) / "media"

    def _path(self, tag: str, step: int, suffix: str) -> pathlib.Path:
        path = self.root / _step_file(tag, step, suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        np.savetxt(self._path(tag, step, "txt"), values.numpy(), fmt="%.17g")

    def figure(self, tag: str, figure: Any, step: int) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(figure).print_png(str(self._path(tag, step, "png")))


def _step_file(tag: str, step: int, suffix: str) -> str:
    """``{tag}/step_{step:07d}.{suffix}``, the tag's characters limited to a safe set."""
    safe = re.sub(r"[^A-Za-z0-9_./-]+", "_", tag).strip("/")
    return f"{safe}/step_{step:07d}.{suffix}"


def _classes(name: str, module: str = "loggers") -> tuple[type, ...]:
    """Logger class ``name`` from ``lightning.pytorch.{module}`` and, if imported already,
    from ``pytorch_lightning.{module}``."""
    found = [getattr(importlib.import_module(f"lightning.pytorch.{module}"), name)]
    legacy = sys.modules.get(f"pytorch_lightning.{module}")
    if legacy is not None and hasattr(legacy, name):
        found.append(getattr(legacy, name))
    return tuple(found)


def media_sinks(loggers: Sequence[Any]) -> tuple[list[MediaSink], list[Any]]:
    """A sink for each logger in ``loggers`` that can take histograms and figures, and the
    loggers that cannot (scalars only). Lightning's ``DummyLogger`` (what ``fast_dev_run``
    puts in place of the user's loggers) drops everything by design: it is neither."""
    sinks: list[MediaSink] = [TensorBoardSink(w) for w in tensorboard_writers(loggers)]
    skipped = []
    tensorboard, wandb, mlflow = (
        _classes(n) for n in ("TensorBoardLogger", "WandbLogger", "MLFlowLogger")
    )
    dropping_everything = _classes("DummyLogger", "loggers.logger")
    for logger in loggers:
        if isinstance(logger, tensorboard + dropping_everything):
            continue
        if isinstance(logger, wandb):
            sinks.append(WandbSink(logger))
        elif isinstance(logger, mlflow):
            sinks.append(MlflowSink(logger))
        elif getattr(logger, "log_dir", None):
            sinks.append(FileSink(logger.log_dir))
        else:
            skipped.append(logger)
    return sinks, skipped


class Media:
    """Fans one measurement's histograms and figures out to every sink.

    Histograms keep their finite values (none: nothing is written); a figure goes to each
    sink as it is.
    """

    def __init__(self, sinks: Sequence[MediaSink]) -> None:
        self.sinks = list(sinks)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        values = values.detach().double().cpu().reshape(-1)
        values = values[torch.isfinite(values)]
        if values.numel() == 0:
            return
        for sink in self.sinks:
            sink.histogram(tag, values, step)

    def figure(self, tag: str, figure: Any, step: int) -> None:
        for sink in self.sinks:
            sink.figure(tag, figure, step)

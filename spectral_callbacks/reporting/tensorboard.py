"""TensorBoard helpers: a shared custom-scalars layout and figures as images.

Several callbacks may write to one ``SummaryWriter``; TensorBoard shows only the last
custom-scalars layout written, so the layout is kept per writer and rewritten whole whenever
a callback adds charts to it.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["add_chart_layout", "add_figure", "figure_to_array", "tensorboard_writers"]

# writer -> {category: {chart title: ["Multiline" | "Margin", [tags or regexes]]}}
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, dict[str, list]]] = weakref.WeakKeyDictionary()


def tensorboard_writers(loggers: Sequence[Any]) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger in ``loggers``, from the
    ``lightning.pytorch`` and the ``pytorch_lightning`` namespaces alike."""
    from lightning.pytorch.loggers import TensorBoardLogger

    classes: tuple[type, ...] = (TensorBoardLogger,)
    # A logger of that namespace means it is imported already; never import it here.
    legacy = sys.modules.get("pytorch_lightning.loggers")
    if legacy is not None and hasattr(legacy, "TensorBoardLogger"):
        classes += (legacy.TensorBoardLogger,)
    return [logger.experiment for logger in loggers if isinstance(logger, classes)]


def add_chart_layout(writer: Any, category: str, charts: dict[str, list[str]]) -> None:
    """Add multiline charts (title -> tags or tag regexes, anchored here) under ``category``.

    The merged layout of everything added to this writer so far is written again, so charts
    from several callbacks share one dashboard; two callbacks' charts of one title in one
    category draw the tags of both.
    """
    layout = _LAYOUTS.setdefault(writer, {})
    section = layout.setdefault(category, {})
    changed = False
    for title, tags in charts.items():
        # TensorBoard treats each entry as a regex searched in tag names: anchor it, or
        # "lambda_max" would also chart "lambda_max_residual".
        known = section.get(title, ["Multiline", []])[1]
        merged = known + [anchored for tag in tags if (anchored := f"^{tag}$") not in known]
        if merged != known or title not in section:
            section[title] = ["Multiline", merged]
            changed = True
    if changed:
        writer.add_custom_scalars(layout)


def figure_to_array(figure: Any) -> np.ndarray:
    """Render a matplotlib ``Figure`` with the Agg canvas to an ``(H, W, 3)`` uint8 array.

    No pyplot: the user's matplotlib backend and global figure list are left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def add_figure(writer: Any, tag: str, figure: Any, step: int) -> None:
    """Write a matplotlib ``Figure`` as an image."""
    writer.add_image(tag, figure_to_array(figure), step, dataformats="HWC")

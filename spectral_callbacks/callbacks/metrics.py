"""Tables of the metrics a monitor publishes: one row per metric (no Lightning here).

A monitor's names (``metric_names``), its custom-scalars dashboard (``chart_layout``) and
:class:`~spectral_callbacks.SpectralEarlyStopping`'s hint for a key nobody logs are all
read off its table, so adding a metric is adding one row.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "MetricSpec",
    "chart_layout",
    "expand_names",
    "full_name",
    "markdown_table",
    "matches",
    "undefined_names",
]

#: What each placeholder of a templated name stands for, as a regular expression (module
#: names hold dots, never slashes).
_PLACEHOLDERS = {"{i}": r"\d+", "{layer}": "[^/]+"}


@dataclass(frozen=True)
class MetricSpec:
    """One metric of a monitor.

    Attributes:
        name: The name after the monitor's prefix (``"lambda_max"``). ``{i}`` stands for
            ``1..k`` (``"eig_{i}"``) and ``{layer}`` for each measured module
            (``"layer/{layer}/trace"``).
        chart: Title of the custom-scalars chart the metric is drawn in (rows with one
            title share a chart, in table order), or ``None``.
        part: The monitor setting that turns the metric on (``"trace"``, ``"density"``), or
            ``None`` for a metric every measurement publishes.
        may_be_undefined: Whether NaN can be the metric's value by definition (an adaptive
            optimizer's ratio before its first step), not only a numerical failure.
        doc: What the value is, in a line (the docs pages' tables of what is logged are
            generated from it: :func:`markdown_table`).
    """

    name: str
    chart: str | None = None
    part: str | None = None
    may_be_undefined: bool = False
    doc: str = ""

    def pattern(self, reserved: Sequence[str] = ()) -> str:
        """The name as a regular expression (placeholders matched, the rest literal);
        ``{layer}`` matches no name of ``reserved`` (a pseudo-layer such as the averages)."""
        pattern = re.escape(self.name)
        for placeholder, regex in _PLACEHOLDERS.items():
            if placeholder == "{layer}" and reserved:
                regex = "(?!(?:" + "|".join(map(re.escape, reserved)) + ")/)" + regex
            pattern = pattern.replace(re.escape(placeholder), regex)
        return pattern


def overhead_row(name: str) -> MetricSpec:
    """The row of a monitor's share of training time spent measuring (the overhead budget's
    figure, :mod:`~spectral_callbacks.callbacks.schedule`), named ``name``."""
    return MetricSpec(
        name,
        chart="share of training time in measurements",
        may_be_undefined=True,
        doc="seconds this monitor has spent measuring (and logging what it measured) over "
        "seconds trained, so far (NaN before any training step was timed)",
    )


def expand_names(
    specs: Iterable[MetricSpec], prefix: str, k: int = 0, layers: Sequence[str] = ()
) -> list[str]:
    """Every full name the rows stand for: ``eig_{i}`` for ``i = 1..k``, ``{layer}`` for each
    of ``layers`` (a row with no placeholder is one name)."""
    names: list[str] = []
    for spec in specs:
        if "{i}" in spec.name:
            names += [prefix + spec.name.replace("{i}", str(i)) for i in range(1, k + 1)]
        elif "{layer}" in spec.name:
            names += [prefix + spec.name.replace("{layer}", layer) for layer in layers]
        else:
            names.append(prefix + spec.name)
    return names


def full_name(specs: Iterable[MetricSpec], prefix: str, row: str, **fields: object) -> str:
    """The name of row ``row`` of the table under ``prefix``, its placeholders filled from
    ``fields`` (``full_name(specs, p, "eig_{i}", i=2)`` is ``p + "eig_2"``).

    Raises:
        KeyError: If ``row`` is not a row of ``specs`` (a metric must have its row first).
    """
    rows = [spec.name for spec in specs]
    if row not in rows:
        raise KeyError(f"{row!r} is not a row of the metric table; rows: {rows}")
    return prefix + row.format(**fields)


def undefined_names(specs: Iterable[MetricSpec], prefix: str, layers: Sequence[str]) -> set[str]:
    """The names of ``layers`` that are NaN by definition: the per-layer ``may_be_undefined``
    rows."""
    rows = [s for s in specs if s.may_be_undefined and "{layer}" in s.name]
    return set(expand_names(rows, prefix, layers=layers))


def chart_layout(
    specs: Iterable[MetricSpec], prefix: str, reserved: Sequence[str] = ()
) -> dict[str, list[str]]:
    """Chart title -> the tags it draws: regular expressions, so a templated row's chart
    draws every eigenvalue or layer (none of ``reserved``) that is logged."""
    charts: dict[str, list[str]] = {}
    for spec in specs:
        if spec.chart is not None:
            charts.setdefault(spec.chart, []).append(re.escape(prefix) + spec.pattern(reserved))
    return charts


def markdown_table(specs: Iterable[MetricSpec], prefix: str, parts: dict[str, str]) -> str:
    """The docs' table of the rows: full name, what it is, and the setting that turns it on
    (``parts`` maps a row's ``part`` to how the argument reads, e.g. ``"trace=True"``)."""
    lines = ["| metric | meaning | logged when |", "|---|---|---|"]
    for spec in specs:
        when = parts[spec.part] if spec.part else "always"
        lines.append(f"| `{prefix}{spec.name}` | {spec.doc} | {when} |")
    return "\n".join(lines) + "\n"


def matches(specs: Iterable[MetricSpec], prefix: str, key: str) -> bool:
    """Whether ``key`` is one of the names the rows stand for under ``prefix`` (any ``k``,
    any layer, any monitor name between the prefix and the metric)."""
    if not key.startswith(prefix):
        return False
    rest = key[len(prefix) :]
    return any(re.fullmatch(f"(?:[^/]+/)?{spec.pattern()}", rest) for spec in specs)

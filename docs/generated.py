"""The parts of the docs pages that are generated from the code, so that each fact is
written once: the tables of what each monitor logs (from its ``METRICS`` rows).

    python docs/generated.py          # rewrite the generated parts of the pages in place

A generated part sits between ``<!-- generated:KEY -->`` and ``<!-- /generated -->`` in a
page; the test suite fails when a page's part differs from what this renders
(``tests/test_docs.py``), and the pages read the same on a code host as on the site.
"""

from __future__ import annotations

import pathlib
import re

DOCS = pathlib.Path(__file__).resolve().parent

#: How each monitor's ``part`` settings read in the "logged when" column.
_PARTS = {
    "HessianSpectrumMonitor": {
        "gradient_overlap": "`gradient_overlap=True` (default)",
        "trace": "`trace=True` (default)",
        "layer_traces": "`layer_traces > 0`",
        "layer_lambda_max": "`layer_lambda_max=True`",
        "sam": "`sam_radius` given",
        "density": "`density=True` (default)",
    },
    "WeightSpectrumMonitor": {
        "farms": "`farms=True` (default)",
        "drift": "`drift_rank` given",
    },
}

_BLOCK = re.compile(
    r"(<!-- generated:(?P<key>[\w.:-]+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S
)


def render_part(key: str) -> str:
    """The text of generated part ``key``: ``metrics:<MonitorClass>``."""
    kind, _, name = key.partition(":")
    if kind != "metrics":
        raise KeyError(f"unknown generated part {key!r}")
    import spectral_callbacks
    from spectral_callbacks.callbacks.metrics import markdown_table

    monitor = getattr(spectral_callbacks, name)
    return markdown_table(monitor.METRICS, monitor.METRIC_PREFIXES[0], _PARTS.get(name, {}))


def render(page: str) -> str:
    """``page`` with every generated part rendered anew."""
    return _BLOCK.sub(lambda m: m.group(1) + render_part(m.group("key")) + m.group(4), page)


def pages() -> list[pathlib.Path]:
    """The docs pages that hold a generated part."""
    return sorted(p for p in DOCS.glob("*.md") if "<!-- generated:" in p.read_text())


def main() -> None:
    for path in pages():
        text = path.read_text()
        new = render(text)
        if new != text:
            path.write_text(new)
            print(f"rewrote {path.relative_to(DOCS.parent)}")


if __name__ == "__main__":
    main()

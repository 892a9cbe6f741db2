"""The parts of the docs pages that are generated from the code, so that each fact is
written once: the tables of what each monitor logs (from its ``METRICS`` rows) and the list
of every argument of a callback (from its signature and the ``Args:`` of its docstring).

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


def docstring_arguments(cls: type) -> dict[str, str]:
    """The ``Args:`` section of ``cls``'s docstring: argument name -> its text, continuation
    lines joined."""
    import inspect

    lines = (inspect.getdoc(cls) or "").splitlines()
    start = lines.index("Args:") + 1
    arguments: dict[str, str] = {}
    name = None
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break  # the next section
        entry = re.match(r"^    (\*{0,2}\w+): ?(.*)$", line)
        if entry:
            name = entry.group(1).lstrip("*")
            arguments[name] = entry.group(2).strip()
        elif name is not None and line.strip():
            arguments[name] += " " + line.strip()
    return arguments


def markdown_of_rst(text: str) -> str:
    """Docstring markup as Markdown: ````code```` → ```code```, ``:role:`~a.b.c``` → ```c```
    (```a.b.c``` without the ``~``)."""

    def role(match: re.Match) -> str:
        target = match.group(1)
        return f"`{target.rsplit('.', 1)[-1]}`" if target.startswith("~") else f"`{target}`"

    text = re.sub(r":\w+:`([^`]+)`", role, text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def argument_list(cls: type) -> str:
    """Every argument of ``cls``'s constructor with its default and its docstring text."""
    import inspect

    texts = docstring_arguments(cls)
    items = []
    for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            head = f"- **`**{parameter.name}`**"
        elif parameter.default is inspect.Parameter.empty:
            head = f"- **`{parameter.name}`** (required)"
        else:
            head = f"- **`{parameter.name}`** = `{parameter.default!r}`"
        text = texts.get(parameter.name)
        if text is None:
            raise KeyError(f"{cls.__name__}'s docstring does not describe {parameter.name!r}")
        items.append(f"{head}: {markdown_of_rst(text)}")
    return "\n".join(items) + "\n"


def render_part(key: str) -> str:
    """The text of generated part ``key``: ``metrics:<MonitorClass>`` or
    ``arguments:<CallbackClass>``."""
    kind, _, name = key.partition(":")
    if kind not in ("metrics", "arguments"):
        raise KeyError(f"unknown generated part {key!r}")
    import spectral_callbacks
    from spectral_callbacks.callbacks.metrics import markdown_table

    callback = getattr(spectral_callbacks, name)
    if kind == "arguments":
        return argument_list(callback)
    return markdown_table(callback.METRICS, callback.METRIC_PREFIXES[0], _PARTS.get(name, {}))


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

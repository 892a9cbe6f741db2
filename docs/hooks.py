"""MkDocs hook: the home page is the README (one source), its links made relative to docs/;
the benchmark tables are rendered from the JSON results; the arguments page from the
signatures."""

from __future__ import annotations

import importlib.util
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PEER_TABLES = "<!-- peer-comparison-tables -->"
SIGNATURES = "<!-- callback-signatures -->"
CALLBACKS = (
    "SharpnessMonitor",
    "BatchSharpnessMonitor",
    "HessianSpectrumMonitor",
    "RepresentationMonitor",
    "WeightSpectrumMonitor",
    "SpectralEarlyStopping",
)


def _bench_report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peer_tables() -> str:
    report = _bench_report()
    sections = []
    for path, results in report.peer_comparisons():
        sections.append(f"#### `bench/results/{path.name}`\n\n{report.markdown(results)}")
    return "\n".join(sections) or "No run of `bench/run.py` is recorded yet.\n"


def _argument(parameter) -> str:
    """``name: annotation = default`` with the annotation as written (they are strings under
    ``from __future__ import annotations``)."""
    import inspect

    prefix = {inspect.Parameter.VAR_KEYWORD: "**", inspect.Parameter.VAR_POSITIONAL: "*"}
    text = prefix.get(parameter.kind, "") + parameter.name
    if parameter.annotation is not inspect.Parameter.empty:
        annotation = parameter.annotation
        if not isinstance(annotation, str):
            annotation = inspect.formatannotation(annotation)
        text += f": {annotation}"
    if parameter.default is not inspect.Parameter.empty:
        text += f" = {parameter.default!r}"
    return text


def _signatures() -> str:
    """Each callback's constructor, one argument per line, as ``inspect`` reads it."""
    import inspect

    import spectral_callbacks

    blocks = []
    for name in CALLBACKS:
        parameters = list(inspect.signature(getattr(spectral_callbacks, name)).parameters.values())
        lines = [f"    {_argument(parameter)}," for parameter in parameters]
        blocks.append(f"{name}(\n" + "\n".join(lines) + "\n)")
    return "```python\n" + "\n\n".join(blocks) + "\n```"


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if PEER_TABLES in markdown:
        markdown = markdown.replace(PEER_TABLES, _peer_tables())
    if SIGNATURES in markdown:
        markdown = markdown.replace(SIGNATURES, _signatures())
    if page.file.src_uri != "index.md":
        return markdown
    text = README.read_text()
    text = text.replace("[`docs/`](docs/)", "`docs/`").replace("](docs/", "](")
    return text.replace("](CHANGELOG.md)", "](changelog.md)")


_ROLE = re.compile(r":(?:mod|class|func|data|attr|meth|exc):(?=<code>)")
_TILDE = re.compile(r"<code>~")


def on_page_content(html: str, page, **kwargs) -> str:
    """Docstrings cross-reference in Sphinx's roles (``:func:`x```); the API pages show
    only the name."""
    return _TILDE.sub("<code>", _ROLE.sub("", html))

"""MkDocs hook: the home page is the README (one source), its links made relative to docs/."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def on_page_markdown(markdown: str, page, **kwargs) -> str:
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

"""The docs pages' generated parts are those the code renders now (docs/generated.py)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def _generated():
    spec = importlib.util.spec_from_file_location("docs_generated", DOCS / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATED = _generated()


@pytest.mark.parametrize("page", GENERATED.pages(), ids=lambda path: path.name)
def test_generated_parts_of_the_docs_are_current(page):
    text = page.read_text()
    assert GENERATED.render(text) == text, f"run `python docs/generated.py` to update {page.name}"


def test_every_monitor_page_holds_its_metric_table():
    keys = {
        "sharpness.md": "SharpnessMonitor",
        "hessian-spectrum.md": "HessianSpectrumMonitor",
        "representations.md": "RepresentationMonitor",
        "weights.md": "WeightSpectrumMonitor",
    }
    for page, monitor in keys.items():
        assert f"<!-- generated:metrics:{monitor} -->" in (DOCS / page).read_text(), page

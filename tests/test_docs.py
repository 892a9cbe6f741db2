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


PAGES = {
    "sharpness.md": "SharpnessMonitor",
    "batch-sharpness.md": "BatchSharpnessMonitor",
    "hessian-spectrum.md": "HessianSpectrumMonitor",
    "representations.md": "RepresentationMonitor",
    "weights.md": "WeightSpectrumMonitor",
}


def test_every_monitor_page_holds_its_metric_table_and_its_arguments():
    for page, monitor in PAGES.items():
        text = (DOCS / page).read_text()
        assert f"<!-- generated:metrics:{monitor} -->" in text, page
        assert f"<!-- generated:arguments:{monitor} -->" in text, page
    assert (
        "<!-- generated:arguments:SpectralEarlyStopping -->"
        in (DOCS / "early-stopping.md").read_text()
    )


def test_the_argument_lists_hold_every_argument_with_its_text():
    import inspect

    import spectral_callbacks

    for monitor in (*PAGES.values(), "SpectralEarlyStopping"):
        cls = getattr(spectral_callbacks, monitor)
        text = GENERATED.argument_list(cls)
        names = list(inspect.signature(cls.__init__).parameters)[1:]
        assert len(text.splitlines()) == len(names), monitor
        for name, line in zip(names, text.splitlines(), strict=True):
            assert f"`{name}`" in line or f"`**{name}`" in line, (monitor, line)
            assert len(line.split(": ", 1)[1]) > 10, (monitor, line)  # a description, not empty
            assert "``" not in line and ":class:" not in line, line  # Markdown, not RST


def test_an_argument_missing_from_the_docstring_is_an_error():
    class Undocumented:
        """A callback.

        Args:
            a: The first.
        """

        def __init__(self, a: int = 1, b: int = 2) -> None: ...

    with pytest.raises(KeyError, match="does not describe 'b'"):
        GENERATED.argument_list(Undocumented)


@pytest.mark.parametrize("page", ["sharpness", "batch-sharpness", "hessian-spectrum", "weights"])
def test_the_example_at_the_top_of_a_monitor_page_runs(page, tmp_path, monkeypatch):
    import warnings

    text = (DOCS / f"{page}.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, f"{page}.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.global_step == 80
    assert any(k.startswith("spectral/") for k in trainer.callback_metrics), page
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))

"""Notebook displays stay small: plotly.js (~4.8 MB) is inlined once per Python process (a notebook's
kernel) and later displays carry only their figure, measured in bytes on a real-shaped LLaVA-1.5-7B
trace (31 LLM x 25 vision layers, 576 image tokens); the first display works offline (no CDN), a
fresh kernel inlines it again, `cliviz.reset_notebook()` forces it, and a page whose library was
cleared says so instead of drawing nothing (checked in Chromium, offline)."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import cliviz
from cliviz.analyses import display
from cliviz.tracing.schema import Trace
from cliviz.tracing.synthetic import real_shape_trace
from cliviz.tracing.traceset import TraceSet

MB = 1_000_000
LIBRARY = "plotly.js v"  # the bundle's licence header


@pytest.fixture(scope="module")
def llava() -> Trace:
    """A trace at LLaVA-1.5-7B's real shape (what made 20 displays weigh ~100 MB)."""
    t = real_shape_trace("llava-1.5-7b", seed=0, sample_id="s0")
    assert t.gates.shape[0] == 31 and len(t.meta.vision_layers) == 25
    return t


@pytest.fixture(autouse=True)
def fresh_process() -> Iterator[None]:
    """Each test starts as a fresh kernel does: nothing emitted yet (and leaves it so for other files)."""
    display.reset_plotlyjs()
    yield
    display.reset_plotlyjs()


def _plotlyjs() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def test_first_display_carries_plotlyjs_inline_and_loads_nothing(llava: Trace) -> None:
    """Offline: the whole library is in the first output, and nothing outside the library's own text
    points to a CDN or loads a script from anywhere."""
    first = llava._repr_html_()
    size = len(first.encode())
    assert first.count(LIBRARY) == 1 and _plotlyjs() in first
    assert 4 * MB < size < 6 * MB, size
    rest = first.replace(_plotlyjs(), "")  # the bundle mentions cdn.plot.ly as its geo-map default only
    assert "https://cdn" not in rest and "cdn.plot.ly" not in rest and "src=" not in rest
    assert "Plotly.newPlot" in rest and display.MISSING_PLOTLYJS not in rest


def test_later_displays_stay_well_under_1_mb(llava: Trace) -> None:
    """The second and third display of the same real-shape trace carry the figure only (~32 kB)."""
    sizes = [len(llava._repr_html_().encode()) for _ in range(3)]
    later = [llava._repr_html_() for _ in range(2)]
    assert sizes[0] > 4 * MB and all(s < 100_000 for s in sizes[1:]), sizes
    for html in later:
        assert LIBRARY not in html and "https://cdn" not in html and "src=" not in html
        assert "Plotly.newPlot" in html and '"z":' in html  # the figure and its data are still there
    assert sum(sizes) + sum(len(h.encode()) for h in later) < sizes[0] + MB  # 5 displays: one library


def test_one_library_for_every_kind_of_display(llava: Trace) -> None:
    """A TraceSet shown after a Trace (and the reverse) reuses the library: one per process, not per class."""
    ts = TraceSet([llava, real_shape_trace("llava-1.5-7b", seed=1, sample_id="s1")])
    first_set = ts._repr_html_()
    after = llava._repr_html_()
    assert LIBRARY in first_set and LIBRARY not in after and len(after.encode()) < 100_000
    display.reset_plotlyjs()
    llava._repr_html_()
    later_set = ts._repr_html_()
    assert LIBRARY not in later_set and "Plotly.newPlot" in later_set and len(later_set.encode()) < 100_000


def test_reset_notebook_inlines_it_again_once(llava: Trace) -> None:
    """`cliviz.reset_notebook()` (for users who cleared outputs) puts the library in the next display only."""
    llava._repr_html_()
    assert LIBRARY not in llava._repr_html_()
    cliviz.reset_notebook()
    assert LIBRARY in llava._repr_html_()
    assert LIBRARY not in llava._repr_html_()


def test_later_display_names_its_own_plot_when_the_library_is_missing(llava: Trace) -> None:
    """A later display checks `window.Plotly` for its own div; each display has its own div id."""
    llava._repr_html_()
    a, b = llava._repr_html_(), llava._repr_html_()
    for html in (a, b):
        div_id = html.split('<div id="', 1)[1].split('"', 1)[0]
        assert f'document.getElementById("{div_id}")' in html and display.MISSING_PLOTLYJS in html
        assert "cliviz.reset_notebook()" in html and "if (!window.Plotly)" in html
    assert a.split('<div id="', 1)[1][:40] != b.split('<div id="', 1)[1][:40]


def test_colab_inlines_every_time(llava: Trace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Colab draws each output in its own frame (no shared `window.Plotly`): every display carries it."""
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert all(LIBRARY in llava._repr_html_() for _ in range(2))
    monkeypatch.delitem(sys.modules, "google.colab")
    assert LIBRARY not in llava._repr_html_()


def test_a_kernel_inlines_it_in_its_first_output_only(tmp_path: Path) -> None:
    """In a real ipykernel (what Jupyter and nbconvert run; Restart & Run All starts a fresh one): the
    first output holds the library, later outputs of a real-shape trace stay well under 1 MB, and
    `cliviz.reset_notebook()` puts it in the next output."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import cliviz\n"
            "from cliviz.tracing.synthetic import real_shape_trace\n"
            "t = real_shape_trace('llava-1.5-7b', seed=0, sample_id='s0')"
        ),
        *[nbformat.v4.new_code_cell("t") for _ in range(3)],
        nbformat.v4.new_code_cell("cliviz.reset_notebook()\nt"),
    ]
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    html = [o["data"]["text/html"] for c in nb.cells for o in c.outputs if "text/html" in o.get("data", {})]
    sizes = [len(h.encode()) for h in html]
    assert [LIBRARY in h for h in html] == [True, False, False, True], sizes
    assert sizes[0] > 4 * MB and all(s < 100_000 for s in sizes[1:3]), sizes


@pytest.mark.browser
def test_exported_page_draws_every_figure_offline(llava: Trace, browser, tmp_path: Path) -> None:
    """The outputs in order, as an HTML export holds them, drawn in Chromium with the network cut: all
    three figures render from the first output's library; without that output, a figure says why."""
    outputs = [llava._repr_html_() for _ in range(3)]
    full = tmp_path / "export.html"
    full.write_text("<!doctype html><meta charset='utf-8'><body>" + "".join(outputs) + "</body>")
    cleared = tmp_path / "cleared.html"
    cleared.write_text("<!doctype html><meta charset='utf-8'><body>" + outputs[2] + "</body>")
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    requested: list[str] = []
    try:
        page.route("http*://**", lambda route: (requested.append(route.request.url), route.abort()))
        page.goto(full.as_uri())
        page.wait_for_function("document.querySelectorAll('.plotly-graph-div .main-svg').length >= 6")
        assert page.locator(".js-plotly-plot").count() == 3 and requested == []
        assert display.MISSING_PLOTLYJS not in page.locator("body").inner_text()  # shown text, not scripts
        page.goto(cleared.as_uri())
        assert page.locator(".js-plotly-plot").count() == 0
        assert page.locator(".plotly-graph-div").inner_text() == display.MISSING_PLOTLYJS
    finally:
        page.close()

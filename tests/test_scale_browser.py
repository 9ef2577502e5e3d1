"""Every output drawn at real shapes in the real browser: `cliviz figures` (kaleido + Chromium), the
trace page and the dashboard (data-set tab, explore heatmap, token strip) for LLaVA-1.5-7B (31 x 25,
576 image tokens) and OneVision-7B (27 x 27, ~2,900 image tokens) traces with a 256-token answer.

Figures and pages are checked for what they draw (non-blank rasters, every LLM layer labelled, a
slider over 256 steps); screenshots go to the pytest tmp folder and to /tmp/cliviz-scale-shots/.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect
from werkzeug.serving import make_server

from cliviz.tracing.synthetic import real_shape_trace
from cliviz.tracing.traceset import TraceSet

SHOTS = Path("/tmp/cliviz-scale-shots")
SHAPES = ("llava-1.5-7b", "onevision-7b")
pytestmark = [pytest.mark.browser, pytest.mark.slow]
expect.set_options(timeout=60_000)


def _keep(path: Path) -> None:
    SHOTS.mkdir(exist_ok=True)
    shutil.copy(path, SHOTS / path.name)


def _non_blank(png: Path) -> float:
    """Share of pixels that are not background white."""
    a = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    return float((a < 245).mean())


@pytest.fixture(scope="module")
def real_sets(tmp_path_factory):
    """One set per shape: a 256-token answer first, then 11 shorter traces of several question types."""
    out = {}
    for shape in SHAPES:
        path = tmp_path_factory.mktemp(shape) / "set.parquet"
        TraceSet.append(path, [real_shape_trace(shape, seed=0, n_answer=256)])
        TraceSet.append(path, [real_shape_trace(shape, seed=i, n_image_tokens=64) for i in range(1, 12)])
        out[shape] = path
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_figures_at_real_shapes_are_drawn(shape, real_sets, tmp_path):
    from cliviz.analyses.figures import make_figures

    report = make_figures(real_sets[shape], tmp_path / "figs", formats="png", titles=True, png_scale=1.5)
    assert {"gate_mean", "gate_by_qtype", "gate_entropy", "gate_variance", "gate_trajectory"} <= set(report.figures)
    assert "synthetic/" + shape in report.caption and "12 traces" in report.caption
    for name in report.figures:
        png = tmp_path / "figs" / f"{name}.png"
        png_named = png.with_name(f"{shape}-{name}.png")
        shutil.copy(png, png_named)
        _keep(png_named)
        assert _non_blank(png) > 0.03, name


@pytest.mark.parametrize("shape", SHAPES)
def test_trace_page_at_real_shape(shape, browser, tmp_path):
    from cliviz.analyses.heatmaps import write_trace_html

    trace = real_shape_trace(shape, seed=0, n_answer=256)
    page_path = tmp_path / f"{shape}-trace-page.html"
    write_trace_html(trace, page_path)
    page = browser.new_page(viewport={"width": 1100, "height": 1100})
    try:
        page.goto(page_path.as_uri())
        expect(page.locator(".hm image")).to_have_count(1)
        expect(page.locator(".slider-group")).to_have_count(1)  # 256 steps: a slider, not a dropdown
        labels = page.locator(".ytick text").all_text_contents()
        layers = trace.meta.injection_layers
        assert f"L{layers[0]}" in labels and f"L{layers[-1]}" in labels and len(labels) >= len(layers) // 2
        shot = tmp_path / f"{shape}-trace-page.png"
        page.screenshot(path=str(shot), full_page=True)
        _keep(shot)
        assert _non_blank(shot) > 0.05
    finally:
        page.close()


def test_dashboard_at_real_shape(real_sets, random_model_dir, browser, tmp_path):
    """The data-set tab over a 31 x 25 set, and the explore heatmap and token strip of a 256-step trace."""
    from cliviz.app import create_app
    from cliviz.app.callbacks_explore import render_answer, render_heatmap

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = create_app(random_model_dir, real_sets["llava-1.5-7b"], device="cpu", dtype="float32")
    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    page = browser.new_page(viewport={"width": 1300, "height": 1400})
    try:
        page.goto(f"http://127.0.0.1:{server.server_port}/")
        page.locator("#tab-dataset").click()
        expect(page.locator("#dataset-heatmaps .hm image").first).to_be_visible()
        expect(page.locator("#dataset-table")).to_contain_text("color")
        shot = tmp_path / "dashboard-dataset-llava-1.5-7b.png"
        page.screenshot(path=str(shot), full_page=True)
        _keep(shot)
    finally:
        page.close()
        server.shutdown()
        thread.join(timeout=10)

    # the explore tab's heatmap and token strip, drawn by its callbacks from a real-shape stored trace
    long = real_shape_trace("llava-1.5-7b", seed=0, n_answer=256)
    store = {"trace": long.to_dict()}
    fig, caption, _ = render_heatmap(store, "answer", None)
    assert fig.layout.height >= 31 * 18 and not fig.data[0].texttemplate  # rows readable, no cramped numbers
    strip = render_answer(store)
    assert "maxHeight" in str(strip)  # a 256-token strip scrolls
    html_path = tmp_path / "explore-heatmap-llava-1.5-7b.html"
    fig.write_html(str(html_path), include_plotlyjs=True)
    page = browser.new_page(viewport={"width": 900, "height": 800})
    try:
        page.goto(html_path.as_uri())
        expect(page.locator(".hm image")).to_have_count(1)
        shot = tmp_path / "explore-heatmap-llava-1.5-7b.png"
        page.screenshot(path=str(shot), full_page=True)
        _keep(shot)
        assert _non_blank(shot) > 0.05
    finally:
        page.close()

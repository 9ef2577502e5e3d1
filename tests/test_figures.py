"""`cliviz figures`: every file of the set exists and is a valid PDF / SVG / PNG / CSV, rendered
through the system Chromium (kaleido) and checked with poppler's pdfinfo / pdftoppm."""

from __future__ import annotations

import json
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cliviz.analyses.figures import FORMATS, WIDTHS, build_figure_set, make_figures, read_ablations, read_compare
from cliviz.errors import CLIVizError
from cliviz.tracing.traceset import TraceSet, write_traces

from conftest import assert_clean_error, run_main
from factories import hand_trace, synthetic_traces

STANDARD = [
    "gate_mean",
    "gate_by_qtype",
    "gate_entropy",
    "gate_variance",
    "gate_trajectory",
    "probe_confusion",
    "gate_pca",
]
PNG_SCALE = 2.0


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fig-inputs")
    traces = write_traces(d / "traces.parquet", synthetic_traces(48, seed=7, n_answer=3))
    cmp = d / "compare.json"
    cmp.write_text(
        json.dumps(
            [
                {"Model": "cli", "question_type": "colour", "acc": 91.0},
                {"Model": "cli", "question_type": "count", "acc": 62.0},
                {"Model": "projector", "question_type": "colour", "acc": 80.0},
                {"Model": "projector", "question_type": "count", "acc": 35.0},
            ]
        )
    )
    abl = d / "ablations.csv"
    rows = [
        {"layer": li, "vision_layer": v, "delta_logprob": -0.1 * (li + v) + 0.01 * s, "sample": s}
        for li in (2, 4, 6)
        for v in (1, 4, 7, 10)
        for s in range(3)
    ]
    pd.DataFrame(rows).to_csv(abl, index=False)
    return {"traces": traces, "compare": cmp, "ablations": abl, "dir": d}


@pytest.fixture(scope="module")
def figure_set(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("figs") / "out"
    report = make_figures(
        inputs["traces"],
        out,
        formats="pdf,svg,png",
        ablations=inputs["ablations"],
        compare=inputs["compare"],
        example=5,
        png_scale=PNG_SCALE,
    )
    return report


def test_every_figure_in_every_format_is_valid(figure_set) -> None:
    out = figure_set.out
    assert figure_set.figures == STANDARD + ["comparison", "ablation_grid"]
    assert figure_set.skipped == {}
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = {f["name"]: (f["width_px"], f["height_px"]) for f in manifest["figures"]}
    for name in figure_set.figures:
        w, h = sizes[name]
        assert w == WIDTHS["single"]
        pdf = out / f"{name}.pdf"
        assert pdf.read_bytes()[:5] == b"%PDF-", name
        info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
        assert re.search(r"^Pages:\s+1$", info, re.M), info
        page = next(line for line in info.splitlines() if line.startswith("Page size:"))
        pw, ph = (float(v) for v in page.split(":")[1].split("pts")[0].split(" x "))
        assert pw == pytest.approx(w * 0.75, abs=1.5) and ph == pytest.approx(h * 0.75, abs=1.5), (name, page)
        root = ET.parse(out / f"{name}.svg").getroot()
        assert root.tag.endswith("svg")
        with Image.open(out / f"{name}.png") as im:
            im.load()
            assert im.format == "PNG" and im.size == (round(w * PNG_SCALE), round(h * PNG_SCALE)), (name, im.size)
        csv = pd.read_csv(out / f"{name}.csv")
        assert len(csv) > 0, name
    assert (out / "probe_confusion_summary.csv").exists()


def test_numbers_behind_figures(figure_set, inputs) -> None:
    out = figure_set.out
    mean = pd.read_csv(out / "gate_mean.csv")
    assert list(mean.columns) == ["n_traces", "llm_layer", "vision_layer", "gate"]
    assert sorted(mean.llm_layer.unique()) == [2, 4, 6] and sorted(mean.vision_layer.unique()) == [1, 4, 7, 10]
    np.testing.assert_allclose(mean.groupby("llm_layer").gate.sum(), 1.0, rtol=1e-5)
    by = pd.read_csv(out / "gate_by_qtype.csv")
    assert set(by.qtype) == {"colour", "count", "glyph", "position"} and (by.n_traces == 12).all()
    probe = pd.read_csv(out / "probe_confusion_summary.csv")
    assert probe.accuracy.item() > probe.baseline.item()
    cmp = pd.read_csv(out / "comparison.csv")  # percent read as fractions, aliases understood
    assert cmp.set_index(["model", "qtype"]).loc[("cli", "colour"), "accuracy"] == pytest.approx(0.91)
    abl = pd.read_csv(out / "ablation_grid.csv")  # three samples per cell averaged
    assert len(abl) == 12 and (abl.n == 3).all()
    assert abl.set_index(["llm_layer", "vision_layer"]).loc[(2, 1), "effect"] == pytest.approx(-0.29)
    traj = pd.read_csv(out / "gate_trajectory.csv")
    assert set(traj.trace) == {5} and sorted(traj.step.unique()) == [0, 1, 2]


def test_pdf_renders_to_a_non_blank_page_with_vector_text(figure_set, tmp_path) -> None:
    pdf = figure_set.out / "gate_by_qtype.pdf"
    subprocess.run(["pdftoppm", "-r", "100", "-png", "-singlefile", str(pdf), str(tmp_path / "page")], check=True)
    with Image.open(tmp_path / "page.png") as im:
        gray = np.asarray(im.convert("L"), dtype=float)
    assert gray.std() > 20, gray.std()  # a blank (or all-white) page has std ~0
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    assert "LLM layer" in text and "colour" in text  # axis titles and panel labels are real text


def test_cli_writes_a_set_and_reports_it(inputs, tmp_path) -> None:
    proc = run_main(
        "figures",
        str(inputs["traces"]),
        "--out",
        str(tmp_path / "o"),
        "--format",
        "svg",
        "--width",
        "double",
        "--titles",
    )
    assert proc.returncode == 0, proc.stderr
    assert "gate_mean" in proc.stdout and "probe_confusion" in proc.stdout
    files = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert files.count("gate_mean.svg") == 1 and not any(f.endswith(".pdf") for f in files)
    svg = (tmp_path / "o" / "gate_mean.svg").read_text()
    assert f'width="{WIDTHS["double"]}"' in svg and "Mean answer-step gates" in svg  # --titles


def test_cli_corrupt_trace_file_is_one_line_exit_2(tmp_path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(np.random.default_rng(0).bytes(2048))
    assert_clean_error(run_main("figures", str(bad), "--out", str(tmp_path / "o")), "not a readable Parquet file")
    assert_clean_error(
        run_main("figures", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "o")), "does not exist"
    )


def test_bad_inputs_are_clear_errors(inputs, tmp_path, monkeypatch) -> None:
    t = inputs["traces"]
    with pytest.raises(CLIVizError, match="unknown figure format 'eps'"):
        make_figures(t, tmp_path / "o", formats="pdf,eps")
    with pytest.raises(CLIVizError, match="unknown width"):
        make_figures(t, tmp_path / "o", width="triple")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CLIVizError, match="output folder .* is a file"):
        make_figures(t, blocker)
    with pytest.raises(CLIVizError, match="cannot create output folder"):
        make_figures(t, blocker / "sub")
    proj = write_traces(tmp_path / "proj.parquet", [hand_trace(np.zeros((0, 3, 1)), [1], vision=[4], llm=[])])
    with pytest.raises(CLIVizError, match="no trace in the set has gates"):
        make_figures(proj, tmp_path / "o")
    with pytest.raises(CLIVizError, match="--example 999 is outside"):
        make_figures(t, tmp_path / "o", example=999)
    (tmp_path / "cmp.csv").write_text("model,accuracy\ncli,0.5\n")
    with pytest.raises(CLIVizError, match="needs a column 'llm_layer'"):
        read_ablations(tmp_path / "cmp.csv")
    assert read_compare(tmp_path / "cmp.csv").qtype.tolist() == ["all"]
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(CLIVizError, match="cannot read comparison file"):
        read_compare(tmp_path / "junk.json")
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    with pytest.raises(CLIVizError, match="install Debian's chromium"):
        make_figures(t, tmp_path / "o2", formats="svg")
    assert not any((tmp_path / "o2").iterdir())  # refused before any work


def test_mixed_layers_refused_and_one_type_skips_probe(tmp_path) -> None:
    ts = synthetic_traces(6)
    other = synthetic_traces(2, K=3)
    with pytest.raises(CLIVizError, match="mix layer lists"):
        build_figure_set(TraceSet(ts + other))
    items, skipped = build_figure_set(TraceSet(synthetic_traces(6, qtypes=("colour",))))
    assert "probe_confusion" in skipped and "at least 2 question types" in skipped["probe_confusion"]
    assert [it.name for it in items][:2] == ["gate_mean", "gate_by_qtype"]
    assert set(FORMATS) == {"pdf", "svg", "png"}


def test_cli_broken_browser_is_one_line_exit_2(inputs, tmp_path, monkeypatch) -> None:
    # an executable that is not Chromium: kaleido's browser dies at start; no hang, no traceback
    monkeypatch.setenv("BROWSER_PATH", "/bin/true")
    proc = run_main("figures", str(inputs["traces"]), "--out", str(tmp_path / "o"), "--format", "svg")
    assert_clean_error(proc, "failed during figure export")


def _svg_box(svg: str, group: str) -> tuple[float, float]:
    """(top, bottom) in px of a plotly SVG legend: its translate plus the height of its background."""
    start = svg.index(f'<g class="{group}"')
    ty = float(re.search(r"translate\(([-\d.]+),\s*([-\d.]+)\)", svg[start : start + 300]).group(2))
    height = float(re.search(r'<rect class="bg"[^>]*height="([\d.]+)"', svg[start:]).group(1))
    return ty, ty + height


def _text_box(svg: str, cls: str, font_px: float) -> tuple[float, float]:
    """(top, bottom) in px of a one-line SVG text of class `cls`, from its baseline."""
    baseline = float(re.search(rf'<text class="{cls}"[^>]*\by="([-\d.]+)"', svg).group(1))
    return baseline - font_px, baseline + 0.25 * font_px


def test_comparison_legend_clears_the_axis_title_and_grid_colour_bar_is_readable(inputs) -> None:
    """Slanted question types once pushed the x-axis title under the legend; the grid's colour bar
    said `delta_logprob_own`."""
    from cliviz.analyses.figures import kaleido_session

    qtypes = ["color", "count", "glyph", "position", "relation", "shape", "size"]
    compare = pd.DataFrame(
        [
            {"model": m, "qtype": q, "accuracy": 0.5 + 0.05 * i}
            for m in ("cli-tiny", "projector-tiny", "deepstack-tiny")
            for i, q in enumerate(qtypes)
        ]
    )
    cells = pd.DataFrame(
        [
            {"llm_layer": li, "vision_layer": v, "metric": m, "value": -0.1 * (li + v)}
            for li in (2, 4)
            for v in (1, 4)
            for m in ("delta_logprob_own", "flip_rate")
        ]
    )
    cells_path = inputs["dir"] / "own.csv"
    cells.to_csv(cells_path, index=False)
    ts = TraceSet.read(inputs["traces"])
    with kaleido_session() as session:
        for titles in (False, True):
            items, _ = build_figure_set(ts, compare=compare, ablations=read_ablations(cells_path), titles=titles)
            bars = next(it for it in items if it.name == "comparison")
            svg = session.render(bars.fig, "svg", bars.width, bars.height).decode()
            legend = _svg_box(svg, "legend")
            for other in [_text_box(svg, "xtitle", 10)] + ([_text_box(svg, "gtitle", 11)] if titles else []):
                assert legend[1] <= other[0] or other[1] <= legend[0], (titles, legend, other)
    grid = next(it for it in items if it.name == "ablation_grid")
    assert grid.fig.data[0].colorbar.title.text == "Δ log-prob (own answer)"
    assert "delta_logprob" not in grid.title

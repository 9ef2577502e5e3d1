"""Figures and the HTML page of an attribution: the display side of `AttributionResult`.

Colour scales are symmetric around 0 with their absolute range in the colour-bar title (`±2.3e-07`),
so a map of noise never looks like a strong signal without saying how small it is; a map the result
calls unreadable (`AttributionResult.cells_unreliable`, `saturated_steps`) says so in its title.
Every function takes the result first (`token_strip_figure(result)`); the result's own methods of the
same names call these.
"""

from __future__ import annotations

import html as html_lib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from PIL import Image

if TYPE_CHECKING:
    from cliviz.analyses.attribution_result import AttributionResult


def token_strip_figure(result: AttributionResult) -> go.Figure:
    """Two strips: the answer tokens coloured by their total gate-cell attribution, and below,
    per answer token, every prompt token coloured by its gradient x input."""
    from plotly.subplots import make_subplots

    totals = result.totals()
    labels = [f"{s}: {t}" for s, t in enumerate(result.answer_tokens)]
    fig = make_subplots(
        rows=2,
        cols=1,
        row_heights=[0.25, 0.75],
        vertical_spacing=0.18,
        subplot_titles=(
            f"answer tokens: total gate-cell attribution ({result.method}, {result.target})",
            f"prompt tokens: gradient × input (gxi) of the {result.target}",
        ),
    )
    fig.add_trace(
        _signed_heatmap(
            [totals.tolist()], labels, ["answer"], [result.answer_tokens], "gates",
            {"y": 1.0, "yanchor": "top", "len": 0.3},
            "answer token %{x}<br>total %{z:.3g}<extra></extra>",
        ),
        row=1,
        col=1,
    )  # fmt: skip
    fig.add_trace(
        _signed_heatmap(
            result.prompt_scores,
            [f"{p}: {t}" for p, t in zip(result.prompt_positions, result.prompt_tokens)],
            [f"-> {t}" for t in result.answer_tokens],
            [result.prompt_tokens] * result.n_answer,
            "prompt",
            {"y": 0.0, "yanchor": "bottom", "len": 0.6},
            "prompt token %{x}<br>%{y}<br>grad × input %{z:.3g}<extra></extra>",
        ),
        row=2,
        col=1,
    )
    fig.update_yaxes(autorange="reversed", row=2, col=1)
    fig.update_xaxes(showticklabels=False)
    title = f"{result.trace.meta.question}  ->  {result.trace.meta.answer}" + _noise_tag(result, None, "gxi")
    fig.update_layout(
        template="simple_white",
        height=300 + 50 * result.n_answer,
        title=title,
        margin={"l": 80, "r": 30, "t": 80, "b": 20},
    )
    return fig


def _signed_heatmap(z, x: list[str], y: list[str], text, scale: str, bar: dict, hover: str) -> go.Heatmap:
    """A heatmap of signed scores, centred on zero, each cell labelled with its token and with its own
    colour bar (`bar` places it) titled by `scale_title`."""
    from cliviz.analyses.heatmaps import DIVERGING

    zmax = _abs_max(z)
    return go.Heatmap(
        z=z, x=x, y=y, text=text, texttemplate="%{text}", colorscale=DIVERGING, zmid=0, zmin=-zmax, zmax=zmax,
        colorbar={"title": {"text": scale_title(scale, zmax), "side": "right"}, **bar}, hovertemplate=hover,
    )  # fmt: skip


def _noise_tag(result: AttributionResult, step: int | None, kind: str = "cells") -> str:
    """A title suffix when the shown map cannot be read, judged per answer token: `kind="cells"`
    (the gate-cell map: its method decides), `"gxi"` (patches, prompt tokens: saturation decides).
    For `step=None` (summed over tokens) only when every token's map is unreadable."""
    steps = range(result.n_answer) if step is None else [result._step(step)]
    if kind == "cells":
        bad = [s for s in steps if result.cells_unreliable(s)]
        if bad and len(bad) == len(steps):
            return " — saturated: noise" if result.method == "gxi" else " — IG incomplete or empty: unreliable"
        return ""
    saturated = set(result.saturated_steps())
    return " — saturated: noise" if steps and all(s in saturated for s in steps) else ""


def cell_heatmap_figure(result: AttributionResult, step: int | None = 0) -> go.Figure:
    """(LLM layer x vision layer) gate-cell attributions of one answer token (None: summed over tokens)."""
    from cliviz.analyses.heatmaps import DIVERGING, heatmap_figure

    if step is None:
        m, what = result.gate_cells.sum(axis=0), "all answer tokens"
    else:
        s = result._step(step)
        m, what = result.gate_cells[s], f"answer token {s} {result.answer_tokens[s]!r}"
    zmax = _abs_max(m)
    title = f"gate cells, {what} ({result.method}, {result.target})" + _noise_tag(result, step, "cells")
    fig = heatmap_figure(
        m,
        result.vision_layers,
        result.injection_layers,
        title=title,
        colorscale=DIVERGING,
        zmid=0.0,
        zmin=-zmax,
        zmax=zmax,
        colorbar_title=scale_title(result.method, zmax),
    )
    fig.update_traces(hovertemplate="LLM layer %{y}<br>vision layer %{x}<br>attribution %{z:.3g}<extra></extra>")
    return fig


def patch_overlay_figure(
    result: AttributionResult,
    image: Image.Image,
    step: int = 0,
    layer: int | None = None,
    display_size: int = 256,
    max_alpha: float = 0.85,
) -> go.Figure:
    """The image with a semi-transparent diverging heatmap of the patch attributions on top
    (RdBu_r, red > 0 > blue, opacity growing with |value| up to `max_alpha`, so the image shows
    through where a patch did not matter). `layer`: a real vision-layer index (one of
    `vision_layers`), or None for the combined map."""
    s = result._step(step)
    if layer is None:
        grid, what = result.combined[s], "all vision layers"
    else:
        if layer not in result.vision_layers:
            raise ValueError(f"vision layer {layer} not in {result.vision_layers}")
        grid, what = result.patches[s, result.vision_layers.index(layer)], f"vision layer {layer}"
    rows, cols = result.patch_grid
    grid = np.asarray(grid, dtype=float).reshape(rows, cols)
    shown = image.convert("RGB").resize((display_size, display_size), Image.Resampling.NEAREST)
    cw, ch = display_size / cols, display_size / rows
    fig = go.Figure(go.Image(z=np.asarray(shown), hoverinfo="skip"))
    zmax = _abs_max(grid)
    fig.add_trace(
        go.Heatmap(
            z=grid,
            x=(np.arange(cols) + 0.5) * cw,
            y=(np.arange(rows) + 0.5) * ch,
            colorscale=overlay_colorscale(max_alpha),
            zmid=0,
            zmin=-zmax,
            zmax=zmax,
            colorbar={
                "title": {"text": scale_title(f"gxi, {result.target}", zmax), "side": "right"},
                "thickness": 14,
            },
            customdata=np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), axis=-1),
            hovertemplate="patch row %{customdata[0]}, col %{customdata[1]}<br>%{z:.3g}<extra></extra>",
        )
    )
    fig.update_xaxes(visible=False, range=[0, display_size])
    fig.update_yaxes(visible=False, range=[display_size, 0], scaleanchor="x")
    fig.update_layout(
        template="simple_white",
        width=display_size + 180,
        height=display_size + 80,
        title=f"patches -> {result.answer_tokens[s]!r}, {what}" + _noise_tag(result, s, "gxi"),
        margin={"l": 10, "r": 40, "t": 40, "b": 10},
    )
    return fig


def _abs_max(values: np.ndarray) -> float:
    """Largest finite |value|: the half-width of a symmetric colour scale (a tiny one when all are 0)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    top = float(np.abs(finite).max()) if finite.size else 0.0
    return top if top > 0 else _ZERO_SCALE


_ZERO_SCALE = 1e-30


def scale_title(label: str, zmax: float) -> str:
    """Colour-bar title that states the absolute range, so a rescaled map of noise says how small it is."""
    return f"{label}<br>±{zmax:.2g}" if zmax > _ZERO_SCALE else f"{label}<br>all 0"


def overlay_colorscale(max_alpha: float = 0.85) -> list[list]:
    """RdBu_r (DIVERGING) with opacity growing with |value|: zero is fully transparent, so the image
    shows through wherever a patch did not matter."""
    import plotly.colors

    colors = plotly.colors.diverging.RdBu_r
    n = len(colors)
    scale = []
    for i, c in enumerate(colors):
        alpha = max_alpha * abs(2 * i / (n - 1) - 1) ** 0.6
        scale.append([i / (n - 1), c.replace("rgb(", "rgba(").replace(")", f",{alpha:.3f})")])
    return scale


def write_attribution_html(result: AttributionResult, image: Image.Image, path: str | Path) -> Path:
    """A self-contained page (plotly.js inlined, opens offline): token strip, then per answer token
    the gate-cell heatmap and the patch overlay."""
    figs = [result.token_strip_figure()]
    for s in range(result.n_answer):
        figs.append(result.cell_heatmap_figure(s))
        figs.append(result.patch_overlay_figure(image, s))
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figs)]
    meta = result.trace.meta
    lines = [result.description(), *result.completeness_lines()]
    if result.method == "gxi":
        lines.append("gradient × input has no completeness property; use method ig for an exact accounting.")
    notes = "".join(f"<p style='margin:2px 0'>{html_lib.escape(line)}</p>" for line in lines)
    warns = "".join(f"<p style='margin:2px 0;color:#D55E00'><b>{html_lib.escape(w)}</b></p>" for w in result.warnings())
    head = (
        f"<h2>{html_lib.escape(meta.question)} &rarr; {html_lib.escape(meta.answer)}</h2>"
        f"<p>model {html_lib.escape(meta.model)} ({html_lib.escape(meta.fusion)}).</p>{warns}{notes}"
    )
    body = [head, parts[0]]
    for s in range(result.n_answer):
        body.append(
            f"<h3>answer token {s}: {html_lib.escape(result.answer_tokens[s])}</h3>"
            f"<div style='display:flex;flex-wrap:wrap;gap:16px'><div>{parts[1 + 2 * s]}</div>"
            f"<div>{parts[2 + 2 * s]}</div></div>"
        )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>cliviz attribution</title></head>"
        "<body style='font-family:sans-serif'>" + "".join(body) + "</body></html>"
    )
    p = Path(path)
    p.write_text(page, encoding="utf-8")
    return p

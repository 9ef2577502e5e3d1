"""Vision-layer x LLM-layer gate maps: the plotly figures drawn from the reductions in
`cliviz.analyses.reductions` (re-exported here: `gate_rows`, `mean_gate_matrix`, ...).

The same builders serve the command line, the dashboard and `cliviz figures`, and stay readable at
real shapes (31 x 25 LLaVA-1.5-7B, 27 x 27 OneVision-7B, 256-step answers): tick labels thin out
when they would overlap, a long answer's steps move to a slider, and per-layer panels (the
trajectory figure) show at most `MAX_LAYER_PANELS` LLM layers, evenly spaced (the first and last
included), with every layer in the numbers behind them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from cliviz.analyses.reductions import (
    SET_SELECTIONS,
    GateRows,
    TracesLike,
    as_traceset,
    check_same_layers,
    content_steps,
    gate_difference,
    gate_entropy,
    gate_matrix,
    gate_matrix_frame,
    gate_rows,
    group_counts,
    grouped_gate_matrices,
    is_special_token,
    mean_gate_matrix,
    positions_for,
    selection_note,
)
from cliviz.errors import CLIVizError
from cliviz.tracing.schema import PYTHON_CHECK_HINT, Trace
from cliviz.tracing.traceset import TraceSet

__all__ = [  # the reductions, re-exported for the callers that know them from here
    "SET_SELECTIONS",
    "GateRows",
    "TracesLike",
    "as_traceset",
    "check_same_layers",
    "content_steps",
    "gate_difference",
    "gate_entropy",
    "gate_matrix",
    "gate_matrix_frame",
    "gate_rows",
    "group_counts",
    "grouped_gate_matrices",
    "is_special_token",
    "mean_gate_matrix",
    "positions_for",
    "selection_note",
    "heatmap_figure",
    "with_notes",
    "trace_notes",
    "trace_heatmap_figure",
    "token_heatmap_figure",
    "write_trace_html",
    "traceset_notes",
    "traceset_heatmap_figure",
    "grouped_heatmap_figure",
    "difference_figure",
    "trajectory_frame",
    "trajectory_figure",
    "layer_panels",
    "wrap_html",
    "MAX_LAYER_PANELS",
]

SEQUENTIAL = "Cividis"  # colour-blind-safe sequential scale
DIVERGING = "RdBu_r"  # ColorBrewer RdBu (colour-blind safe), reversed: blue < 0 < red, white at 0
# Okabe-Ito, reordered so the first colours are the most distinct on white (yellow late).
QUALITATIVE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
MARKERS = ("circle", "square", "diamond", "triangle-up", "x", "triangle-down", "star", "cross")
MAX_LAYER_PANELS = 8  # per-LLM-layer panels drawn at most (evenly spaced); the CSV keeps every layer


def heatmap_figure(
    matrix: np.ndarray,
    vision_layers: list[int],
    injection_layers: list[int],
    title: str | None = None,
    zmax: float | None = None,
    colorscale: str = SEQUENTIAL,
    zmid: float | None = None,
    zmin: float | None = None,
    colorbar_title: str = "gate",
) -> go.Figure:
    """Heatmap with the model's real layer indices on the axes (LLM layer rows, vision columns).
    `zmin` defaults to 0 (gates), or to the data when `zmid` is given (diverging maps)."""
    fig = go.Figure(
        go.Heatmap(
            z=np.asarray(matrix, dtype=float),
            x=[f"V{k}" for k in vision_layers],
            y=[f"L{i}" for i in injection_layers],
            colorscale=colorscale,
            zmin=zmin if zmin is not None else (None if zmid is not None else 0.0),
            zmax=zmax,
            zmid=zmid,
            colorbar={"title": {"text": colorbar_title}},
            hovertemplate="LLM layer %{y}<br>vision layer %{x}<br>gate %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title="vision layer (hidden_states index)",
        yaxis_title="LLM layer",
        yaxis={"autorange": "reversed"},
        margin={"l": 60, "r": 20, "t": 40 if title else 10, "b": 50},
        template="simple_white",
    )
    return fig


def _short(text: str, n: int) -> str:
    """`text` cut to `n` characters with an ellipsis (a 256-token answer does not fit a title)."""
    return text if len(text) <= n else text[: n - 1] + "…"


def wrap_html(text: str, width: int) -> tuple[str, int]:
    """`text` wrapped at `width` characters with <br> (plotly titles do not wrap): (html, lines)."""
    import textwrap

    lines = textwrap.wrap(text, max(width, 20)) or [""]
    return "<br>".join(lines), len(lines)


def with_notes(fig: go.Figure, notes: list[str], width: int = 110) -> go.Figure:
    """Put the map's notes (its kind, its causal check) under the title, wrapped, and make room."""
    import textwrap

    if not notes:
        return fig
    lines = [part for note in notes for part in textwrap.wrap(note, width)]
    title = fig.layout.title.text or ""
    fig.update_layout(
        title={"text": title, "subtitle": {"text": "<br>".join(lines), "font": {"size": 11}}},
        margin={"t": 50 + 15 * len(lines) + (20 if title else 0)},
    )
    return fig


def trace_notes(trace: Trace, how_to_check: str = PYTHON_CHECK_HINT) -> list[str]:
    """The notes every map of one trace carries: the untrained-gates warning when it applies (the one
    rule of `analyses.untrained`), then the fusion's kind of map and the causal check. `how_to_check`
    says how to record a missing check in the reader's terms (the Python keyword, or a command's flag)."""
    from cliviz.analyses.untrained import untrained_note

    untrained = untrained_note(trace)
    return ([untrained] if untrained else []) + trace.map_notes(how_to_check)


def trace_heatmap_figure(
    trace: Trace, token: int | None = None, role: str | None = None, *, include_special: bool = False
) -> go.Figure:
    """The gate map of one trace with its notes: answer step `token`, a token `role` (answer,
    image, prompt, all), or by default the mean over the answer steps that emitted content tokens
    (`include_special=True` adds `<eos>` and the like). What `Trace.heatmap` returns."""
    if token is not None and role is not None:
        raise CLIVizError("give an answer step (token=) or a role (role=), not both")
    if not trace.has_gates:
        raise CLIVizError(f"this trace has no gates (fusion={trace.meta.fusion}): there is no gate map to draw")
    n = len(trace.answer_texts)
    if token is not None:
        if not isinstance(token, (int, np.integer)) or not -n <= token < n:
            raise CLIVizError(f"answer step {token!r} outside 0..{n - 1}")
        step = int(token) % n
        select: str | int = int(trace.answer_positions[step])
        what = f"answer token {step} ({trace.answer_texts[step]!r})"
    else:
        select = role or "answer"
        if select not in SET_SELECTIONS:
            raise CLIVizError(f"unknown role {select!r}; use one of {', '.join(SET_SELECTIONS)}")
        if select == "answer":
            used = len(content_steps(trace, include_special)) or n
            what = f"{selection_note('answer', include_special)}: {used} of {n} steps"
        else:
            what = selection_note(select)
    fig = heatmap_figure(
        gate_matrix(trace, select, include_special),
        trace.meta.vision_layers,
        trace.meta.injection_layers,
        title=wrap_html(f"{_short(trace.meta.question, 100)} → {_short(trace.meta.answer, 60)}: gates, {what}", 90)[0],
        zmax=1.0,
    )
    return with_notes(fig, [f"model {trace.meta.model}", *trace_notes(trace)])


DROPDOWN_STEPS = 24  # answers up to this many steps list each step in the dropdown; longer ones get a slider


def token_heatmap_figure(trace: Trace, how_to_check: str = PYTHON_CHECK_HINT) -> go.Figure:
    """One heatmap with a dropdown over selections: all answer steps, each step, image, prompt.

    The dropdown sits at the top left, above the plot, so that it never covers plotly's toolbar
    (top right); the map's notes (kind, causal check) are the subtitle. A long answer (a real
    checkpoint's sentences, up to 1,024 tokens) keeps the dropdown for the aggregates and moves its
    steps to a slider under the plot, which stays usable at any length."""
    steps = [(f"step {s}: -> {trace.answer_texts[s]!r}", int(pos)) for s, pos in enumerate(trace.answer_positions)]
    aggregates: list[tuple[str, str | int]] = [
        ("image tokens", "image"),
        ("prompt tokens", "prompt"),
        ("all tokens", "all"),
    ]
    if trace.gate_positions is not None:  # a compact trace: only the selections it kept
        aggregates = [(label, sel) for label, sel in aggregates if _kept(trace, str(sel))]
    long_answer = len(steps) > DROPDOWN_STEPS
    options = [("answer (content tokens)", "answer")] + ([] if long_answer else steps) + aggregates
    mats = [gate_matrix(trace, sel) for _, sel in options]
    fig = heatmap_figure(
        mats[0],
        trace.meta.vision_layers,
        trace.meta.injection_layers,
        zmax=1.0,
        title=wrap_html(f"{_short(trace.meta.question, 100)}  ->  {_short(trace.meta.answer, 80)}", 90)[0],
    )
    with_notes(fig, [f"model {trace.meta.model}; {selection_note('answer')}", *trace_notes(trace, how_to_check)])
    fig.update_layout(
        title={"yref": "container", "y": 1.0, "yanchor": "top", "pad": {"t": 12}},  # title and notes on top,
        updatemenus=[
            {  # then the dropdown right above the plot
                "buttons": [
                    {"label": label, "method": "restyle", "args": [{"z": [m.tolist()]}]}
                    for (label, _), m in zip(options, mats)
                ],
                "direction": "down",
                "x": 0.0,
                "xanchor": "left",
                "y": 1.0,
                "yanchor": "bottom",
                "pad": {"b": 6},
            }
        ],
        margin={"t": (fig.layout.margin.t or 40) + 40},
    )
    if long_answer:
        fig.update_layout(
            sliders=[
                {  # tick labels hidden (hundreds would overlap); the current value names the step
                    "active": 0,
                    "currentvalue": {"prefix": "answer ", "font": {"size": 12, "color": "#333"}},
                    "pad": {"t": 40},
                    "font": {"color": "rgba(0,0,0,0)"},
                    "ticklen": 0,
                    "steps": [
                        {"label": label, "method": "restyle", "args": [{"z": [gate_matrix(trace, pos).tolist()]}]}
                        for label, pos in steps
                    ],
                }
            ]
        )
    return fig


def _kept(trace: Trace, select: str) -> bool:
    try:
        trace.gate_columns(positions_for(trace, select))
        return True
    except CLIVizError:
        return False


def write_trace_html(trace: Trace, path, how_to_check: str = PYTHON_CHECK_HINT) -> None:
    """Self-contained interactive page (plotly.js inlined: opens offline), with the map's notes."""
    if not trace.has_gates:
        raise ValueError("this model has no gates (projector fusion): nothing to draw")
    token_heatmap_figure(trace, how_to_check).write_html(str(path), include_plotlyjs=True, full_html=True)


def traceset_notes(ts: TraceSet) -> list[str]:
    """The notes of a trace set's mean map: its model(s) and size, the fusion's kind of map and the
    causal checks it holds (meta columns only: cheap for a set on disk)."""
    from cliviz.tracing.causal import NEGLIGIBLE_NATS, map_kind_note

    meta = ts.meta_frame()
    models = list(dict.fromkeys(meta["model"]))
    shown = ", ".join(models[:3]) + (f" and {len(models) - 3} more" if len(models) > 3 else "")
    notes = [f"{'models' if len(models) > 1 else 'model'} {shown}; {len(meta)} traces"]
    fusions = sorted(set(meta["fusion"]))
    if len(fusions) == 1 and map_kind_note(fusions[0]):
        notes.append(map_kind_note(fusions[0]))
    measured = meta.dropna(subset=["injection_off_changed", "injection_off_delta_logprob"])
    if len(measured):
        flips = measured["injection_off_changed"].astype(bool)
        delta = measured["injection_off_delta_logprob"].astype(float)
        line = (
            f"injection off (all layers) changes the answer in {int(flips.sum())} of {len(measured)} traces; "
            f"median Δ log-prob {delta.median():+.3f}"
        )
        if not flips.any() and (delta.abs() < NEGLIGIBLE_NATS).all():
            line += " — the injection does not matter for these answers: this map shows routing, not importance"
        notes.append(line + ".")
    else:
        notes.append("causal check not recorded in these traces (`cliviz trace` records it; sweeps do not).")
    return notes


def traceset_heatmap_figure(
    traces: TracesLike, select: str = "answer", by: str | None = None, *, include_special: bool = False
) -> go.Figure:
    """Mean gate map of a trace set (or one panel per `by` group, e.g. `qtype`) with its notes.
    What `TraceSet.heatmap` returns. It streams over the set (`summary.summarize`: memory bounded by
    the shapes, whatever the number of traces)."""
    from cliviz.analyses.summary import summarize

    ts = as_traceset(traces)
    if select not in SET_SELECTIONS:
        raise CLIVizError(f"unknown selection {select!r}; use one of {', '.join(SET_SELECTIONS)}")
    summary = summarize(ts, select=select, include_special=include_special, pool=True, variance=False)
    rows = summary.rows
    n = len(np.unique(rows.trace))
    what = selection_note(select, include_special)
    if by is None:
        fig = heatmap_figure(
            mean_gate_matrix(rows, select),
            rows.vision_layers,
            rows.injection_layers,
            zmax=1.0,
            title=f"{what}, {n} traces",
        )
    else:
        fig = grouped_heatmap_figure(
            grouped_gate_matrices(rows, select, by),
            rows.vision_layers,
            rows.injection_layers,
            counts=group_counts(rows, select, by),
            title=f"{what}, by {by}",
        )
    untrained = summary.untrained_note
    return with_notes(fig, ([untrained] if untrained else []) + traceset_notes(ts))


# ---------------------------------------------------------------------------- trace-set figures


def grouped_heatmap_figure(
    matrices: Mapping[str, np.ndarray],
    vision_layers: list[int],
    injection_layers: list[int],
    *,
    cols: int | None = None,
    zmax: float | None = None,
    colorscale: str = SEQUENTIAL,
    counts: Mapping[str, int] | None = None,
    title: str | None = None,
    colorbar_title: str = "gate",
) -> go.Figure:
    """Small multiples, one heatmap per group, one shared colour scale (0..max over all panels)."""
    from plotly.subplots import make_subplots

    if not matrices:
        raise CLIVizError("no groups to draw")
    names = list(matrices)
    cols = cols or min(len(names), 3)
    rows = -(-len(names) // cols)
    labels = [f"{g} (n={counts[g]})" if counts and g in counts else g for g in names]
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=labels,
        shared_xaxes=True,
        shared_yaxes=True,
        horizontal_spacing=0.04 if cols > 1 else 0.0,
        vertical_spacing=min(0.12, 0.5 / (rows - 1)) if rows > 1 else 0.0,  # plotly needs < 1 / (rows - 1)
    )
    hi = zmax if zmax is not None else max(float(np.max(m)) for m in matrices.values())
    x = [f"V{k}" for k in vision_layers]
    y = [f"L{i}" for i in injection_layers]
    for j, g in enumerate(names):
        fig.add_trace(
            go.Heatmap(
                z=np.asarray(matrices[g], dtype=float),
                x=x,
                y=y,
                coloraxis="coloraxis",
                hovertemplate=f"{g}<br>LLM layer %{{y}}<br>vision layer %{{x}}<br>gate %{{z:.3f}}<extra></extra>",
            ),
            row=j // cols + 1,
            col=j % cols + 1,
        )
    fig.update_layout(
        coloraxis={"colorscale": colorscale, "cmin": 0.0, "cmax": hi, "colorbar": {"title": {"text": colorbar_title}}},
        template="simple_white",
        title=title,
    )
    fig.update_yaxes(autorange="reversed")
    # Every column's lowest panel carries the x tick labels (the shared axes hide them above it): with
    # a short last row, the columns it leaves empty end a row higher. A full last row gets one centred
    # "vision layer" title; a short one gets it under every column, so no column is left unlabelled.
    lowest = {c: max(r for r in range(1, rows + 1) if (r - 1) * cols + c <= len(names)) for c in range(1, cols + 1)}
    full = all(r == rows for r in lowest.values())
    for c, r in lowest.items():
        title = "vision layer" if (not full or c == (cols + 1) // 2) else None
        fig.update_xaxes(showticklabels=True, title_text=title, row=r, col=c)
    fig.update_yaxes(title_text="LLM layer", col=1)
    fig.update_annotations(font={"size": 10})
    return fig


def difference_figure(
    diff: np.ndarray,
    vision_layers: list[int],
    injection_layers: list[int],
    *,
    label: str = "Δ gate",
    title: str | None = None,
    zmax: float | None = None,
) -> go.Figure:
    """Diverging heatmap of a gate difference, centred at 0 with a symmetric range."""
    m = float(zmax if zmax is not None else np.max(np.abs(diff)))
    m = m if m > 0 else 1e-6
    return heatmap_figure(
        diff,
        vision_layers,
        injection_layers,
        title=title,
        zmax=m,
        zmin=-m,
        colorscale=DIVERGING,
        zmid=0.0,
        colorbar_title=label,
    )


def trajectory_frame(trace: Trace, llm_layer: int | None = None) -> pd.DataFrame:
    """Tidy gate trajectories of one trace: one row per (llm_layer, answer step, vision_layer);
    `token` is the answer token that step produced, `position` the input position it was read at."""
    if not trace.has_gates:
        raise CLIVizError("this trace has no gates (projector fusion): no trajectory to draw")
    layers = list(trace.meta.injection_layers)
    if llm_layer is None:
        which = list(range(len(layers)))
    elif llm_layer in layers:
        which = [layers.index(llm_layer)]
    else:
        raise CLIVizError(f"LLM layer {llm_layer} takes no injection in this model; injection layers: {layers}")
    ag = trace.answer_gates()  # [L, S, K]
    S, K = ag.shape[1], ag.shape[2]
    frames = []
    for li in which:
        frames.append(
            pd.DataFrame(
                {
                    "llm_layer": layers[li],
                    "step": np.repeat(np.arange(S), K),
                    "position": np.repeat(np.asarray(trace.answer_positions, dtype=np.int64), K),
                    "token": np.repeat(np.array(trace.answer_texts, dtype=object), K),
                    "vision_layer": np.tile(np.asarray(trace.meta.vision_layers, dtype=np.int64), S),
                    "gate": ag[li].astype(float).ravel(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def layer_panels(layers: list[int], limit: int = MAX_LAYER_PANELS) -> list[int]:
    """At most `limit` of `layers`, evenly spaced, first and last included (all when they fit)."""
    if len(layers) <= limit:
        return list(layers)
    picks = np.unique(np.round(np.linspace(0, len(layers) - 1, limit)).astype(int))
    return [layers[i] for i in picks]


def _step_ticks(texts: list[str], max_labels: int = 12) -> tuple[list[int], list[str]]:
    """Tick positions and labels "step:token" for an answer, thinned to `max_labels` so they never overlap."""
    every = max(1, -(-len(texts) // max_labels))
    steps = list(range(0, len(texts), every))
    return steps, [f"{s}:{texts[s][:10]}" for s in steps]


def trajectory_figure(trace: Trace, llm_layer: int | None = None, *, title: str | None = None) -> go.Figure:
    """Gate per vision layer as the answer unfolds (x = answer step, labelled with the token it
    produced), for one LLM layer (real index) or, with `llm_layer=None`, one panel per LLM layer —
    at most `MAX_LAYER_PANELS`, evenly spaced, for deep models (the title says which).

    Up to 8 vision layers each get a line; more (real models: 25-27) would be a tangle of repeated
    colours, so each panel becomes a heatmap (vision layer x answer step) on one shared scale."""
    from plotly.subplots import make_subplots

    df = trajectory_frame(trace, llm_layer)
    every = list(dict.fromkeys(df.llm_layer.tolist()))
    layers = layer_panels(every)
    S = len(trace.answer_positions)
    vision = list(trace.meta.vision_layers)
    as_heatmap = len(vision) > len(QUALITATIVE)
    n = len(layers)
    fig = make_subplots(
        rows=n, cols=1, shared_xaxes=True, vertical_spacing=min(0.05, 0.3 / (n - 1)) if n > 1 else 0.0
    )  # plotly needs spacing < 1 / (rows - 1)
    for r, li in enumerate(layers):
        sub = df[df.llm_layer == li]
        if as_heatmap:
            z = sub.pivot(index="vision_layer", columns="step", values="gate").reindex(index=vision)
            fig.add_trace(
                go.Heatmap(
                    z=z.to_numpy(float),
                    x=list(range(S)),
                    y=[f"V{k}" for k in vision],
                    coloraxis="coloraxis",
                    hovertemplate=(
                        f"LLM layer {li}<br>vision layer %{{y}}<br>step %{{x}}<br>gate %{{z:.3f}}<extra></extra>"
                    ),
                ),
                row=r + 1,
                col=1,
            )
            fig.update_yaxes(title_text=f"L{li}", row=r + 1, col=1, nticks=6)
            continue
        for j, k in enumerate(vision):
            pts = sub[sub.vision_layer == k]
            fig.add_trace(
                go.Scatter(
                    x=pts.step,
                    y=pts.gate,
                    mode="lines+markers",
                    name=f"V{k}",
                    legendgroup=f"V{k}",
                    showlegend=r == 0,
                    line={"color": QUALITATIVE[j % len(QUALITATIVE)], "width": 1.5},
                    marker={"symbol": MARKERS[j % len(MARKERS)], "size": 5},
                    hovertemplate=(
                        f"LLM layer {li}<br>vision layer {k}<br>step %{{x}}<br>gate %{{y:.3f}}<extra></extra>"
                    ),
                ),
                row=r + 1,
                col=1,
            )
        fig.update_yaxes(range=[-0.02, 1.02], title_text=f"gate at L{li}", row=r + 1, col=1)
    tickvals, ticktext = _step_ticks(list(trace.answer_texts))
    fig.update_xaxes(tickvals=tickvals, ticktext=ticktext, range=[-0.5 if as_heatmap else -0.3, max(S - 1, 0) + 0.5])
    fig.update_xaxes(title_text="answer step : token", row=n, col=1)
    if len(layers) < len(every):
        note = f"LLM layers {', '.join(f'L{i}' for i in layers)} of {len(every)} (evenly spaced)"
        title = f"{title}<br><sup>{note}</sup>" if title else note
    fig.update_layout(template="simple_white", title=title, legend={"title": {"text": "vision layer"}})
    if as_heatmap:
        fig.update_layout(
            coloraxis={"colorscale": SEQUENTIAL, "cmin": 0.0, "cmax": 1.0, "colorbar": {"title": {"text": "gate"}}}
        )
    return fig

"""Vision-layer x LLM-layer gate maps and the plotly figures drawn from them.

A cell (LLM layer i, vision layer k) holds the mean gate weight that layer i gave vision layer k
over a set of token positions: the answer steps, one role, one position, or every position. Rows
sum to 1 (gates are a softmax over vision layers), so a row reads as "where layer i looked".
The same builders serve the command line, the dashboard and `cliviz figures`.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from cliviz.tracing.trace import Trace

SEQUENTIAL = "Cividis"  # colour-blind-safe sequential scale


def positions_for(trace: Trace, select: str | int = "answer") -> np.ndarray:
    """Token positions for a selection: `answer` (the steps that produced the answer),
    `image` / `prompt` (a role), `all`, or one integer position."""
    if isinstance(select, (int, np.integer)):
        if not 0 <= select < trace.n_tokens:
            raise ValueError(f"position {select} outside 0..{trace.n_tokens - 1}")
        return np.array([select])
    if select == "answer":
        return trace.answer_positions
    if select == "all":
        return np.arange(trace.n_tokens)
    if select in ("image", "prompt"):
        return np.flatnonzero(trace.role_mask(select))
    raise ValueError(f"unknown selection {select!r}; use answer, image, prompt, all or a position")


def gate_matrix(trace: Trace, select: str | int = "answer") -> np.ndarray:
    """Mean gates over the selected positions: `[n_injection_layers, K]`."""
    pos = positions_for(trace, select)
    if not trace.has_gates or len(pos) == 0:
        return np.zeros((trace.gates.shape[0], trace.gates.shape[2]), dtype=np.float32)
    return trace.gates[:, pos].mean(axis=1)  # [L, K]


def gate_entropy(gates: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each gate row, averaged over tokens: `[L, T, K] -> [L]`."""
    p = np.clip(gates, 1e-12, 1.0)
    return -(p * np.log(p)).sum(-1).mean(-1)


def heatmap_figure(
    matrix: np.ndarray,
    vision_layers: list[int],
    injection_layers: list[int],
    title: str | None = None,
    zmax: float | None = None,
    colorscale: str = SEQUENTIAL,
    zmid: float | None = None,
) -> go.Figure:
    """Heatmap with the model's real layer indices on the axes (LLM layer rows, vision columns)."""
    fig = go.Figure(
        go.Heatmap(
            z=np.asarray(matrix, dtype=float),
            x=[f"V{k}" for k in vision_layers],
            y=[f"L{i}" for i in injection_layers],
            colorscale=colorscale,
            zmin=None if zmid is not None else 0.0,
            zmax=zmax,
            zmid=zmid,
            colorbar={"title": {"text": "gate"}},
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


def token_heatmap_figure(trace: Trace) -> go.Figure:
    """One heatmap with a dropdown over selections: all answer steps, each step, image, prompt."""
    options: list[tuple[str, str | int]] = [("answer (mean)", "answer")]
    for s, pos in enumerate(trace.answer_positions):
        word = trace.answer_texts[s]
        options.append((f"step {s}: -> {word!r}", int(pos)))
    options += [("image tokens", "image"), ("prompt tokens", "prompt"), ("all tokens", "all")]
    mats = [gate_matrix(trace, sel) for _, sel in options]
    fig = heatmap_figure(mats[0], trace.meta.vision_layers, trace.meta.injection_layers, zmax=1.0)
    fig.update_layout(
        title=f"{trace.meta.question}  ->  {trace.meta.answer}",
        updatemenus=[{
            "buttons": [{"label": label, "method": "restyle", "args": [{"z": [m.tolist()]}]} for (label, _), m in zip(options, mats)],
            "direction": "down", "x": 1.0, "xanchor": "right", "y": 1.15, "yanchor": "top",
        }],
        margin={"t": 80},
    )
    return fig


def write_trace_html(trace: Trace, path) -> None:
    """Self-contained interactive page (plotly.js inlined: opens offline)."""
    if not trace.has_gates:
        raise ValueError("this model has no gates (projector fusion): nothing to draw")
    token_heatmap_figure(trace).write_html(str(path), include_plotlyjs=True, full_html=True)

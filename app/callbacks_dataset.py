"""Dataset tab: mean gate maps by question type and gate entropy per LLM layer over `--traces`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import plotly.graph_objects as go
from dash import Dash, Input, Output, html

from cliviz.app.backend import Backend
from cliviz.app.callbacks_explore import message_figure
from cliviz.errors import CLIVizError


def summary_table(backend: Backend) -> html.Table:
    """Traces per question type and, where references are stored, accuracy."""
    meta = backend.traces.meta_frame()
    meta["qtype"] = meta["qtype"].fillna("unknown")
    has_ref = meta["reference_answer"].notna()
    meta["correct"] = (meta["answer"].str.strip() == meta["reference_answer"].fillna("").str.strip()) & has_ref
    rows = []
    for qtype, group in meta.groupby("qtype", sort=True):
        refs = int(has_ref[group.index].sum())
        acc = f"{group['correct'].sum() / refs:.0%}" if refs else "—"
        rows.append(html.Tr([html.Td(str(qtype)), html.Td(str(len(group))), html.Td(acc)]))
    return html.Table(
        className="compare",
        id="dataset-table",
        children=[
            html.Thead(html.Tr([html.Th("question type"), html.Th("traces"), html.Th("accuracy")])),
            html.Tbody(rows),
        ],
    )


def entropy_figure(rows) -> go.Figure:
    """Mean per-token gate entropy per LLM layer, one line per question type plus all traces."""
    from cliviz.analyses.heatmaps import MARKERS, QUALITATIVE
    from cliviz.analyses.stats import entropy_per_layer

    fig = go.Figure()
    labels = rows.labels("qtype")
    groups = [("all traces", np.ones(len(rows), dtype=bool))] + [(g, labels == g) for g in sorted(set(labels.tolist()))]
    for j, (name, mask) in enumerate(groups):
        if not mask.any():
            continue
        sub = replace(
            rows,
            gates=rows.gates[mask],
            norms=rows.norms[mask],
            trace=rows.trace[mask],
            position=rows.position[mask],
            step=rows.step[mask],
        )
        df = entropy_per_layer(sub, rows.select)
        fig.add_trace(
            go.Scatter(
                x=[f"L{i}" for i in df.llm_layer],
                y=df.entropy,
                name=f"{name} (n={int(df.n_traces.iloc[0])})",
                mode="lines+markers",
                line={
                    "color": "#555" if j == 0 else QUALITATIVE[(j - 1) % len(QUALITATIVE)],
                    "width": 3 if j == 0 else 1.5,
                    "dash": "solid",
                },
                marker={"symbol": MARKERS[j % len(MARKERS)], "size": 7},
                hovertemplate=f"{name}<br>LLM layer %{{x}}<br>entropy %{{y:.3f}} nats<extra></extra>",
            )
        )
    log_k = float(np.log(rows.K))
    fig.add_hline(
        y=log_k,
        line_dash="dash",
        line_color="#999",
        annotation_text=f"log K = {log_k:.2f}",
        annotation_position="top left",
    )
    fig.update_layout(
        template="simple_white",
        xaxis_title="LLM layer",
        yaxis_title="gate entropy (nats)",
        yaxis={"range": [0, log_k * 1.1]},
        height=340,
        legend={"title": {"text": "question type"}},
        margin={"l": 60, "r": 20, "t": 20, "b": 50},
    )
    return fig


def render_dataset(backend: Backend, select: str | None) -> tuple[Any, Any, Any, str]:
    """(grouped heatmaps, entropy figure, summary, message) for one token selection."""
    from cliviz.analyses.heatmaps import group_counts, grouped_gate_matrices, grouped_heatmap_figure

    select = select if select in ("answer", "image", "prompt", "all") else "answer"
    try:
        rows = backend.dataset_view(select)
        mats = grouped_gate_matrices(rows, select)
        counts = group_counts(rows, select)
        heat = grouped_heatmap_figure(
            mats,
            rows.vision_layers,
            rows.injection_layers,
            counts=counts,
            title=f"mean gates at {select} positions, by question type",
        )
        heat.update_layout(height=230 * (-(-len(mats) // 3)) + 90, margin={"t": 80, "l": 70, "r": 20, "b": 50})
        entropy = entropy_figure(rows)
    except CLIVizError as err:
        blank = message_figure(str(err))
        return blank, blank, "", str(err)
    return heat, entropy, summary_table(backend), ""


def register(app: Dash, backend: Backend) -> None:
    if backend.traces is None:
        return

    @app.callback(
        Output("dataset-heatmaps", "figure"),
        Output("dataset-entropy", "figure"),
        Output("dataset-summary", "children"),
        Output("dataset-message", "children"),
        Input("dataset-select", "value"),
    )
    def on_select(select):
        return render_dataset(backend, select)

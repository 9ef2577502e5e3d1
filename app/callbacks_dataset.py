"""Dataset tab: mean gate maps by question type and gate entropy per LLM layer over `--traces`."""

from __future__ import annotations

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


def entropy_figure(summary) -> go.Figure:
    """Mean per-token gate entropy per LLM layer, one line per question type plus all traces (from the
    streamed per-trace sums of `analyses.summary`)."""
    from cliviz.analyses.heatmaps import MARKERS, QUALITATIVE

    rows = summary.rows
    fig = go.Figure()
    labels = rows.labels("qtype")
    groups = [("all traces", np.ones(len(rows), dtype=bool))] + [(g, labels == g) for g in sorted(set(labels.tolist()))]
    x = [f"L{i}" for i in rows.injection_layers]
    for j, (name, mask) in enumerate(groups):
        if not mask.any():
            continue
        mean, _, _, n_traces = summary.entropy_by(mask)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=mean,
                name=f"{name} (n={n_traces})",
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


def dataset_summary(backend: Backend, select: str):
    """The set's one-pass summary for `select`, computed once per selection and kept (read-only, the
    same for every user): the tab then redraws in milliseconds whatever the size of the set."""
    from cliviz.analyses.summary import summarize

    cache = backend.__dict__.setdefault("_dataset_summaries", {})
    if select not in cache:
        if backend.traces is None:
            raise CLIVizError("no trace set loaded: start with `cliviz dash --traces FILE.parquet`")
        cache[select] = summarize(backend.traces, select=select, pool=True, variance=False)
    return cache[select]


def render_dataset(backend: Backend, select: str | None) -> tuple[Any, Any, Any, str]:
    """(grouped heatmaps, entropy figure, summary, message) for one token selection."""
    from cliviz.analyses.heatmaps import group_counts, grouped_gate_matrices, grouped_heatmap_figure, wrap_html

    select = select if select in ("answer", "image", "prompt", "all") else "answer"
    try:
        summary = dataset_summary(backend, select)
        rows = summary.rows
        mats = grouped_gate_matrices(rows, select)
        counts = group_counts(rows, select)
        note, _ = wrap_html(summary.note, 110)
        title = f"mean gates at {select} positions, by question type<br><sup>{note}</sup>"
        heat = grouped_heatmap_figure(mats, rows.vision_layers, rows.injection_layers, counts=counts, title=title)
        panel = max(230, 60 + 14 * len(rows.injection_layers))  # room for every LLM layer label
        heat.update_layout(height=panel * (-(-len(mats) // 3)) + 90, margin={"t": 80, "l": 70, "r": 20, "b": 50})
        entropy = entropy_figure(summary)
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

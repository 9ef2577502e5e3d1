"""Dataset tab: mean gate maps by question type and gate entropy per LLM layer over `--traces`."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
from dash import Dash, Input, Output, html

from cliviz.app.backend import Backend
from cliviz.app.callbacks_explore import message_figure
from cliviz.errors import CLIVizError


def accuracy_cells(correct: int, refs: int) -> list[html.Td]:
    """Accuracy as `k/n = 0.xx` and its 95% Wilson interval (`cliviz.intervals`), as `cliviz eval` and
    `cliviz compare` print them: a few questions per type leave a wide interval, and it shows."""
    from cliviz.intervals import format_interval, wilson_interval

    if not refs:
        return [html.Td("—"), html.Td("—")]
    return [
        html.Td(f"{correct}/{refs} = {correct / refs:.2f}"),
        html.Td(format_interval(*wilson_interval(correct, refs))),
    ]


def summary_table(backend: Backend) -> html.Table:
    """Traces per question type and, where references are stored, accuracy with its 95% Wilson
    interval; the whole set in the footer."""
    meta = backend.traces.meta_frame()
    meta["qtype"] = meta["qtype"].fillna("unknown")
    has_ref = meta["reference_answer"].notna()
    meta["correct"] = (meta["answer"].str.strip() == meta["reference_answer"].fillna("").str.strip()) & has_ref
    rows = []
    for qtype, group in meta.groupby("qtype", sort=True):
        refs = int(has_ref[group.index].sum())
        cells = accuracy_cells(int(group["correct"].sum()), refs)
        rows.append(html.Tr([html.Td(str(qtype)), html.Td(str(len(group))), *cells]))
    total = html.Tr(
        [html.Th("all types"), html.Th(str(len(meta))), *accuracy_cells(int(meta["correct"].sum()), int(has_ref.sum()))]
    )
    return html.Table(
        className="compare",
        id="dataset-table",
        title="accuracy: exact answer match with the stored reference; 95% CI: Wilson interval",
        children=[
            html.Thead(html.Tr([html.Th("question type"), html.Th("traces"), html.Th("accuracy"), html.Th("95% CI")])),
            html.Tbody(rows),
            html.Tfoot(total, id="dataset-total"),
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
    palette = [c for c in QUALITATIVE if c != "#000000"]  # "all traces" (#555) stays the only dark line
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
                    "color": "#555" if j == 0 else palette[(j - 1) % len(palette)],
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
    untrained = summary.untrained_note  # also in the maps' title (summary.note); said first here too
    warning = [html.Div(untrained, id="dataset-untrained", className="warning")] if untrained else []
    return heat, entropy, [*warning, summary_table(backend)], ""


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

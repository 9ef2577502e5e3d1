"""Dataset tab: gate maps and statistics over the trace set given with `--traces`."""

from __future__ import annotations

from dash import dcc, html

from cliviz.app.backend import Backend
from cliviz.app.layout_explore import GRAPH_CONFIG

SELECTIONS = [
    ("answer", "answer steps"),
    ("prompt", "question tokens"),
    ("image", "image tokens"),
    ("all", "all tokens"),
]


def dataset_layout(backend: Backend) -> html.Div:
    if backend.traces is None:
        return html.Div(
            className="card dataset",
            children=[
                html.H3("No trace set loaded"),
                html.P(
                    [
                        "Start the dashboard with ",
                        html.Code("cliviz dash --traces FILE.parquet"),
                        " (written by ",
                        html.Code("cliviz sweep"),
                        " or ",
                        html.Code("cliviz trace --out"),
                        ").",
                    ]
                ),
            ],
            id="dataset-empty",
        )
    return html.Div(
        className="dataset",
        children=[
            html.Div(
                className="row",
                children=[
                    html.Div(
                        className="card",
                        children=[
                            html.H3(f"Trace set: {backend.traces_label}"),
                            html.Div(
                                className="controls",
                                children=[
                                    html.Span("Gates at:", className="hint"),
                                    dcc.RadioItems(
                                        id="dataset-select",
                                        options=[{"value": v, "label": lab} for v, lab in SELECTIONS],
                                        value="answer",
                                        inline=True,
                                        className="radio",
                                    ),
                                ],
                            ),
                            html.Div(id="dataset-message", className="message", role="alert"),
                            dcc.Loading(type="dot", children=html.Div(id="dataset-summary", className="summary")),
                        ],
                    ),
                    html.Div(
                        className="card",
                        children=[
                            html.H3("Gate entropy per LLM layer"),
                            html.P(
                                "0 = each token reads one vision layer; the dashed line (log K) = uniform mixing.",
                                className="hint",
                            ),
                            dcc.Loading(
                                type="circle",
                                children=dcc.Graph(id="dataset-entropy", config=GRAPH_CONFIG, className="graph"),
                            ),
                        ],
                    ),
                ],
            ),
            html.Div(
                className="card",
                children=[
                    html.H3("Mean gates by question type"),
                    dcc.Loading(
                        type="circle", children=dcc.Graph(id="dataset-heatmaps", config=GRAPH_CONFIG, className="graph")
                    ),
                ],
            ),
        ],
    )

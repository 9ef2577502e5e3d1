"""Explore tab: image + question in, answer, token strip, gate heatmap, attributions, ablation out."""

from __future__ import annotations

import base64

from dash import dcc, html

from cliviz.app.backend import Backend
from cliviz.app.state import MAX_UPLOAD_BYTES

GRAPH_CONFIG = {"displaylogo": False, "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d"]}
ABLATION_KINDS = [  # (value, label): the single-cell interventions of `analyses.ablations.single_cell`
    ("knockout", "knock out the cell (renormalise the rest)"),
    ("zero", "zero the cell"),
    ("onehot", "read only this vision layer"),
    ("uniform", "uniform gates in this LLM layer"),
    ("injection_off", "no injection in this LLM layer"),
]


def _example_button(name: str, data: bytes, qtype: str | None) -> html.Button:
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return html.Button(
        [html.Img(src=src, alt=name), html.Span(qtype or name)],
        id={"type": "example", "name": name},
        className="example",
        title=f"use the {name} example",
        n_clicks=0,
    )


def image_panel(backend: Backend) -> html.Div:
    examples = [_example_button(e.name, e.data, e.qtype) for e in backend.examples.values()]
    return html.Div(
        className="card input-card",
        children=[
            html.H3("1. Image"),
            dcc.Upload(
                id="upload",
                accept="image/*",
                multiple=False,
                className="upload",
                children=html.Div(
                    [
                        "Drop an image here or ",
                        html.A("choose a file"),
                        html.Div(f"PNG, JPEG, ... up to {MAX_UPLOAD_BYTES // (1024 * 1024)} MB", className="hint"),
                    ]
                ),
            ),
            html.Div(className="examples", children=[html.Div("or pick an example:", className="hint"), *examples]),
            html.Div(id="upload-message", className="message", role="alert"),
            html.Figure(
                className="preview",
                children=[
                    html.Img(id="image-preview", alt="chosen image"),
                    html.Figcaption(id="image-name", className="hint"),
                ],
            ),
            html.H3("2. Question"),
            dcc.Input(
                id="question",
                type="text",
                placeholder="e.g. what color is the triangle ?",
                debounce=False,
                className="question",
                maxLength=400,
                n_submit=0,
            ),
            html.Button("Ask", id="ask", className="primary", n_clicks=0),
            html.Div(id="ask-message", className="message", role="alert"),
        ],
    )


def answer_panel() -> html.Div:
    return html.Div(
        className="card answer-card",
        children=[
            html.H3("Answer"),
            dcc.Loading(
                type="dot",
                children=html.Div(
                    id="answer-panel",
                    className="answer-panel",
                    children=html.P("Choose an image, type a question and press Ask.", className="hint"),
                ),
            ),
        ],
    )


def heatmap_panel() -> html.Div:
    return html.Div(
        className="card",
        children=[
            html.H3("Gates: which vision layer each LLM layer reads"),
            html.Div(id="heatmap-caption", className="caption", **{"data-selection": "none"}),
            dcc.Loading(
                type="circle",
                children=dcc.Graph(
                    id="heatmap",
                    config=GRAPH_CONFIG,
                    className="graph heatmap",
                    figure={"data": [], "layout": {"template": "simple_white"}},
                ),
            ),
            html.P(
                "Click a cell to intervene on that gate (LLM layer x vision layer) and re-run the answer.",
                className="hint",
            ),
        ],
    )


ATTRIBUTION_TARGETS = [  # (value, label): `analyses.attributions.TARGETS`, the default (margin) first
    ("margin", "margin over the runner-up"),
    ("logit", "logit"),
    ("logprob", "log-prob (flat when p ≈ 1: gradient × input maps become noise)"),
]


def attribution_panel() -> html.Div:
    return html.Div(
        className="card",
        children=[
            html.H3("Attributions: gradient × input (gxi)"),
            html.Div(
                className="controls",
                children=[
                    html.Span("Target:", className="hint"),
                    dcc.RadioItems(
                        id="attr-target",
                        options=[{"value": v, "label": label} for v, label in ATTRIBUTION_TARGETS],
                        value=ATTRIBUTION_TARGETS[0][0],
                        inline=True,
                        className="radio",
                    ),
                ],
            ),
            html.Div(id="attr-notes", className="map-notes"),
            html.Div(id="attr-caption", className="caption"),
            dcc.Loading(
                type="circle",
                children=html.Div(
                    className="attr-graphs",
                    children=[
                        dcc.Graph(id="attr-overlay", config=GRAPH_CONFIG, className="graph"),
                        dcc.Graph(id="attr-cells", config=GRAPH_CONFIG, className="graph"),
                        dcc.Graph(id="attr-tokens", config=GRAPH_CONFIG, className="graph wide"),
                    ],
                ),
            ),
        ],
    )


def ablation_panel() -> html.Div:
    return html.Div(
        className="card",
        children=[
            html.H3("Intervention: re-run with one gate cell changed"),
            dcc.RadioItems(
                id="ablation-kind",
                options=[{"value": v, "label": label} for v, label in ABLATION_KINDS],
                value=ABLATION_KINDS[0][0],
                inline=True,
                className="radio",
            ),
            dcc.Loading(
                type="dot",
                children=html.Div(
                    id="ablation-result",
                    className="ablation-result",
                    children=html.P("Click a heatmap cell after asking.", className="hint"),
                ),
            ),
        ],
    )


def explore_layout(backend: Backend) -> html.Div:
    return html.Div(
        className="explore",
        children=[
            image_panel(backend),
            html.Div(
                className="results",
                children=[
                    answer_panel(),
                    html.Div(className="row", children=[heatmap_panel(), ablation_panel()]),
                    attribution_panel(),
                ],
            ),
        ],
    )

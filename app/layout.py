"""The page: header, the two tabs, and the per-user stores (browser memory, one set per tab)."""

from __future__ import annotations

from dash import dcc, html

from cliviz.app.backend import Backend
from cliviz.app.layout_dataset import dataset_layout
from cliviz.app.layout_explore import explore_layout
from cliviz.app.state import ALL_TOKENS

STORES = ("image-store", "trace-store", "selection-store", "ablation-store", "attr-store")


def stores() -> list[dcc.Store]:
    """Per-user state (see `cliviz.app.state`): memory storage, so each tab is its own session."""
    initial = {"selection-store": ALL_TOKENS}
    return [dcc.Store(id=name, storage_type="memory", data=initial.get(name)) for name in STORES]


def root_layout(backend: Backend) -> html.Div:
    subtitle = f"model: {backend.model_label}"
    if backend.traces_label:
        subtitle += f"  ·  traces: {backend.traces_label}"
    return html.Div(
        className="page",
        children=[
            html.Header(
                className="header",
                children=[
                    html.H1("cliviz"),
                    html.Span(
                        "which vision layers a Cross-Layer-Injection model reads, and whether it matters",
                        className="tagline",
                    ),
                    html.Span(subtitle, id="model-label", className="hint"),
                ],
            ),
            dcc.Tabs(
                id="tabs",
                value="explore",
                className="tabs",
                children=[
                    dcc.Tab(label="Explore", value="explore", id="tab-explore", children=explore_layout(backend)),
                    dcc.Tab(label="Dataset", value="dataset", id="tab-dataset", children=dataset_layout(backend)),
                ],
            ),
            *stores(),
        ],
    )

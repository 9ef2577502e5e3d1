"""Heatmap cell click -> intervene on that gate cell and re-run (`analyses.ablations.single_cell`)."""

from __future__ import annotations

from typing import Any

from dash import Dash, Input, Output, State, html, no_update

from cliviz.app.backend import Backend
from cliviz.app.layout_explore import ABLATION_KINDS
from cliviz.app.state import image_from_payload, parse_cell, trace_from_dict
from cliviz.errors import CLIVizError

KINDS = tuple(value for value, _ in ABLATION_KINDS)


def condition_label(kind: str, llm_layer: int, vision_layer: int) -> str:
    """Column header naming what was changed, with real layer indices."""
    return {
        "knockout": f"L{llm_layer} × V{vision_layer} knocked out",
        "zero": f"L{llm_layer} × V{vision_layer} zeroed",
        "onehot": f"L{llm_layer} reads only V{vision_layer}",
        "uniform": f"L{llm_layer} gates uniform",
        "injection_off": f"L{llm_layer} injection off",
    }.get(kind, f"L{llm_layer} × V{vision_layer} {kind}")


def _fmt_prob(p: Any) -> str:
    try:
        return f"{float(p):.3f}"
    except (TypeError, ValueError):
        return "n/a"


def result_table(result: dict, llm_layer: int, vision_layer: int, kind: str) -> html.Div:
    """Original vs intervened answer and probability, side by side."""
    delta = result.get("delta_logprob")
    try:
        delta_text = f"{float(delta):+.3f}"
    except (TypeError, ValueError):
        delta_text = "n/a"
    changed = str(result.get("answer")) != str(result.get("base_answer"))
    what = condition_label(kind, llm_layer, vision_layer)
    return html.Div(
        className="ablation",
        **{"data-cell": f"L{llm_layer}-V{vision_layer}"},
        children=[
            html.Table(
                className="compare",
                children=[
                    html.Thead(html.Tr([html.Th(""), html.Th("original"), html.Th(what)])),
                    html.Tbody(
                        [
                            html.Tr(
                                [
                                    html.Th("answer token"),
                                    html.Td(str(result.get("base_answer")), id="ablation-base-answer"),
                                    html.Td(
                                        str(result.get("answer")),
                                        id="ablation-answer",
                                        className="changed" if changed else "",
                                    ),
                                ]
                            ),
                            html.Tr(
                                [
                                    html.Th("its probability"),
                                    html.Td(_fmt_prob(result.get("base_prob")), id="ablation-base-prob"),
                                    html.Td(_fmt_prob(result.get("prob")), id="ablation-prob"),
                                ]
                            ),
                        ]
                    ),
                ],
            ),
            html.P(
                [
                    "Δ log-prob of the original answer token: ",
                    html.Strong(delta_text, id="ablation-delta"),
                    " (its probability now "
                    + _fmt_prob(result.get("base_answer_prob"))
                    + ") — "
                    + ("the answer changed." if changed else "the answer stayed the same."),
                ],
                className="hint",
            ),
            *_kind_note(kind),
        ],
    )


def _kind_note(kind: str) -> list:
    """Under a knockout: what renormalising means for reading the change (docs/design.md §3)."""
    if kind != "knockout":
        return []
    from cliviz.analyses.ablations.report import RENORMALISE_NOTE

    return [html.P(RENORMALISE_NOTE.capitalize(), className="hint knockout-note")]


def ablate(backend: Backend, click: dict | None, store: dict | None, kind: str | None) -> tuple[Any, Any]:
    """(ablation-result children, ablation-store) for a click on heatmap cell `click`."""
    cell = parse_cell(click)
    if cell is None or not store:
        return no_update, no_update
    llm_layer, vision_layer = cell
    kind = kind or "knockout"
    if kind not in KINDS:  # the value comes from the client: only the offered kinds run
        return html.Span("Cannot run this intervention: unknown kind of intervention.", className="error"), no_update
    try:
        trace = trace_from_dict(store["trace"])
        if llm_layer not in trace.meta.injection_layers or vision_layer not in trace.meta.vision_layers:
            raise CLIVizError(f"L{llm_layer} × V{vision_layer} is not a gate cell of this model")
        image = image_from_payload(store["image"])
        result = backend.ablate(image, trace.meta.question, llm_layer, vision_layer, kind=kind)
    except (CLIVizError, KeyError, TypeError, ValueError) as err:
        return html.Span(f"Cannot run this intervention: {err}", className="error"), no_update
    return result_table(result, llm_layer, vision_layer, kind), {"llm_layer": llm_layer, "vision_layer": vision_layer}


def register(app: Dash, backend: Backend) -> None:
    @app.callback(
        Output("ablation-result", "children"),
        Output("ablation-store", "data", allow_duplicate=True),
        Input("heatmap", "clickData"),
        State("trace-store", "data"),
        State("ablation-kind", "value"),
        prevent_initial_call=True,
    )
    def on_cell_click(click, store, kind):
        return ablate(backend, click, store, kind)

    @app.callback(
        Output("ablation-result", "children", allow_duplicate=True),
        Input("trace-store", "data"),
        prevent_initial_call=True,
    )
    def on_new_answer(_store):
        return html.P("Click a heatmap cell to intervene on it and re-run.", className="hint")

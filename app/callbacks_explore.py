"""Ask -> answer + token strip; token clicks -> heatmap re-drawn from the stored trace.

The functions at module level are the callbacks' bodies (plain arguments in, Dash values out),
so benchmarks and unit tests call them directly; `register` wires them to a `Dash` app.
"""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go
from dash import ALL, Dash, Input, Output, State, ctx, html, no_update

from cliviz.app.backend import Backend
from cliviz.app.state import ALL_TOKENS, image_from_payload, parse_selection, trace_from_dict
from cliviz.errors import CLIVizError


def message_figure(text: str) -> go.Figure:
    """An empty plot carrying one line of text (no data yet, or nothing to draw)."""
    fig = go.Figure()
    fig.update_layout(
        template="simple_white",
        xaxis={"visible": False},
        yaxis={"visible": False},
        margin={"l": 10, "r": 10, "t": 10, "b": 10},
        height=260,
        annotations=[
            {
                "text": text,
                "showarrow": False,
                "font": {"size": 13, "color": "#666"},
                "xref": "paper",
                "yref": "paper",
                "x": 0.5,
                "y": 0.5,
            }
        ],
    )
    return fig


def error_line(text: str) -> html.Span:
    return html.Span(text, className="error")


# ---------------------------------------------------------------------------------------- ask


def ask(backend: Backend, question: str | None, image: dict | None) -> tuple[Any, ...]:
    """(trace-store, selection-store, ablation-store, ask-message) for one Ask."""
    if not image:
        return no_update, no_update, no_update, error_line("Choose an image first (upload one or pick an example).")
    try:
        checked = backend.request(image_from_payload(image), question)  # the API's and the commands' checks
        result = backend.ask(checked.image, checked.question)
    except CLIVizError as err:
        return no_update, no_update, no_update, error_line(str(err))
    notes = "; ".join(checked.warnings) or None
    store = {"trace": result.to_dict(), "image": image, "world_warning": notes}
    return store, ALL_TOKENS, None, ""


# ---------------------------------------------------------------------------------- answer strip


def _prob(logprob: float) -> float:
    return math.exp(float(logprob))


def answer_probability(trace) -> float:
    """Probability of the first answer token (as `cliviz ask` reports it, and as ablations compare)."""
    return _prob(trace.answer_logprobs[0]) if len(trace.answer_logprobs) else float("nan")


def render_answer(store: dict | None) -> Any:
    """The answer card: question, answer, probability and the clickable token strip."""
    if not store:
        return html.P("Choose an image, type a question and press Ask.", className="hint")
    try:
        trace = trace_from_dict(store["trace"])
    except (CLIVizError, KeyError, TypeError) as err:
        return error_line(str(err))
    n_image = int(sum(r == "image" for r in trace.token_roles))
    prompt_words = [t for t, r in zip(trace.token_texts, trace.token_roles) if r == "prompt" and not t.startswith("<")]
    tokens = [html.Span(f"[{n_image} image tokens]", className="tok tok-image", title="image placeholder tokens")]
    tokens += [html.Span(w, className="tok tok-prompt") for w in prompt_words]
    tokens.append(html.Span("→", className="tok-arrow"))
    for s, word in enumerate(trace.answer_texts):
        alts = ", ".join(f"{t} {_prob(lp):.2f}" for t, lp in zip(trace.topk_texts[s], trace.topk_logprobs[s]))
        tokens.append(
            html.Button(
                [
                    html.Span(word, className="tok-word"),
                    html.Span(f"{_prob(trace.answer_logprobs[s]):.2f}", className="tok-p"),
                ],
                id={"type": "token", "step": s},
                className="tok tok-answer",
                n_clicks=0,
                title=f"step {s}: top-k {alts}",
            )
        )
    tokens.append(
        html.Button(
            "all answer tokens",
            id={"type": "token", "step": -1},
            className="tok tok-all selected",
            n_clicks=0,
            title="mean over the answer steps with content tokens (<eos> and special tokens left out)",
        )
    )
    warning = store.get("world_warning")
    return html.Div(
        [
            *([html.Div(f"Note: {warning}.", id="world-warning", className="warning")] if warning else []),
            html.Div(
                [html.Span("Q ", className="label"), html.Span(trace.meta.question, id="answer-question")],
                className="qa",
            ),
            html.Div(
                [
                    html.Span("A ", className="label"),
                    html.Strong(trace.meta.answer or "(empty)", id="answer-text"),
                    html.Span(
                        f"p = {answer_probability(trace):.3f}",
                        id="answer-prob",
                        className="prob",
                        title="probability of the first answer token",
                    ),
                ],
                className="qa",
            ),
            # a long answer (hundreds of tokens) scrolls inside the strip instead of pushing the page down
            html.Div(
                tokens, className="token-strip", id="token-strip", style={"maxHeight": "10em", "overflowY": "auto"}
            ),
        ]
    )


def select_token(triggered_id: Any, triggered_values: list[Any]) -> Any:
    """selection-store after a token click: a step, or "answer" for the all-tokens button."""
    if not isinstance(triggered_id, dict) or not any(triggered_values):
        return no_update  # the strip was re-drawn: no click happened
    step = triggered_id.get("step")
    return int(step) if isinstance(step, int) and step >= 0 else ALL_TOKENS


def token_classes(selection: Any, ids: list[dict]) -> list[str]:
    out = []
    for i in ids if isinstance(ids, list) else []:
        step = i.get("step") if isinstance(i, dict) else None
        base = "tok tok-all" if step == -1 else "tok tok-answer"
        on = (selection == ALL_TOKENS and step == -1) or (isinstance(selection, int) and selection == step)
        out.append(base + (" selected" if on else ""))
    return out


# ---------------------------------------------------------------------------------------- heatmap


def selection_label(trace, sel: str | int) -> str:
    if sel == ALL_TOKENS:
        from cliviz.analyses.reductions import content_steps

        n, used = len(trace.answer_texts), len(content_steps(trace))
        if not used:  # an answer of special tokens only: its map is every step
            return f"all {n} answer tokens"
        return f"all {n} answer tokens: mean over the {used} content tokens (<eos> left out)"
    return f"answer token {sel}: '{trace.answer_texts[sel]}'"


def render_heatmap(store: dict | None, selection: Any, cell: dict | None) -> tuple[Any, Any, str]:
    """(figure, caption, data-selection): the gate map for the selected answer token(s), re-drawn
    from the trace in the browser store — no model run."""
    from cliviz.analyses.heatmaps import gate_matrix, heatmap_figure

    if not store:
        return message_figure("Ask a question to see the gates."), "", "none"
    try:
        trace = trace_from_dict(store["trace"])
    except (CLIVizError, KeyError, TypeError) as err:
        return message_figure(str(err)), "", "none"
    if not trace.has_gates:
        return message_figure(f"This model has no gates (fusion = {trace.meta.fusion})."), map_notes(trace), "none"
    sel = parse_selection(selection, len(trace.answer_texts))
    where = ALL_TOKENS if sel == ALL_TOKENS else int(trace.answer_positions[sel])
    label = selection_label(trace, sel)
    fig = heatmap_figure(
        gate_matrix(trace, where),
        trace.meta.vision_layers,
        trace.meta.injection_layers,
        title=f"gates for {label}" + (" (mean)" if sel == ALL_TOKENS else ""),
        zmax=1.0,
    )
    n_llm, n_vis = len(trace.meta.injection_layers), len(trace.meta.vision_layers)
    if n_llm * n_vis <= 120:  # numbers in the cells only while cells are large enough to hold them
        fig.update_traces(texttemplate="%{z:.2f}", textfont={"size": 10})
    height = max(340, 110 + 18 * n_llm)  # a real model's 27-31 LLM layers each keep a readable row
    fig.update_layout(height=height, clickmode="event", title={"font": {"size": 14}, "x": 0.02, "xanchor": "left"})
    if (
        isinstance(cell, dict)
        and cell.get("llm_layer") in trace.meta.injection_layers
        and cell.get("vision_layer") in trace.meta.vision_layers
    ):
        x = trace.meta.vision_layers.index(cell["vision_layer"])
        y = trace.meta.injection_layers.index(cell["llm_layer"])
        fig.add_shape(
            type="rect", x0=x - 0.5, x1=x + 0.5, y0=y - 0.5, y1=y + 0.5, line={"color": "#D55E00", "width": 3}
        )
    tag = "all" if sel == ALL_TOKENS else f"step-{sel}"
    caption = [
        html.Span(f"Selected: {label}", id="heatmap-selection"),
        html.Span(f"  ·  {trace.meta.question} → {trace.meta.answer}", className="hint"),
        map_notes(trace),
    ]
    return fig, caption, tag


def map_notes(trace) -> html.Div:
    """What the map is (static / ungated / no gates) and its causal check, right next to it; above them
    the untrained-gates warning when the injection adds nothing (`analyses.untrained`, the one rule)."""
    from cliviz.analyses.untrained import untrained_note

    check = trace.causal
    untrained = untrained_note(trace)
    items = [html.Div(untrained, id="untrained-note", className="map-note warning")] if untrained else []
    for note in trace.map_notes():
        is_check = note.startswith("injection off")
        quiet = is_check and check is not None and not check.matters
        extra = {"id": "causal-check"} if is_check else {}
        items.append(html.Div(note, className="map-note" + (" quiet" if quiet else ""), **extra))
    return html.Div(
        items,
        id="map-notes",
        className="map-notes",
        **{"data-matters": "unknown" if check is None else ("yes" if check.matters else "no")},
    )


def register(app: Dash, backend: Backend) -> None:
    @app.callback(
        Output("trace-store", "data"),
        Output("selection-store", "data"),
        Output("ablation-store", "data"),
        Output("ask-message", "children"),
        Input("ask", "n_clicks"),
        Input("question", "n_submit"),
        State("question", "value"),
        State("image-store", "data"),
        prevent_initial_call=True,
    )
    def on_ask(_clicks, _submits, question, image):
        return ask(backend, question, image)

    app.callback(Output("answer-panel", "children"), Input("trace-store", "data"))(render_answer)

    @app.callback(
        Output("selection-store", "data", allow_duplicate=True),
        Input({"type": "token", "step": ALL}, "n_clicks"),
        prevent_initial_call=True,
    )
    def on_token(_clicks):
        return select_token(ctx.triggered_id, [t["value"] for t in ctx.triggered])

    @app.callback(
        Output({"type": "token", "step": ALL}, "className"),
        Input("selection-store", "data"),
    )
    def on_selection(selection):
        # one class per output the request names (a forged request cannot make the lengths disagree)
        return token_classes(selection, [o.get("id") for o in ctx.outputs_list if isinstance(o, dict)])

    app.callback(
        Output("heatmap", "figure"),
        Output("heatmap-caption", "children"),
        Output("heatmap-caption", "data-selection"),
        Input("trace-store", "data"),
        Input("selection-store", "data"),
        Input("ablation-store", "data"),
    )(render_heatmap)

"""Attributions for each answer token (`analyses.attributions.attribute`), computed once per answer.

The server computes the figures of every answer step once, right after an answer arrives, and
puts them in the browser's ``attr-store``; choosing a token then only picks a stored figure, in
the browser (a clientside callback), without a round trip.
"""

from __future__ import annotations

from typing import Any

from dash import Dash, Input, Output, html

from cliviz.app.backend import Backend
from cliviz.app.state import image_from_payload, trace_from_dict
from cliviz.errors import CLIVizError

METHOD = "gxi"  # gradient × input: one backward pass per answer, fast enough for a click


def compact_images(fig) -> None:
    """Ship `go.Image` pixels as one PNG data URL instead of a nested array (~40x smaller)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    for trace in fig.data:
        if trace.type == "image" and trace.z is not None:
            buf = io.BytesIO()
            Image.fromarray(np.asarray(trace.z, dtype=np.uint8)).save(buf, format="PNG")
            trace.source = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
            trace.z = None


def attribution_figures(backend: Backend, store: dict | None, target: str | None = None) -> dict[str, Any] | None:
    """attr-store payload: per-step patch overlays and gate-cell maps plus the prompt-token strip, and
    the words that go with them (method, target; warnings about every map, and per answer token)."""
    from cliviz.analyses.attributions import DEFAULT_TARGET, METHOD_NAMES, TARGETS

    if not store:
        return None
    target = target if target in TARGETS else DEFAULT_TARGET
    try:
        trace = trace_from_dict(store["trace"])
        image = image_from_payload(store["image"])
        result = backend.attribute(image, trace.meta.question, method=METHOD, target=target)
        n_steps = result.n_answer
        overlays = [result.patch_overlay_figure(image, s) for s in range(n_steps)]
        cells = [result.cell_heatmap_figure(s) for s in range(n_steps)]
        cells_all = result.cell_heatmap_figure(None)
        tokens = result.token_strip_figure()
    except (CLIVizError, KeyError, TypeError, ValueError) as err:
        return {"error": f"No attributions: {err}"}
    for fig in overlays:
        compact_images(fig)
    for fig in [*cells, cells_all]:
        fig.update_layout(height=320, margin={"l": 60, "r": 20, "t": 40, "b": 50}, title={"font": {"size": 13}})
    for fig in overlays:  # fill the panel instead of a fixed width the panel would clip (the colour bar's title)
        fig.update_layout(title={"font": {"size": 13}}, width=None, autosize=True, margin={"r": 60})
    words = [str(w) for w in result.answer_tokens]
    return {
        "overlay": overlays,
        "cells": cells,
        "cells_all": cells_all,
        "tokens": tokens,
        "words": words,
        "method": f"{METHOD_NAMES[METHOD]} ({METHOD}), target {target}",
        "question": trace.meta.question,
        "description": result.description(),
        "warnings": result.general_warnings(),
        "step_warnings": [result.step_warnings(s) for s in range(n_steps)],
    }


def _strings(value: Any) -> list[str]:
    return [w for w in value if isinstance(w, str)] if isinstance(value, list) else []


def attribution_notes(payload: dict | None, selection: Any = None) -> Any:
    """The attribution's description and warnings above its maps: those about every map (untrained
    gates), then those of the answer token shown — judged per token, so a saturated `<eos>` does not
    mark a content token's maps (with "all answer tokens" selected: every token's)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("description"), str):
        return ""  # nothing asked yet, or a store this app never wrote
    warnings = _strings(payload.get("warnings"))
    per_step = payload.get("step_warnings")
    per_step = [_strings(w) for w in per_step] if isinstance(per_step, list) else []
    if isinstance(selection, int) and not isinstance(selection, bool) and 0 <= selection < len(per_step):
        warnings += per_step[selection]
    else:  # "all answer tokens": the summed cell map covers every token
        warnings += [w for ws in per_step for w in ws]
    items = [html.Div(payload["description"], className="map-note", id="attr-description")]
    items += [html.Div(w, className="map-note quiet attr-warning") for w in warnings]
    return items


# Picks the stored figures of the selected step; with "all answer tokens" selected: the gate-cell
# map summed over tokens and the patch overlay of token 0.
PICK_JS = """
function(store, selection) {
    const blank = function(text) {
        return {data: [], layout: {height: 60, margin: {l: 0, r: 0, t: 0, b: 0}, xaxis: {visible: false},
            yaxis: {visible: false}, annotations: text ? [{text: text, showarrow: false, xref: 'paper',
            yref: 'paper', x: 0.5, y: 0.5, font: {color: '#666'}}] : []}};
    };
    if (!store) { return [blank('Ask a question to see attributions.'), blank(''), blank(''), '']; }
    if (store.error) { return [blank(store.error), blank(''), blank(''), store.error]; }
    const n = store.overlay.length;
    const step = (typeof selection === 'number' && selection >= 0 && selection < n) ? selection : 0;
    const one = (typeof selection === 'number');
    const caption = 'Attribution (' + store.method + ') of answer token ' + step + ": '" + store.words[step] + "'" +
        (one ? '' : ' (patches; gate cells summed over all answer tokens)');
    return [store.overlay[step], one ? store.cells[step] : store.cells_all, store.tokens, caption];
}
"""


def register(app: Dash, backend: Backend) -> None:
    @app.callback(
        Output("attr-store", "data"),
        Input("trace-store", "data"),
        Input("attr-target", "value"),
        prevent_initial_call=True,
    )
    def on_answer(store, target):
        return attribution_figures(backend, store, target)

    app.callback(Output("attr-notes", "children"), Input("attr-store", "data"), Input("selection-store", "data"))(
        attribution_notes
    )

    app.clientside_callback(
        PICK_JS,
        Output("attr-overlay", "figure"),
        Output("attr-cells", "figure"),
        Output("attr-tokens", "figure"),
        Output("attr-caption", "children"),
        Input("attr-store", "data"),
        Input("selection-store", "data"),
    )

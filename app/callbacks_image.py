"""Choosing the picture: an upload (validated, size-limited) or a bundled example (by name)."""

from __future__ import annotations

from typing import Any

from dash import ALL, Dash, Input, Output, State, ctx, html, no_update

from cliviz.app.backend import Backend
from cliviz.app.state import decode_upload, image_payload, safe_name
from cliviz.errors import CLIVizError
from cliviz.inputs import load_image


def from_upload(contents: str | None, filename: str | None) -> tuple[Any, ...]:
    """(image-store, preview src, caption, message) for an uploaded file."""
    if not contents:
        return no_update, no_update, no_update, ""
    name = safe_name(filename)
    try:
        raw, image = decode_upload(contents, name)
    except CLIVizError as err:
        return no_update, no_update, no_update, html.Span(f"Cannot use this file: {err}", className="error")
    payload = image_payload(name, raw, image)
    return payload, payload["preview"], f"{name} ({image.width}x{image.height})", ""


def from_example(backend: Backend, name: str) -> tuple[Any, ...]:
    """(image-store, preview src, caption, message, question) for a bundled example."""
    example = backend.examples.get(name) if isinstance(name, str) else None
    if example is None:  # ids come from the client: only known names are honoured
        return no_update, no_update, no_update, html.Span("Unknown example.", className="error"), no_update
    raw = example.data
    image = load_image(raw, name=f"{name}.png")
    payload = image_payload(f"{name}.png", raw, image)
    return payload, payload["preview"], f"example: {name}.png", "", example.question


def register(app: Dash, backend: Backend) -> None:
    @app.callback(
        Output("image-store", "data"),
        Output("image-preview", "src"),
        Output("image-name", "children"),
        Output("upload-message", "children"),
        Output("question", "value"),
        Output("upload", "contents"),  # cleared, so that the same file can be chosen again
        Input("upload", "contents"),
        Input({"type": "example", "name": ALL}, "n_clicks"),
        State("upload", "filename"),
        prevent_initial_call=True,
    )
    def choose_image(contents, _clicks, filename):
        trigger = ctx.triggered_id
        if isinstance(trigger, dict) and trigger.get("type") == "example":
            if not any(t["value"] for t in ctx.triggered):  # a re-render, not a click
                return (no_update,) * 6
            return (*from_example(backend, trigger.get("name")), no_update)
        if not contents:
            return (no_update,) * 6
        return (*from_upload(contents, filename), no_update, None)

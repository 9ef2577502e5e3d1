"""Bad requests get a 4xx answer: a forged body or a made-up asset path is the client's error.

Dash answers both with HTTP 500 (a `RecursionError` parsing a deeply nested body, a `KeyError`
for an output no callback has, a `DependencyException` for a path under `/_dash-component-suites/`
that no registered package serves). Nothing leaks, but a server error is the wrong answer and
fills the log with tracebacks. `install` checks each callback request's shape before Dash
dispatches it (400, with one line saying what is wrong), refuses asset paths that climb out of
their folder before any file is looked up (404), and turns Dash's own refusal of an unregistered
asset, or of a registered one the installed package lacks, into a 404. What Dash serves is
unchanged: only files it registered, from its own packages.
"""

from __future__ import annotations

from typing import Any

import dash
from dash.exceptions import DependencyException
from flask import Response, request
from werkzeug.exceptions import HTTPException

MAX_BODY_DEPTH = 64  # the app's own requests nest about 8 deep (a trace in a store); JSON allows any depth


def _answer(status: int, text: str) -> Response:
    return Response(text + "\n", status=status, mimetype="text/plain")


def install(app: dash.Dash) -> None:
    """Register the request checks on `app.server` (the Flask app)."""
    prefix = app.config.requests_pathname_prefix or "/"
    update_path = f"{prefix}_dash-update-component"
    suites = f"{prefix}_dash-component-suites/"

    @app.server.before_request
    def _check_request():
        if request.path == update_path and request.method == "POST":
            problem = callback_body_problem(app.callback_map)
            if problem is not None:
                return _answer(400, f"bad callback request: {problem}")
        elif request.path.startswith(suites) and not safe_asset_path(request.path[len(suites) :]):
            return _answer(404, "not found")
        return None

    @app.server.errorhandler(DependencyException)
    def _unregistered_asset(_err):
        return _answer(404, "not found")

    @app.server.errorhandler(FileNotFoundError)
    def _missing_asset(err):
        # a registered asset the installed package lacks (dash lists source maps it does not ship)
        if request.path.startswith(suites):
            return _answer(404, "not found")
        raise err


def safe_asset_path(path: str) -> bool:
    """A relative path with no `..`, `.`, empty, backslash or NUL segment (werkzeug has decoded `%2f` already)."""
    if "\\" in path or "\x00" in path or path.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def callback_body_problem(callback_map: dict[str, Any]) -> str | None:
    """What is wrong with the current `/_dash-update-component` body, or None when Dash can dispatch it."""
    try:
        body = request.get_json()  # cached: Dash's own `get_json()` reuses this parse
    except RecursionError:
        return "the JSON body is nested too deeply"
    except HTTPException:
        raise  # not JSON, or the wrong content type: werkzeug's own 400 / 415
    if json_depth(body) > MAX_BODY_DEPTH:
        return f"the JSON body is nested more than {MAX_BODY_DEPTH} deep"
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    output = body.get("output")
    if not isinstance(output, str) or output not in callback_map:
        return "no callback has this output"
    callback = callback_map[output]
    for field, declared in (("inputs", callback.get("inputs", [])), ("state", callback.get("state", []))):
        items = body.get(field, [])
        if not isinstance(items, list) or len(items) != len(declared):
            return f"'{field}' must list the callback's {len(declared)} {field}"
        if not all(_is_prop(item) or (isinstance(item, list) and all(map(_is_prop, item))) for item in items):
            return f"each entry of '{field}' must name an id and a property"
    outputs = body.get("outputs", [])
    flat = outputs if isinstance(outputs, list) else [outputs]
    if not all(isinstance(o, dict) or (isinstance(o, list) and all(isinstance(x, dict) for x in o)) for o in flat):
        return "'outputs' must be an object or a list of objects"
    changed = body.get("changedPropIds", [])
    if not isinstance(changed, list) or not all(isinstance(c, str) for c in changed):
        return "'changedPropIds' must be a list of strings"
    return None


def _is_prop(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("id"), (str, dict)) and isinstance(item.get("property"), str)


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (a hostile body may be nested thousands deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > MAX_BODY_DEPTH:
                return deepest
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest

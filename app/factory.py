"""`create_app`: load the model (and trace set) once and build the Dash app around them.

Example::

    from cliviz.app import create_app
    app = create_app(device="cpu")           # bundled cli-tiny, no trace set
    assert app.server.test_client().get("/").status_code == 200
    # app.run(host="127.0.0.1", port=8050)   # serves it, as `cliviz dash` does

The model and trace set are captured by the callbacks through one `Backend` object made here:
nothing lives in module globals, and every user's state stays in their browser (`app.state`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import dash

from cliviz.app import (
    callbacks_ablation,
    callbacks_attribution,
    callbacks_dataset,
    callbacks_explore,
    callbacks_image,
    guard,
)
from cliviz.app.backend import Backend, load_backend
from cliviz.app.layout import root_layout
from cliviz.app.state import MAX_UPLOAD_BYTES

# A request carries at most one image (base64: 4/3 of its size) plus small JSON; refuse more.
MAX_REQUEST_BYTES = 2 * MAX_UPLOAD_BYTES + 4 * 1024 * 1024


def css_dir() -> str:
    return str(Path(str(resources.files("cliviz.assets"))) / "css")


def build_app(backend: Backend) -> dash.Dash:
    """The Dash app for an already loaded backend (tests and benchmarks may build one directly)."""
    app = dash.Dash(
        "cliviz",
        title="cliviz",
        assets_folder=css_dir(),
        suppress_callback_exceptions=True,  # the token strip is created by a callback
        update_title=None,
        serve_locally=True,  # no CDN: works offline
    )
    app.server.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    guard.install(app)  # forged callback bodies and asset paths: 4xx, never a server error
    app.layout = root_layout(backend)
    for module in (callbacks_image, callbacks_explore, callbacks_ablation, callbacks_attribution, callbacks_dataset):
        module.register(app, backend)
    app.cliviz_backend = backend  # for introspection in tests; callbacks hold their own reference
    return app


def create_app(
    model_dir: str | Path | None = None,
    traces_path: str | Path | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> dash.Dash:
    """Load `model_dir` (None: bundled cli-tiny) and `traces_path` (optional Parquet trace set);
    raises `CLIVizError` with one line when either is missing or malformed."""
    return build_app(load_backend(model_dir, traces_path, device=device, dtype=dtype))

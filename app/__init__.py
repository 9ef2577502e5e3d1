"""The Dash dashboard (imported as `cliviz.app`): `create_app(model_dir, traces_path)`; `cliviz dash`.

Modules: `factory` (create_app), `backend` (the model and trace set, loaded once), `state` (what the
browser stores hold), `layout*` (one per page), `callbacks_*` (one per panel).
"""

from __future__ import annotations


def create_app(*args, **kwargs):
    """See `cliviz.app.factory.create_app` (imported lazily: `import cliviz.app` stays cheap)."""
    from cliviz.app.factory import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["create_app"]

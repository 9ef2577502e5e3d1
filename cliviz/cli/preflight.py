"""Checks every model command runs before any work, so bad input fails fast and loses nothing.

Order matters: outputs are checked first (a typo in `--out` must not cost a model load), then the
image and question text, then the model, then the question against the model's vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path

from cliviz.errors import CLIVizError


def check_writable(path: Path | None, what: str) -> None:
    """Fail before any model work when an output cannot be written."""
    if path is None:
        return
    parent = path.resolve().parent
    if path.is_dir():
        raise CLIVizError(f"{what} {path} is a folder, expected a file path")
    if not parent.exists():
        raise CLIVizError(f"cannot write {what} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CLIVizError(f"cannot write {what} {path}: permission denied")


def load_checked(model: Path | None, device: str, dtype: str):
    """`(model, tokenizer)` from a folder (the bundled cli-tiny when None), or a one-line error."""
    from cliviz.model.loading import load_model

    return load_model(model, device=device, dtype=dtype)


def checked_question(question: str, tokenizer) -> str:
    from cliviz.inputs import check_model_question

    return check_model_question(question, tokenizer)


def prepare_question(image: Path, question: str, model: Path | None, device: str, dtype: str, *,
                     trace_out: Path | None = None, html: Path | None = None):
    """The shared start of `ask`, `trace` and `attribute`: `(image, model, tokenizer, question)`.

    A bundled model shown an image unlike its ShapesVQA scenes gets one warning line on stderr
    (`cliviz.scene_check`); the command still runs.

    `trace_out`, when it exists already, must be a readable cliviz trace file: appending to a foreign
    or corrupt file is refused before the model runs.
    """
    from cliviz.inputs import check_question, load_image
    from cliviz.tracing.traceset import TraceSet

    check_writable(trace_out, "trace file")
    check_writable(html, "html file")
    if trace_out is not None and trace_out.exists():
        TraceSet.read(trace_out)
    img = load_image(image)
    check_question(question)
    net, tok = load_checked(model, device, dtype)
    checked = checked_question(question, tok)
    warn_outside_world(img, tok)
    return img, net, tok, checked


def warn_outside_world(image, tokenizer) -> None:
    """One `warning:` line on stderr when a bundled model is shown an image unlike its ShapesVQA scenes."""
    import typer

    from cliviz.scene_check import world_warning

    warning = world_warning(image, tokenizer)
    if warning:
        typer.echo(f"warning: {warning}", err=True)

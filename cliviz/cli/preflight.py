"""Checks every model command runs before any work, so bad input fails fast and loses nothing.

Order matters: outputs are checked first (a typo in `--out` must not cost a model load), then the
image and question text, then the model, then the question against the model's vocabulary.
"""

from __future__ import annotations

import errno
import os
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from cliviz.errors import CLIVizError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def check_writable(path: Path | None, what: str) -> None:
    """Fail before any model work when the file `path` cannot be written.

    Its folder must exist (a file where a folder should be is named), and a real write is tried in it
    (a probe file, removed at once): `os.access` says yes to root everywhere and cannot tell a
    read-only file system from a permission problem.
    """
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise CLIVizError(f"{what} {path} is a folder, expected a file path")
    parent = path.absolute().parent
    blocker = _file_in_the_way(parent)
    if blocker is not None:
        raise CLIVizError(f"cannot write {what} {path}: {blocker} is a file, not a folder")
    if not parent.exists():
        raise CLIVizError(f"cannot write {what} {path}: folder {parent} does not exist")
    _probe_folder(parent, f"{what} {path}")
    if path.exists() and not os.access(path, os.W_OK):
        raise CLIVizError(f"cannot write {what} {path}: permission denied")


def check_output_folder(path: Path | None, what: str) -> None:
    """Fail before any model work when files cannot be written into the folder `path` (created later if missing)."""
    if path is None:
        return
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise CLIVizError(f"{what} {path} exists and is not a folder")
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise CLIVizError(f"cannot write {what} {path}: {blocker} is a file, not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    _probe_folder(existing, f"{what} {path}")


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing ancestor of `folder` (itself included) when it is not a folder, else None."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _probe_folder(folder: Path, target: str) -> None:
    """Create and remove a hidden probe file in `folder`; the OS's own reason when that fails."""
    probe = folder / f".cliviz-probe-{secrets.token_hex(6)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        raise CLIVizError(f"cannot write {target}: {_reason(err)}") from None
    os.close(fd)
    try:
        probe.unlink()
    except OSError:
        pass


def _reason(err: OSError) -> str:
    """Words for the errno of a failed write: a read-only file system is not a permission problem."""
    reasons: dict[int | None, str] = {
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
    }
    return reasons.get(err.errno, err.strerror or str(err))


def load_checked(model: Path | None, device: str, dtype: str):
    """`(model, tokenizer)` from a folder (the bundled cli-tiny when None), or a one-line error."""
    from cliviz.model.loading import load_model

    return load_model(model, device=device, dtype=dtype)


def checked_question(question: str, tokenizer: PreTrainedTokenizerBase) -> str:
    from cliviz.inputs import check_model_question

    return check_model_question(question, tokenizer)


def prepare_question(
    image: Path,
    question: str,
    model: Path | None,
    device: str,
    dtype: str,
    *,
    trace_out: Path | None = None,
    html: Path | None = None,
):
    """The shared start of `ask`, `trace` and `attribute`: `(image, model, tokenizer, question)`.

    The same checks as the Python API (`cliviz.arguments.check_request`), cheapest first: the image
    file and the question's text before the model loads, then the question against the model's
    tokenizer. The warnings the API gives as `CLIVizWarning` (a bundled model shown an image unlike
    its ShapesVQA scenes) are printed as `warning:` lines (`warnings_as_lines`); the command still runs.

    `trace_out`, when it exists already, must be a readable cliviz trace file: appending to a foreign
    or corrupt file is refused before the model runs.
    """
    from cliviz.arguments import check_request, warn
    from cliviz.inputs import check_question, load_image
    from cliviz.tracing.store import check_writable_set
    from cliviz.tracing.traceset import TraceSet

    if trace_out is not None and trace_out.is_dir():  # an existing trace set folder: appends add a part
        check_writable_set(trace_out)
        _probe_folder(trace_out, f"trace set {trace_out}")
    else:
        check_writable(trace_out, "trace file")
    check_writable(html, "html file")
    if trace_out is not None and trace_out.exists():
        TraceSet.read(trace_out)  # checked (a large set: every footer): a foreign or corrupt set is refused
    img = load_image(image)
    check_question(question)
    net, tok = load_checked(model, device, dtype)
    request = check_request(net, tok, img, question)
    warn(request.warnings)
    return request.image, net, tok, request.question


@contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Inside a command: every `CLIVizWarning` becomes one `warning: ...` line on stderr, each text
    once per run (a check in the command and the same check in the API it calls say it once).
    Other warnings keep Python's handling; everything is restored on exit."""
    from cliviz.cli.main import say
    from cliviz.errors import CLIVizWarning

    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("always", CLIVizWarning)
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, CLIVizWarning):
                return previous(message, category, filename, lineno, file, line)
            text = str(message)
            if text not in seen:
                seen.add(text)
                say(f"warning: {text}")

        warnings.showwarning = show
        yield

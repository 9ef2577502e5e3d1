"""Atomic file replacement, shared by every writer in cliviz (trace sets, figures, CSVs).

A crash or a full disk mid-write must never leave a half-written file where a good one was:
we write a hidden temporary beside the target, fsync it and rename it over the target.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from cliviz.errors import CLIVizError


@contextmanager
def atomic_file(path: str | os.PathLike, what: str = "file") -> Iterator[BinaryIO]:
    """Open a temporary beside `path` for writing; on a clean exit it replaces `path` atomically.

    An existing target keeps its permission bits; on any error the temporary is removed, the target
    is untouched and an OSError becomes a one-line CLIVizError naming `what`.
    """
    p = Path(path)
    parent = p.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIVizError(f"cannot create output folder {parent}: {e.strerror or e}") from None
    if p.is_dir():
        raise CLIVizError(f"{p} is a folder, not a {what}")
    tmp = parent / f".{p.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp
    except OSError as e:
        raise CLIVizError(f"cannot write {what} in folder {parent}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if p.exists():
            os.chmod(tmp, stat.S_IMODE(p.stat().st_mode))
        os.replace(tmp, p)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CLIVizError(f"cannot write {what} {p}: {e.strerror or e}") from None
        raise
    _fsync_folder(parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "file") -> None:
    """Write `data` to `path` all at once or not at all."""
    with atomic_file(path, what) as fh:
        fh.write(data)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; best effort (not every platform can open a folder)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass

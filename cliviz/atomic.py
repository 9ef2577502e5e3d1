"""Atomic file replacement, shared by every writer in cliviz (trace sets, figures, CSVs).

A crash or a full disk mid-write must never leave a half-written file where a good one was:
we write a hidden temporary beside the target, fsync it and rename it over the target.

Atomic replacement alone does not stop two processes that read, extend and replace the same file
from losing each other's rows; `exclusive_writer` serialises them with an OS file lock (the
`filelock` package: `flock` on Unix, `LockFileEx` on Windows, released by the kernel when a
process dies, so a SIGKILL never leaves a stale lock behind). The lock lives in a hidden
`.NAME.lock` file beside the target. A temporary left by a kill mid-write is found by
`stale_temporaries` and removed by the next writer that holds the lock.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from cliviz.errors import CLIVizError

TMP_HEX_BYTES = 6  # temporaries are named .NAME.<12 hex digits>.tmp


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
    tmp = parent / f".{p.name}.{secrets.token_hex(TMP_HEX_BYTES)}.tmp"
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


def lock_path(path: str | os.PathLike) -> Path:
    """The hidden lock file that guards `path`: `.NAME.lock` in the same folder."""
    p = Path(path)
    return p.absolute().parent / f".{p.name}.lock"


@contextmanager
def exclusive_writer(path: str | os.PathLike, what: str = "file", wait: float = 0.0) -> Iterator[None]:
    """Hold the write lock of `path` for the block; CLIVizError when another process holds it past `wait` s.

    Re-entrant within a thread (a sweep holds the lock of its output while each chunk's append takes it
    again); other threads and processes wait or are refused. The outermost holder removes the lock file
    *before* unlocking, so no folder keeps `.NAME.lock` files; a waiter that then wins the unlinked file
    sees it unlinked and takes a fresh one (filelock >= 4 checks `st_nlink` after every `flock`).
    """
    from filelock import FileLock, Timeout

    target = Path(path)
    lock_file = lock_path(target)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIVizError(f"cannot create output folder {lock_file.parent}: {e.strerror or e}") from None
    try:
        lock = FileLock(str(lock_file), is_singleton=True)
        outermost = not lock.is_locked
        lock.acquire(timeout=wait)
    except Timeout:
        raise CLIVizError(
            f"{target} is being written by another cliviz process (lock {lock_file.name}); "
            f"wait for it to finish, or write the {what} elsewhere"
        ) from None
    except OSError as e:
        raise CLIVizError(f"cannot write {what} {target}: {e.strerror or e}") from None
    try:
        yield
    finally:
        if outermost:
            try:
                lock_file.unlink()
            except OSError:
                pass
        lock.release()


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporaries of `path` that an interrupted `atomic_file` left behind (call while holding its lock)."""
    p = Path(path)
    folder = p.absolute().parent
    pattern = re.compile(rf"^\.{re.escape(p.name)}\.[0-9a-f]{{{2 * TMP_HEX_BYTES}}}\.tmp$")
    if not folder.is_dir():
        return []
    return sorted(q for q in folder.iterdir() if pattern.match(q.name) and q.is_file())


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove what `stale_temporaries` finds; returns the removed paths."""
    removed = []
    for tmp in stale_temporaries(path):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed

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

import errno
import json
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import time
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
        fault_point(f"create {p.name}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp
    except OSError as e:
        raise CLIVizError(f"cannot write {what} in folder {parent}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fault_point(f"write {p.name}")
            fh.flush()
            os.fsync(fh.fileno())
        if p.exists():
            os.chmod(tmp, stat.S_IMODE(p.stat().st_mode))
        fault_point(f"rename {p.name}")
        os.replace(tmp, p)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CLIVizError(f"cannot write {what} {p}: {write_error(e)}") from None
        raise
    fsync_path(parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "file") -> None:
    """Write `data` to `path` all at once or not at all."""
    with atomic_file(path, what) as fh:
        fh.write(data)


def fsync_path(path: Path) -> None:
    """Flush a written file, or a folder after a rename into it, to the disk; best effort (not every
    platform can open a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def lock_path(path: str | os.PathLike) -> Path:
    """The hidden lock file that guards `path`: `.NAME.lock` in the same folder."""
    p = Path(path)
    return p.absolute().parent / f".{p.name}.lock"


@contextmanager
def exclusive_writer(
    path: str | os.PathLike, what: str = "file", wait: float = 0.0, holder: str | None = None
) -> Iterator[None]:
    """Hold the write lock of `path` for the block; CLIVizError when another process holds it past `wait` s.

    Re-entrant within a thread (a sweep holds the lock of its output while each chunk's append takes it
    again); other threads and processes wait or are refused. The outermost holder removes the lock file
    *before* unlocking, so no folder keeps `.NAME.lock` files; a waiter that then wins the unlinked file
    sees it unlinked and takes a fresh one (filelock >= 4 checks `st_nlink` after every `flock`).

    `holder` (e.g. "cliviz train") is recorded in `.NAME.holder` beside the lock while it is held, so
    that a refused process can say who holds the folder (process id, command, since when).
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
            f"{target} is being written by another cliviz process{_holder_text(lock_file)} (lock "
            f"{lock_file.name}); wait for it to finish, or write the {what} elsewhere"
        ) from None
    except OSError as e:
        raise CLIVizError(f"cannot write {what} {target}: {e.strerror or e}") from None
    holder_file = _holder_path(lock_file)
    if outermost and holder is not None:
        record = {"pid": os.getpid(), "command": holder, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            holder_file.write_text(json.dumps(record), encoding="utf-8")
        except OSError:
            pass  # the lock still holds; only the refusal's wording loses the holder's name
    try:
        yield
    finally:
        if outermost:
            for file in (holder_file, lock_file):
                try:
                    file.unlink()
                except OSError:
                    pass
        lock.release()


def _holder_path(lock_file: Path) -> Path:
    return lock_file.with_name(lock_file.name.removesuffix(".lock") + ".holder")


def _holder_text(lock_file: Path) -> str:
    """`" (process 123, cliviz train, since ...)"` from the holder record, or "" when there is none."""
    try:
        record = json.loads(_holder_path(lock_file).read_text(encoding="utf-8"))
        return f" (process {int(record['pid'])}, {record['command']}, since {record['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def write_error(err: OSError) -> str:
    """The words for a failed write; a full disk says so and that what was there before is kept."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device (the files written before are kept)"
    return err.strerror or str(err)


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """CLIVizError before a write of `needed` bytes into `folder` when the disk has less free (plus 5%)."""
    path = Path(folder)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return
    free = shutil.disk_usage(existing).free
    if free < needed * 1.05:
        raise CLIVizError(
            f"not enough space for the {what} in {path}: {needed / 2**20:,.1f} MiB needed, "
            f"{free / 2**20:,.1f} MiB free (the files written before are kept)"
        )


# Fault injection for the save paths' tests: CLIVIZ_FAULT="kill@N" sends SIGKILL to this process at
# the N-th file operation (1-based) of a save path, CLIVIZ_FAULT="enospc@N" raises "no space left"
# there, and CLIVIZ_FAULT_LOG=FILE appends each operation's name to FILE (how a test counts them).
_FAULT = {"count": 0}


def fault_point(operation: str) -> None:
    """Mark one file operation of a save path (see the comment above); free when no fault is asked for."""
    plan, log = os.environ.get("CLIVIZ_FAULT"), os.environ.get("CLIVIZ_FAULT_LOG")
    if plan is None and log is None:
        return
    _FAULT["count"] += 1
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{_FAULT['count']}\t{operation}\n")
    if plan is None:
        return
    kind, _, at = plan.partition("@")
    if at.isdigit() and int(at) == _FAULT["count"]:
        if kind == "kill":
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


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

"""A model folder is data, never code: refuse folders that ask transformers to import their own Python.

transformers runs a folder's `.py` files when one of its JSON files names a class through `auto_map`
(config, tokenizer, image processor, processor) and the caller passes `trust_remote_code=True` — or,
when the caller passes nothing, after asking "Do you wish to run the custom code? [y/N]" on stdin,
where a piped `yes` says y. cliviz refuses such folders before transformers reads them, passes
`trust_remote_code=False` to every `from_pretrained` it makes, and loads with stdin unreadable
(`no_stdin`), so no answer typed or piped can ever reach that prompt.
"""

from __future__ import annotations

import functools
import io
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cliviz.errors import CLIVizError

# The JSON files transformers consults for a class to import; `auto_map` in any of them is remote code.
CODE_BEARING_FILES = (
    "config.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "feature_extractor_config.json",
    "image_processor_config.json",
)
# Keys whose value names a class transformers resolves by name; an unknown name can only mean custom code.
CLASS_KEYS = (
    "tokenizer_class",
    "image_processor_type",
    "processor_class",
    "feature_extractor_type",
    "video_processor_type",
    "image_processor_class",
)
CODE_KEYS = ("auto_map", "custom_pipelines")
MAX_SIDE_FILE_BYTES = 64 * 1024 * 1024  # a tokenizer_config.json with an inline vocabulary stays far below


def refuse_remote_code(folder: Path) -> None:
    """CLIVizError when any JSON file of `folder` asks for code from the folder (or the hub)."""
    for name in CODE_BEARING_FILES:
        path = folder / name
        if not path.is_file():
            continue
        data = read_json_object(path)
        found = _code_request(data, name)
        if found:
            raise CLIVizError(
                f"model folder {folder} asks to run its own code ({found}); cliviz never runs code from a model folder"
            )


def read_json_object(path: Path, limit: int = MAX_SIDE_FILE_BYTES) -> dict[str, Any]:
    """A JSON file that must hold one object; CLIVizError naming the file otherwise."""
    data = read_bounded_json(path, limit, "a model side file")
    if not isinstance(data, dict):
        raise CLIVizError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_bounded_json(path: Path, limit: int, what: str) -> Any:
    """The JSON value in `path`, refusing files over `limit` bytes, non-UTF-8 text and nesting deep
    enough to exhaust the parser's recursion, each with one CLIVizError naming the file."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise CLIVizError(f"{path} is {size:,} bytes, too large for {what} (limit {limit:,})")
        text = path.read_text(encoding="utf-8")
    except PermissionError:
        raise CLIVizError(f"cannot read {path} (permission denied)") from None
    except UnicodeDecodeError:
        raise CLIVizError(f"{path} is not UTF-8 text") from None
    except OSError as err:
        raise CLIVizError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise CLIVizError(f"{path} is nested too deeply to be {what}") from None
    except json.JSONDecodeError as err:
        raise CLIVizError(f"{path} is not valid JSON ({err})") from None


def _code_request(data: Any, where: str) -> str | None:
    """`"auto_map in tokenizer_config.json"`-style description of the first request for code, or None.

    `auto_map` anywhere wins over an unknown class name, since it is what makes transformers import.
    """
    pairs = list(_walk(data))
    for key, value in pairs:
        if key in CODE_KEYS and value:
            return f"{key} in {where}"
    for key, value in pairs:
        if key in CLASS_KEYS and value is not None and not _known_class(value):
            return f"{key}={str(value)[:60]!r} in {where} is not a transformers class"
    return None


def _walk(data: Any, depth: int = 0) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of nested JSON objects, depth-first (nesting already bounded by the parser)."""
    if depth > 64:
        raise CLIVizError("a model side file is nested more than 64 levels deep")
    if isinstance(data, dict):
        for key, value in data.items():
            yield key, value
            yield from _walk(value, depth + 1)
    elif isinstance(data, list):
        for value in data:
            yield from _walk(value, depth + 1)


def _known_class(name: Any) -> bool:
    """True when `name` is a class name that transformers itself exports (with or without the Fast suffix).

    Looked up in the lazy module's listing, so nothing is imported to answer.
    """
    if not isinstance(name, str) or not name.isidentifier() or not name[:1].isupper():
        return False
    exported = _transformers_names()
    return any(candidate in exported for candidate in (name, name.removesuffix("Fast")))


@functools.lru_cache(maxsize=1)
def _transformers_names() -> frozenset[str]:
    import transformers

    return frozenset(dir(transformers))


@contextmanager
def no_stdin() -> Iterator[None]:
    """Make stdin read as empty while transformers loads: any prompt it might show gets EOF, not a `y`."""
    saved = sys.stdin
    sys.stdin = io.StringIO("")
    try:
        yield
    finally:
        sys.stdin = saved

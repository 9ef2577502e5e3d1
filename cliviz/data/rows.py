"""One bounded, typed parser for the rows every data reader takes (`eval`, `compare`, `sweep`,
`probe-layers`, `train`): a row from a file is hostile until checked.

What a row may not do, and the `BadRow` reason it is skipped and counted under:
- nest deeper than `MAX_JSON_DEPTH` (`too_deep`): Python's JSON decoder recurses and a streaming
  builder grows without bound on a line nested 100,000 deep;
- hold a field of the wrong type (`malformed_row`): a list where a string belongs;
- hold text the tokenizer cannot take (`bad_text`): lone surrogates (`"\\ud800"` is valid JSON but
  not encodable text) and control characters other than tab and newline;
- name an image the file system cannot (`bad_image_name`: longer than `MAX_NAME_BYTES` per part or
  `MAX_PATH_BYTES` in all) or one outside its image folder (`outside_image_folder`: `..`, an absolute
  path, or a symlink inside the folder that points out; checked on the resolved path before any
  file is opened). `allow_absolute=True` admits absolute paths for data sets that store them.
Images themselves go through `cliviz.inputs.load_image` (pixel limit against decompression bombs).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, overload

import ijson

from cliviz.data.conversations import BadRow

MAX_JSON_DEPTH = 32  # LLaVA rows nest 3 deep; datasets' structs a few more
MAX_NAME_BYTES = 255  # one path component (NAME_MAX on Linux and macOS)
MAX_PATH_BYTES = 1024
_BAD_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def json_row(raw: bytes | str) -> Any:
    """One JSON value (a JSONL line); `BadRow` when it is not JSON or nests too deep."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise BadRow("too_deep", f"nested deeper than {MAX_JSON_DEPTH}") from None
    except ValueError as err:
        raise BadRow("malformed_json", str(err).splitlines()[0] if str(err) else "") from None
    check_depth(value)
    return value


def check_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """`BadRow("too_deep")` when containers in `value` nest deeper than `limit` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            raise BadRow("too_deep", f"nested deeper than {limit}")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


class TooDeep:
    """Stands for a JSON list item that nested too deep: one bad row; the list goes on after it."""


def bounded_list_items(stream, limit: int = MAX_JSON_DEPTH):
    """The items of a top-level JSON list, streamed (ijson events); an item nested deeper than `limit`
    is never built (memory stays flat) and comes out as a `TooDeep` marker."""
    from ijson.common import ObjectBuilder

    depth, builder, too_deep = 0, None, False
    for event, value in ijson.basic_parse(stream, use_float=True):  # no prefixes: they grow with the depth
        opens, closes = event in ("start_map", "start_array"), event in ("end_map", "end_array")
        if depth == 1 and not opens and not closes:
            yield value  # a scalar item
            continue
        if opens:
            depth += 1
            if depth == 2:
                builder, too_deep = ObjectBuilder(), False
            elif depth > limit + 1 and not too_deep:
                builder, too_deep = None, True  # drop what was built: nothing of this item is kept
        if builder is not None and depth >= 2:
            builder.event(event, value)
        if closes:
            depth -= 1
            if depth == 1:
                if too_deep:
                    yield TooDeep()
                else:
                    assert builder is not None  # set when this item opened at depth 2 and not dropped
                    yield builder.value
                builder = None


@overload
def text(value: Any, field: str, required: Literal[True] = ...) -> str: ...
@overload
def text(value: Any, field: str, required: bool) -> str | None: ...


def text(value: Any, field: str, required: bool = True) -> str | None:
    """A string field: `malformed_row` when absent (if required) or not a string, `bad_text` when the
    tokenizer could not take it."""
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise BadRow("malformed_row", f"{field} is {type(value).__name__}, not a string")
    check_text(value, field)
    return value


def check_text(value: str, field: str = "text") -> None:
    bad = _BAD_TEXT.search(value)
    if bad is not None:
        raise BadRow("bad_text", f"{field} holds U+{ord(bad.group()):04X} at character {bad.start() + 1}")


def image_path(name: Any, root: Path, allow_absolute: bool = False) -> Path:
    """The file an image field names, resolved (symlinks followed) and inside `root`; `BadRow` otherwise.

    Nothing is opened here: the name is checked as text, then resolved (which reads links, never files).
    """
    if not isinstance(name, str) or not name.strip():
        raise BadRow("malformed_row", "the image is not a file name")
    name = name.strip()
    check_text(name, "the image name")
    encoded = name.encode("utf-8")
    parts = [len(p.encode("utf-8")) for p in Path(name).parts]
    if len(encoded) > MAX_PATH_BYTES or (parts and max(parts) > MAX_NAME_BYTES):
        raise BadRow("bad_image_name", f"{len(encoded)} bytes")
    candidate = Path(name)
    if candidate.is_absolute() and not allow_absolute:
        raise BadRow("outside_image_folder", "an absolute path (--allow-absolute-image-paths admits them)")
    try:
        resolved = (root / candidate).resolve()
        base = root.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop, a name the OS refuses
        raise BadRow("bad_image_name", str(err)) from None
    if not candidate.is_absolute() and not resolved.is_relative_to(base):
        raise BadRow("outside_image_folder", name)
    return resolved


def reason_counts_text(skipped: dict[str, int], top: int = 3) -> str:
    """`"missing_image 40, bad_text 2"`: the commonest skip reasons, for one error or summary line."""
    common = sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return ", ".join(f"{name} {count:,}" for name, count in common)

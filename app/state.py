"""What lives in the browser: the per-user state of the dashboard, as plain JSON.

Every user (browser tab) keeps its own state in `dcc.Store` components; the server keeps none.
The stores and their payloads:

- ``image-store``: the chosen picture — ``{"name", "data", "preview"}`` where ``data`` is the
  uploaded file's bytes (base64, already validated by `cliviz.inputs.load_image`) and ``preview``
  a small PNG data URL for display. Bundled examples are sent as bytes too: the server never
  takes a file-system path from the client.
- ``trace-store``: the last answer — ``{"trace": Trace.to_dict(), "image": <image-store>}``, so
  clicking a token re-draws the heatmap from the stored gates without re-running the model, and
  ablations / attributions run on the very image and question that were asked.
- ``selection-store``: ``"answer"`` (all answer tokens) or an integer answer step.
- ``ablation-store``: the last ablated cell, ``{"llm_layer", "vision_layer"}`` (real indices).
- ``attr-store``: attribution figures (plotly JSON) per answer step, computed once per answer.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from cliviz.errors import CLIVizError
from cliviz.inputs import load_image
from cliviz.tracing.schema import Trace, TraceMeta
from cliviz.tracing.traceset import NUMERIC_ARRAYS

MAX_UPLOAD_BYTES = 5 * 1024 * 1024  # 5 MB per image
# Decoded pixels per upload. A few KB of PNG can hold a 40-megapixel image (160 MB decoded); no model
# here reads more than a few hundred pixels a side, so uploads are shrunk to this on arrival.
MAX_SIDE = 1024
# Uploads decoded at once, by every user together: the full-size decode is the one step whose memory
# grows with the image, so it is what the server bounds (20 users uploading together queue here).
# The decodes run on a pool of that many threads, not on the request threads: glibc gives each thread
# its own malloc arena and keeps what a large decode freed there, so decodes spread over every request
# thread (a new one per request) left ~160 MB behind in each arena (50 uploads of 6300 x 6300: +800 MB
# peak in-process, +1.45 GB in the server); on two fixed threads the freed memory is reused.
DECODE_SLOTS = 2
_DECODER = ThreadPoolExecutor(max_workers=DECODE_SLOTS, thread_name_prefix="cliviz-decode")  # a resource bound
PREVIEW_PIXELS = 256  # longest side of the on-page preview
ALL_TOKENS = "answer"  # selection value for "every answer token"

_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?:;[^,]*)?;base64,(?P<data>.*)$", re.DOTALL)


def safe_name(filename: str | None) -> str:
    """A display label from a client-sent file name: base name only, printable, short."""
    name = re.split(r"[\\/]", filename if isinstance(filename, str) and filename else "upload")[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:80]
    return name or "upload"


def decode_upload(contents: str, filename: str | None = None) -> tuple[bytes, Image.Image]:
    """`dcc.Upload` contents (a base64 data URL) -> (bytes to keep, RGB image); CLIVizError on bad input.

    The image is at most `MAX_SIDE` pixels a side; when the upload was larger, the bytes to keep are
    that shrunken image as PNG (so every later request decodes the small picture, not the upload).
    """
    name = safe_name(filename)
    if contents is not None and not isinstance(contents, str):
        raise CLIVizError(f"{name}: the upload did not arrive as a file (expected a base64 data URL)")
    match = _DATA_URL.match(contents or "")
    if match is None:
        raise CLIVizError(f"{name}: the upload did not arrive as a file (expected a base64 data URL)")
    b64 = match.group("data")
    approx = len(b64) * 3 // 4
    if approx > MAX_UPLOAD_BYTES + 3:
        raise CLIVizError(f"{name} is too large ({approx / 1e6:.1f} MB, limit {MAX_UPLOAD_BYTES / 1e6:.0f} MB)")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise CLIVizError(f"{name}: the upload is not valid base64") from None
    if len(raw) > MAX_UPLOAD_BYTES:
        raise CLIVizError(f"{name} is too large ({len(raw) / 1e6:.1f} MB, limit {MAX_UPLOAD_BYTES / 1e6:.0f} MB)")
    if not raw:
        raise CLIVizError(f"{name} is empty")
    image, shrunk = decode_bounded(raw, name)
    if shrunk:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        raw = buf.getvalue()
    return raw, image


def decode_bounded(raw: bytes, name: str) -> tuple[Image.Image, bool]:
    """(RGB image of at most `MAX_SIDE` pixels a side, whether it was shrunk), decoded in one of
    `DECODE_SLOTS`: never more than that many full-size decodes in memory at once."""
    image = _DECODER.submit(_decode_and_trim, raw, name).result()
    return image, max(image.size) == MAX_SIDE and _larger_than(raw, MAX_SIDE)


def _decode_and_trim(raw: bytes, name: str) -> Image.Image:
    """`load_image` bounded to `MAX_SIDE`, then the freed full-size decode handed back to the OS
    (glibc's `malloc_trim`; elsewhere the allocator keeps it for the next decode, still bounded)."""
    try:
        return load_image(raw, name=name, max_side=MAX_SIDE)
    finally:
        _trim()


def _trim() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _larger_than(raw: bytes, side: int) -> bool:
    """Whether the encoded image is more than `side` pixels on its longest side (header only)."""
    try:
        with Image.open(io.BytesIO(raw)) as header:
            return max(header.size) > side
    except Exception:  # noqa: BLE001 - load_image has accepted these bytes already
        return False


def preview_url(image: Image.Image) -> str:
    """A small PNG data URL of `image` for the page (nearest-neighbour: pixels stay visible)."""
    img = image.copy()
    scale = PREVIEW_PIXELS / max(img.size)
    if scale < 1:
        img.thumbnail((PREVIEW_PIXELS, PREVIEW_PIXELS))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_payload(name: str, raw: bytes, image: Image.Image) -> dict[str, str]:
    return {"name": name, "data": base64.b64encode(raw).decode("ascii"), "preview": preview_url(image)}


def image_from_payload(payload: dict[str, Any]) -> Image.Image:
    """The RGB image back from an image-store payload (validated again: the store is client data)."""
    try:
        raw = base64.b64decode(payload["data"], validate=True)
    except (KeyError, TypeError, AttributeError, binascii.Error, ValueError):
        raise CLIVizError("the stored image is unreadable; choose the image again") from None
    if len(raw) > MAX_UPLOAD_BYTES:
        raise CLIVizError("the stored image is too large; choose the image again")
    return decode_bounded(raw, safe_name(payload.get("name")))[0]


# ------------------------------------------------------------------------------- traces as JSON


def trace_from_dict(d: dict[str, Any]) -> Trace:
    """Inverse of `Trace.to_dict()`; CLIVizError when the stored trace is malformed."""
    try:
        meta = TraceMeta(**d["meta"])
        arrays = {}
        for name, (dtype, _, ndim) in NUMERIC_ARRAYS.items():  # the trace set's dtypes and ranks
            ndim = ndim or 1
            arr = np.asarray(d[name], dtype=dtype)
            if arr.ndim != ndim:  # empty lists lose their trailing dimensions
                if arr.size:
                    raise ValueError(f"{name} has {arr.ndim} dimensions, expected {ndim}")
                # a model without gates (fusion=projector) has [0, n_tokens, K] gates: JSON keeps only []
                n_layers, n_tokens = len(meta.injection_layers), len(d["token_ids"])
                shape = {"gates": (n_layers, n_tokens, len(meta.vision_layers)), "injection_norm": (n_layers, n_tokens)}
                arr = arr.reshape(shape.get(name, (0,) * ndim))
            arrays[name] = arr
        trace = Trace(
            meta=meta,
            token_texts=list(d["token_texts"]),
            token_roles=list(d["token_roles"]),
            answer_texts=list(d["answer_texts"]),
            topk_texts=[list(r) for r in d["topk_texts"]],
            attributions={k: np.asarray(v, dtype=np.float32) for k, v in (d.get("attributions") or {}).items()},
            **arrays,
        )
        trace.validate()
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
        raise CLIVizError(f"the stored answer is malformed ({err}); ask again") from None
    return trace


def parse_selection(selection: Any, n_answer: int) -> str | int:
    """Store value -> `"answer"` or a valid answer step (out-of-range steps fall back to all)."""
    if isinstance(selection, (int, np.integer)) and not isinstance(selection, bool) and 0 <= selection < n_answer:
        return int(selection)
    return ALL_TOKENS


def parse_cell(click: dict[str, Any] | None) -> tuple[int, int] | None:
    """Heatmap `clickData` -> (llm_layer, vision_layer) in the model's real indices, from the
    axis labels `L{i}` / `V{k}` that `heatmap_figure` draws."""
    try:
        point = click["points"][0]
        y, x = str(point["y"]), str(point["x"])
        if not (y.startswith("L") and x.startswith("V")):
            return None
        return int(y[1:]), int(x[1:])
    except (TypeError, KeyError, IndexError, ValueError):
        return None

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
from typing import Any

import numpy as np
from PIL import Image

from cliviz.errors import CLIVizError
from cliviz.inputs import load_image
from cliviz.tracing.trace import Trace, TraceMeta
from cliviz.tracing.traceset import NUMERIC_ARRAYS

MAX_UPLOAD_BYTES = 5 * 1024 * 1024  # 5 MB per image
PREVIEW_PIXELS = 256  # longest side of the on-page preview
ALL_TOKENS = "answer"  # selection value for "every answer token"

_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?:;[^,]*)?;base64,(?P<data>.*)$", re.DOTALL)


def safe_name(filename: str | None) -> str:
    """A display label from a client-sent file name: base name only, printable, short."""
    name = re.split(r"[\\/]", filename or "upload")[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:80]
    return name or "upload"


def decode_upload(contents: str, filename: str | None = None) -> tuple[bytes, Image.Image]:
    """`dcc.Upload` contents (a base64 data URL) -> (raw bytes, RGB image); CLIVizError on bad input."""
    name = safe_name(filename)
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
    return raw, load_image(raw, name=name)


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
    except (KeyError, TypeError, binascii.Error, ValueError):
        raise CLIVizError("the stored image is unreadable; choose the image again") from None
    if len(raw) > MAX_UPLOAD_BYTES:
        raise CLIVizError("the stored image is too large; choose the image again")
    return load_image(raw, name=safe_name(payload.get("name")))


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
                n_layers = len(meta.injection_layers)
                shape = {"gates": (n_layers, 0, len(meta.vision_layers)), "injection_norm": (n_layers, 0)}
                arr = arr.reshape(shape.get(name, (0,) * ndim))
            arrays[name] = arr
        trace = Trace(
            meta=meta, token_texts=list(d["token_texts"]), token_roles=list(d["token_roles"]),
            answer_texts=list(d["answer_texts"]), topk_texts=[list(r) for r in d["topk_texts"]],
            attributions={k: np.asarray(v, dtype=np.float32) for k, v in (d.get("attributions") or {}).items()},
            **arrays,
        )
        trace.validate()
    except (KeyError, TypeError, ValueError) as err:
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

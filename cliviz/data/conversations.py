"""One image and a multi-turn dialogue about it: the record every training source yields.

Sources (`cliviz.data.sources`) read rows as researchers have them — the LLaVA instruction
format, Parquet/Arrow tables, the project's own ShapesVQA folders — and turn each row into a
`Conversation`, or raise `BadRow` with one of the `REASONS`; the loader counts those and goes on,
so one broken row never stops a run halfway through.

A `Conversation` is normalised the way LLaVA's own `preprocess_multimodal` does it: the image
belongs to the first user turn (wherever the row wrote `<image>`), and no turn text holds the
`<image>` marker any more; collators put the model's image token where its prompt format wants it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cliviz.errors import CLIVizError
from cliviz.inputs import load_image

IMAGE_MARKER = "<image>"  # what LLaVA-format data writes where the image goes
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Why a row was skipped: name -> what it means (the summary prints the names, the docs the meanings).
REASONS = {
    "malformed_json": "not valid JSON (a JSONL line, or the rest of a JSON list after a syntax error)",
    "malformed_row": "valid JSON but not a {'conversations': [{'from', 'value'}, ...]} record",
    "wrong_roles": "turns are not (system,) user, assistant, user, assistant, ... ending with an answer",
    "no_image": "the row names no image (a text-only row)",
    "multiple_images": "the row names more than one image",
    "no_image_token": "the first user turn has no <image>",
    "extra_image_tokens": "<image> appears more than once in the conversation",
    "empty_answer": "an assistant turn is empty",
    "missing_image": "the image file does not exist",
    "unreadable_image": "the image cannot be decoded (corrupt, truncated, too large, not an image)",
    "unknown_words": "a word-level model's vocabulary lacks a word of the conversation (never trained as [UNK])",
    "too_deep": "the JSON row nests deeper than the reader's limit",
    "bad_text": "a turn holds text no tokenizer takes (a lone surrogate, a control character)",
    "bad_image_name": "the image's file name is longer than a file system allows",
    "outside_image_folder": "the image path leaves the image folder (.., an absolute path, an outward symlink)",
    "template_mismatch": "the chat template renders the conversation so that its turns cannot be told apart",
    "too_long": "not even the image and the first answer fit the maximum length",
}


class BadRow(Exception):
    """A row that cannot become a training sample; `reason` is a key of `REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


ImageRef = str | Path | bytes | Image.Image


@dataclass(frozen=True)
class Conversation:
    """`turns` are `(role, text)` with role in system/user/assistant: an optional system turn, then
    user/assistant pairs ending with an answer. The image goes with the first user turn.

    `image` is a path, encoded bytes, or an already decoded RGB image (generated ShapesVQA scenes);
    `extra` holds per-sample arrays the batch carries along (ShapesVQA's per-patch labels).
    """

    id: str
    image: ImageRef
    turns: tuple[tuple[str, str], ...]
    extra: dict[str, np.ndarray] = field(default_factory=dict, compare=False)

    def pairs(self) -> list[tuple[str, str]]:
        """`(question, answer)` per exchange, system turn left out."""
        body = [text for role, text in self.turns if role != "system"]
        return list(zip(body[0::2], body[1::2]))


def checked_turns(raw_turns: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Validate roles, `<image>` markers and answers; return the turns with the marker removed.

    Raises `BadRow` (wrong_roles, no_image_token, extra_image_tokens, empty_answer).
    """
    roles = [role for role, _ in raw_turns]
    body = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user", "assistant"] * (len(body) // 2)
    if not body or body != expected:
        raise BadRow("wrong_roles", " ".join(roles) or "no turns")
    markers = sum(text.count(IMAGE_MARKER) for _, text in raw_turns)
    first_user = next(text for role, text in raw_turns if role == "user")
    if markers > 1:
        raise BadRow("extra_image_tokens", f"{markers} markers")
    if IMAGE_MARKER not in first_user:
        raise BadRow("no_image_token")
    if any(role == "assistant" and not text.strip() for role, text in raw_turns):
        raise BadRow("empty_answer")
    return tuple((role, text.replace(IMAGE_MARKER, "").strip()) for role, text in raw_turns)


def conversation_from_llava_row(row: Any, fallback_id: str, resolve_image) -> Conversation:
    """A LLaVA instruction row `{"id", "image", "conversations": [{"from", "value"}, ...]}`.

    `resolve_image(value)` turns the row's `image` field (a relative path, bytes, or a `datasets`
    Image struct) into an `ImageRef`; it returns None when there is no image.
    """
    if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
        raise BadRow("malformed_row", "no conversations list")
    from cliviz.data.rows import check_text

    raw_turns = []
    for turn in row["conversations"]:
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise BadRow("malformed_row", "a turn is not {'from': str, 'value': str}")
        check_text(turn["value"], "a turn")
        role = ROLES.get(turn["from"].strip().lower())
        if role is None:
            raise BadRow("wrong_roles", f"unknown role {turn['from']!r}")
        raw_turns.append((role, turn["value"]))
    image = row.get("image")
    if isinstance(image, (list, tuple)):  # some exports write a one-element list
        if len(image) > 1:
            raise BadRow("multiple_images", f"{len(image)} images")
        image = image[0] if image else None
    ref = resolve_image(image) if image is not None else None
    if ref is None:
        raise BadRow("no_image")
    turns = checked_turns(raw_turns)
    row_id = row.get("id")
    return Conversation(str(row_id) if row_id is not None else fallback_id, ref, turns)


def load_conversation_image(conversation: Conversation, max_side: int | None = None) -> Image.Image:
    """The conversation's image as RGB, through the project's safe loader; `BadRow` if absent or broken.

    `max_side` bounds the decoded image's longest side (shrunk while decoding, see `load_image`), so a
    6300 x 6300 file costs what the processor's own size costs, not its full size four times over."""
    ref = conversation.image
    if isinstance(ref, Image.Image):
        return ref if ref.mode == "RGB" else ref.convert("RGB")
    if not isinstance(ref, bytes):
        path = Path(ref)
        try:
            exists = path.is_file()
        except OSError as err:  # a name the file system refuses (too long)
            raise BadRow("bad_image_name", err.strerror or str(err)) from None
        if not exists:
            raise BadRow("missing_image", str(path))
    try:
        name = None if not isinstance(ref, bytes) else f"image of {conversation.id}"
        return load_image(ref, name=name, max_side=max_side)
    except CLIVizError as err:
        raise BadRow("unreadable_image", str(err)) from None

"""The checks at the boundary of every public function: one place, one message per bad argument.

The Python API (`cliviz.trace`, `trace_batch`, `ask`, `ablate`, `attribute`, `load_model`,
`load_image`, `TraceSet.read` and `TraceSet[i]`), the command line and the dashboard run these
checks before any work, so one bad value gives the same one-line `CLIVizError`, naming the
argument, on every surface (the command line names its flag, `--max-new-tokens`, where Python
names the keyword). What the values themselves may be (image files, question text) is decided in
`cliviz.inputs`; `check_request` joins the two for a model.

This module imports only the standard library at load time: the command line runs some checks
before torch is imported. Checks that need a model import it when called.
"""

from __future__ import annotations

import numbers
import os
import sys
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliviz.errors import CLIVizError, CLIVizIndexError, CLIVizWarning

MAX_NEW_TOKENS = 1024  # the longest answer cliviz records (docs/design.md: answers up to 1024 tokens)
MAX_TOP_K = 1000  # alternatives stored per answer token: far more than any display or analysis reads
NAME_MAX = 255  # longest file name (one path component) on the file systems cliviz runs on


def shown(value: Any, limit: int = 40) -> str:
    """A short, printable rendering of a bad value for a message: `-1`, `str '2'`, `float 2.5`, `None`."""
    if value is None or (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
        text = repr(value if value is None else int(value))
    else:
        text = (
            f"{type(value).__name__} {value!r}"
            if isinstance(value, (str, bytes, float, bool))
            else type(value).__name__
        )
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_int(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int (numpy integers included; bools, floats and strings refused) within [low, high]."""
    bounds = (
        f" in {low}..{high}"
        if low is not None and high is not None
        else f" >= {low}"
        if low is not None
        else f" <= {high}"
        if high is not None
        else ""
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CLIVizError(f"{name} must be an integer{bounds}, got {shown(value)}")
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise CLIVizError(f"{name} must be an integer{bounds}, got {number}")
    return number


def check_max_new_tokens(value: Any, name: str = "max_new_tokens") -> int | None:
    """The answer length limit: None (the model's default) or 1..`MAX_NEW_TOKENS`."""
    return None if value is None else check_int(value, name, 1, MAX_NEW_TOKENS)


def check_top_k(value: Any, vocab_size: int, name: str = "top_k") -> int:
    """How many alternatives to record per answer token: 1..min(`MAX_TOP_K`, vocabulary size)."""
    return check_int(value, name, 1, max(1, min(MAX_TOP_K, int(vocab_size))))


def check_flag(value: Any, name: str) -> bool:
    """A yes/no argument: `True` or `False` (numpy bools too), never a truthy string."""
    if type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise CLIVizError(f"{name} must be True or False, got {shown(value)}")


def check_text(value: Any, name: str, *, optional: bool = False) -> str | None:
    """A str argument (None allowed when `optional`)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise CLIVizError(f"{name} must be text (str){' or None' if optional else ''}, got {shown(value)}")
    return value


def check_path(value: Any, name: str, what: str) -> Path:
    """A path argument (str or `os.PathLike`) as a `Path`: no file-system access, so no OS error leaks out.

    `what` says what the path should lead to ("an image file", "a trace file").
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise CLIVizError(f"{name} must be a str or Path naming {what}, got {shown(value)}")
    if not value.strip():
        raise CLIVizError(f"{name} is an empty path; give the path to {what}")
    if "\x00" in value:
        raise CLIVizError(f"{name} holds a NUL character, which no path can contain")
    longest = max((len(part.encode("utf-8", "surrogateescape")) for part in Path(value).parts), default=0)
    if longest > NAME_MAX:
        raise CLIVizError(
            f"{name} has a file name of {longest} bytes; file systems allow {NAME_MAX} ({shown(value, 60)})"
        )
    return Path(value)


def check_batch(values: Any, name: str, what: str) -> list:
    """A non-empty list or tuple (a lone str is not a list of questions: it would be one per character)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise CLIVizError(f"{name} must be a list of {what}, got {shown(values)}")
    if len(values) == 0:
        raise CLIVizError(f"{name} is empty: give at least one")
    return list(values)


def check_optional_list(values: Any, name: str, n: int, what: str) -> list | None:
    """None, or a list of `n` entries that are each text or None (question types, references, sample ids)."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise CLIVizError(f"{name} must be a list of {what} (or None), got {shown(values)}")
    if len(values) != n:
        raise CLIVizError(f"{name} has {len(values)} entries for {n} questions")
    for i, item in enumerate(values):
        check_text(item, f"{name}[{i}]", optional=True)
    return list(values)


def check_model_pair(model: Any, tokenizer: Any) -> None:
    """`(model, tokenizer)` as `cliviz.load_model` returns them, and belonging together.

    A tokenizer from another model is caught where it would do harm: more tokens than the model has
    embeddings, or an image placeholder with another id than the model's.
    """
    from transformers import PreTrainedTokenizerBase

    from cliviz.model.modeling import CLIForConditionalGeneration

    if isinstance(model, PreTrainedTokenizerBase) and isinstance(tokenizer, CLIForConditionalGeneration):
        raise CLIVizError("model and tokenizer are swapped: pass (model, tokenizer), as cliviz.load_model returns them")
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], CLIForConditionalGeneration):
        raise CLIVizError("model is the (model, tokenizer) pair itself: unpack it, `model, tok = cliviz.load_model()`")
    if not isinstance(model, CLIForConditionalGeneration):
        raise CLIVizError(f"model must be a cliviz model (from cliviz.load_model), got {shown(model)}")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise CLIVizError(f"tokenizer must be the model's tokenizer (from cliviz.load_model), got {shown(tokenizer)}")
    rows = int(model.get_input_embeddings().num_embeddings)  # type: ignore[arg-type]
    if len(tokenizer) > rows:
        raise CLIVizError(
            f"tokenizer does not belong to this model: it has {len(tokenizer)} tokens, the model embeds {rows}"
        )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_id is not None and image_id != tokenizer.unk_token_id and image_id != model.image_token_id:
        raise CLIVizError(
            f"tokenizer does not belong to this model: its <image> token is {image_id}, "
            f"the model's image token {model.image_token_id}"
        )


def check_layer(value: Any, name: str, layers: Sequence[int], what: str) -> int:
    """A real layer index that the model has (`what`: "injection layers" or "vision layers")."""
    index = check_int(value, name)
    if index not in layers:
        raise CLIVizError(f"{name} {index} is not one of this model's {what} ({', '.join(map(str, layers))})")
    return index


def check_trace(value: Any, name: str = "trace", *, optional: bool = False):
    """A `cliviz.Trace` (None allowed when `optional`)."""
    from cliviz.tracing.schema import Trace

    if value is None and optional:
        return None
    if not isinstance(value, Trace):
        raise CLIVizError(
            f"{name} must be a cliviz Trace (from cliviz.trace){' or None' if optional else ''}, got {shown(value)}"
        )
    return value


def check_trace_index(index: Any, n: int) -> int | slice:
    """`TraceSet[index]`: a slice as given, an integer as a non-negative row number.

    Out of range stays an `IndexError` (`CLIVizIndexError`), as Python's own containers raise,
    with the valid range in the message.
    """
    if isinstance(index, slice):
        return index
    number = check_int(index, "trace index")
    if not -n <= number < n:
        valid = "the set is empty" if n == 0 else f"valid: 0..{n - 1}, or -{n}..-1"
        raise CLIVizIndexError(f"trace index {number} is out of range: the set holds {n} traces ({valid})")
    return number % n


# ------------------------------------------------------------------------------ one request


@dataclass(frozen=True)
class Request:
    """An (image, question) that passed every check for one model, with the warnings it carries."""

    image: Any  # PIL.Image.Image, RGB
    question: str  # normalised as the model reads it (see `cliviz.inputs.check_model_question`)
    warnings: tuple[str, ...] = ()


def check_request(model: Any, tokenizer: Any, image: Any, question: Any) -> Request:
    """The one checked input path: the model pair, the image (a path is loaded), the question
    (normalised and checked against the tokenizer) and the warnings the answer should carry."""
    from cliviz.inputs import as_image, check_model_question, input_warnings

    check_model_pair(model, tokenizer)
    picture = as_image(image, "image")
    text = check_model_question(question, tokenizer)
    return Request(picture, text, tuple(input_warnings(picture, tokenizer)))


def check_requests(model: Any, tokenizer: Any, images: Any, questions: Any) -> list[Request]:
    """`check_request` for a batch: two lists of the same length, each entry named in its message."""
    check_model_pair(model, tokenizer)
    images = check_batch(images, "images", "images (PIL images, arrays or paths)")
    questions = check_batch(questions, "questions", "questions (str)")
    if len(images) != len(questions):
        raise CLIVizError(f"images and questions differ in length ({len(images)} images, {len(questions)} questions)")
    from cliviz.inputs import as_image, check_model_question, input_warnings

    requests = []
    for i, (image, question) in enumerate(zip(images, questions)):
        try:
            picture = as_image(image, "image")
        except CLIVizError as err:
            raise CLIVizError(f"images[{i}]: {err}") from None
        try:
            text = check_model_question(question, tokenizer)
        except CLIVizError as err:
            raise CLIVizError(f"questions[{i}]: {err}") from None
        requests.append(Request(picture, text, tuple(input_warnings(picture, tokenizer))))
    return requests


def warn(messages: Sequence[str]) -> None:
    """Each distinct message as a `CLIVizWarning`, attributed to the caller's own line (the first
    frame outside cliviz and torch's decorators); the command line prints it as one `warning:` line."""
    frame: types.FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and str(frame.f_globals.get("__name__", "")).split(".")[0] in ("cliviz", "torch"):
        frame, level = frame.f_back, level + 1
    for message in dict.fromkeys(messages):
        warnings.warn(message, CLIVizWarning, stacklevel=level)

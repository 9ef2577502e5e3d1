"""What users hand us — images and questions — decoded and checked, with one-line errors.

The same loader and question rules serve the command line, the Python API and the dashboard
(`cliviz.arguments.check_request` applies them for a model). The question rule, the same on
every surface: whitespace collapsed; empty, over-long, undecodable or control-character text
refused; for word-level tokenizers (the bundled models) words outside the vocabulary refused
and a missing final " ?" added; for subword tokenizers typed special tokens refused.
"""

from __future__ import annotations

import io
import os
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cliviz.arguments import check_path, shown
from cliviz.errors import CLIVizError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MAX_PIXELS = 40_000_000  # far above any real photo we need; stops decompression bombs before decoding
MAX_QUESTION_CHARS = 400
MAX_QUESTION_WORDS = 48
QUESTION_MARK = "?"
_SURROGATES = ("\ud800", "\udfff")
BACKGROUND = (24, 24, 28)  # transparent pixels become the ShapesVQA background


def load_image(
    source: str | os.PathLike | bytes | Image.Image | np.ndarray, name: str | None = None, max_side: int | None = None
) -> Image.Image:
    """Any image a user hands us, as 8-bit RGB; `CLIVizError` with one line on bad input.

    `source`: a path to any PIL-readable file, its bytes (a dashboard upload), a PIL image, or a
    numpy array `[height, width]` or `[height, width, 3 | 4]` (uint8 0..255, or float 0..1).
    `max_side` (the dashboard's uploads) bounds the result to that many pixels on its longest side, and
    shrinks as early as the format allows: JPEGs decode straight at a reduced scale (`draft`), other
    formats are reduced right after decoding, before the conversions that would copy them at full size.
    Example::

        from cliviz import load_image
        import numpy as np
        load_image("assets/examples/color.png").size                   # (64, 64)
        load_image(np.zeros((8, 8, 3), dtype=np.uint8)).mode           # 'RGB'
    """
    if isinstance(source, Image.Image):
        return _from_pil(source, name or "image", max_side)
    if isinstance(source, np.ndarray):
        return _from_pil(_from_array(source, name or "image"), name or "image", max_side)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(source)), name or "upload", max_side)
    if not isinstance(source, (str, os.PathLike)):
        raise CLIVizError(
            f"{name or 'image'} must be a path to an image file, its bytes, a PIL image or a numpy array, "
            f"got {shown(source)}"
        )
    path = check_path(source, name or "image", "an image file")
    label = name or str(source)
    if not path.exists():
        raise CLIVizError(f"image not found: {label}")
    if not path.is_file():
        raise CLIVizError(f"not a file: {label}")
    return _decode(path, label, max_side)


def as_image(value: object, name: str = "image") -> Image.Image:
    """What the model runs take: an RGB PIL image, used as it is when it already is one (no copy);
    anything else through `load_image`."""
    if isinstance(value, Image.Image) and value.mode == "RGB":
        _check_size(value.width, value.height, name)
        return value
    return load_image(value, name=name if not isinstance(value, (str, os.PathLike)) else None)  # type: ignore[arg-type]


def _check_size(width: int, height: int, label: str) -> None:
    if width * height == 0:
        raise CLIVizError(f"{label} is empty ({width}x{height} pixels)")
    if width * height > MAX_PIXELS:
        raise CLIVizError(f"image too large: {label} is {width}x{height} (limit {MAX_PIXELS:,} pixels)")


def _decode(stream: io.BytesIO | Path, label: str, max_side: int | None) -> Image.Image:
    """Open, verify, shrink (when asked) and convert a file or upload."""
    try:
        with Image.open(stream) as image:
            width, height = image.size
            _check_size(width, height, label)
            return _from_pil(image, label, max_side)
    except CLIVizError:
        raise
    except Image.DecompressionBombError:
        raise CLIVizError(
            f"image too large: {label} claims more pixels than any image may have "
            f"(limit {MAX_PIXELS:,}; a decompression bomb)"
        ) from None
    except UnidentifiedImageError as err:
        raise CLIVizError(f"not a readable image: {label} ({type(err).__name__})") from None
    except PermissionError:
        raise CLIVizError(f"cannot read image (permission denied): {label}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise CLIVizError(f"corrupt or truncated image: {label} ({err})") from None


def _from_pil(image: Image.Image, label: str, max_side: int | None) -> Image.Image:
    """A PIL image (opened lazily or in memory): size checked, pixels loaded, shrunk, RGB."""
    _check_size(*image.size, label)
    try:
        if max_side is not None and max(image.size) > max_side:
            image.draft("RGB" if image.mode not in ("L", "1") else "L", (max_side, max_side))  # JPEG only
        image.load()
        if max_side is not None:
            image = shrink(image, max_side)
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise CLIVizError(f"corrupt or truncated image: {label} ({err})") from None


def _from_array(array: np.ndarray, label: str) -> Image.Image:
    """`[H, W]` or `[H, W, 1 | 3 | 4]` pixels (integers in 0..255, floats in 0..1, bools) as a PIL image."""
    a = array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        shape = tuple(array.shape)
        raise CLIVizError(f"{label} must be an array of shape [height, width] or [height, width, 3 or 4], got {shape}")
    _check_size(a.shape[1], a.shape[0], label)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise CLIVizError(f"{label} holds NaN or infinite pixel values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 1:
            raise CLIVizError(
                f"{label} has float pixels in {lo:g}..{hi:g}; floats must lie in 0..1 (or pass uint8 for 0..255)"
            )
        a = np.rint(a * 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise CLIVizError(f"{label} has integer pixels in {lo}..{hi}; they must lie in 0..255")
        a = a.astype(np.uint8, copy=False)
    else:
        raise CLIVizError(f"{label} must hold numbers (uint8 or float), got dtype {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a))


def shrink(image: Image.Image, max_side: int) -> Image.Image:
    """`image` with its longest side at most `max_side`, in its own mode, with no full-size copy.

    First an integer box reduction (each output pixel the mean of its block) done in horizontal
    strips: `Image.reduce` and `resize` premultiply an RGBA image's alpha into a full-size copy
    first, which would double the memory of a large upload; a strip's copy is small. Then a box
    resize of what is left. Palette, 1-bit and 16-bit images, which `reduce` does not take, go
    straight to `resize` (nearest pixel for palette and 1-bit, as Pillow does; no premultiplied
    copy for them). EXIF orientation stays in `info` for `to_rgb`.
    """
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    factor = max(width, height) // max_side
    if factor >= 2 and image.mode not in ("1", "P", "I;16", "I;16L", "I;16B", "I;16N"):
        image = _reduce_in_strips(image, factor)
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BOX)


def _reduce_in_strips(image: Image.Image, factor: int, blocks_per_strip: int = 64) -> Image.Image:
    """`image.reduce(factor)`, computed strip by strip so that no step copies the whole image."""
    width, height = image.size
    info = dict(image.info)
    out = Image.new(image.mode, (-(-width // factor), -(-height // factor)))
    rows = factor * blocks_per_strip  # a multiple of factor: strips reduce to whole output rows
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(top + rows, height)))
        out.paste(strip.reduce(factor), (0, top // factor))
    out.info.update(info)  # EXIF orientation, transparency, ...
    return out


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode (RGBA, palette, grayscale, 16-bit, float, CMYK) -> 8-bit RGB."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        data = np.asarray(image, dtype=np.float32)  # [H, W]; float32: half the memory of float64, enough for 8 bits
        if not np.isfinite(data).all():
            data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
        data = data - lo  # a writable copy (np.asarray of an image may be read-only)
        data *= 255.0 / (hi - lo) if hi > lo else 0.0
        image = Image.fromarray(data.astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        image = Image.alpha_composite(canvas, rgba)
    return image.convert("RGB")


def check_question(question: str, vocab: dict[str, int] | None = None, tokenize=None) -> str:
    """Normalise whitespace and refuse empty, over-long, undecodable or out-of-vocabulary questions."""
    if question is not None and not isinstance(question, str):
        raise CLIVizError(f"the question must be text, not {type(question).__name__}")
    text = re.sub(r"\s+", " ", question or "").strip()
    bad = next((c for c in text if _SURROGATES[0] <= c <= _SURROGATES[1]), None)
    if bad is not None:
        # Python keeps undecodable command-line bytes as lone surrogates (\udc80-\udcff = byte 0x80-0xff)
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"code point U+{ord(bad):04X}"
        raise CLIVizError(f"the question is not valid UTF-8 text ({byte} at character {text.index(bad) + 1})")
    control = next((c for c in text if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        raise CLIVizError(
            f"the question holds a control character (U+{ord(control):04X} at character {text.index(control) + 1})"
        )
    if not text:
        raise CLIVizError("the question is empty")
    if len(text) > MAX_QUESTION_CHARS:
        raise CLIVizError(f"the question is too long ({len(text)} characters, limit {MAX_QUESTION_CHARS})")
    words = tokenize(text) if tokenize else text.lower().split()
    if len(words) > MAX_QUESTION_WORDS:
        raise CLIVizError(f"the question is too long ({len(words)} words, limit {MAX_QUESTION_WORDS})")
    if vocab is not None:
        unknown = [w for w in dict.fromkeys(words) if w not in vocab]
        if unknown:
            shown = ", ".join(repr(w) for w in unknown[:5])
            raise CLIVizError(f"words not in the model's vocabulary: {shown} (see `cliviz vocab`)")
    return text


def question_words(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """The tokenizer's own normalisation and word split, *before* the vocabulary lookup (which
    would turn unknown words into `[UNK]`, itself a known token)."""
    core = getattr(tokenizer, "backend_tokenizer", None)
    if core is None:
        return text.lower().split()
    norm = core.normalizer.normalize_str(text) if core.normalizer is not None else text
    if core.pre_tokenizer is None:
        return norm.split()
    return [w for w, _ in core.pre_tokenizer.pre_tokenize_str(norm)]


def is_word_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True for the bundled kind of tokenizer: a `tokenizers` WordLevel model, one id per known word.

    Decided by the tokenizer's model type, not by its vocabulary: any other tokenizer (BPE,
    Unigram, WordPiece, a slow sentencepiece one) can spell any text, so it needs no vocabulary check.
    """
    from tokenizers.models import WordLevel

    core = getattr(tokenizer, "backend_tokenizer", None)
    return core is not None and isinstance(core.model, WordLevel)


def special_token_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Every special token's text: the named ones (bos, eos, ...) and added special tokens (`<image>`)."""
    named = list(getattr(tokenizer, "all_special_tokens", []) or [])
    added = [
        t.content
        for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
        if getattr(t, "special", False)
    ]
    return list(dict.fromkeys(named + added))


def check_model_question(question: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """`check_question` against a model's tokenizer: the one check every front end uses.

    Word-level tokenizers (the bundled models) refuse words outside their vocabulary; subword
    tokenizers accept any non-empty, not over-long text that does not spell one of their special
    tokens (a typed `<image>` would add an image placeholder the image cannot fill).
    """
    if not is_word_level(tokenizer):
        text = check_question(question)
        specials = [t for t in special_token_texts(tokenizer) if len(t) > 1 and t in text]
        if specials:
            raise CLIVizError(f"the question contains the special token {specials[0]!r}; remove it")
        return text
    unk = getattr(tokenizer, "unk_token", None)
    vocab = {w: i for w, i in tokenizer.get_vocab().items() if w != unk}
    text = check_question(question, vocab, lambda text: question_words(tokenizer, text))
    return with_question_mark(text, tokenizer, vocab)


def with_question_mark(text: str, tokenizer: PreTrainedTokenizerBase, vocab: dict[str, int]) -> str:
    """`what color is the triangle` -> `what color is the triangle ?` for word-level models.

    Every ShapesVQA question ends with a separate "?" and the bundled models were trained on nothing
    else: without it they answer with an empty string (end of answer at once). A user who leaves the
    mark out means the same question, so it is added, as the tokenizer would split `triangle?`.
    """
    if QUESTION_MARK not in vocab:
        return text
    words = question_words(tokenizer, text)
    if words and words[-1] == QUESTION_MARK:
        return text
    fitted = f"{text} {QUESTION_MARK}"
    if len(words) + 1 > MAX_QUESTION_WORDS or len(fitted) > MAX_QUESTION_CHARS:
        return text
    return fitted


def input_warnings(image: Image.Image, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """What an answer about `image` should be read with: today, one line when a bundled model is
    shown an image unlike its ShapesVQA scenes (`cliviz.scene_check`). Empty when nothing applies."""
    from cliviz.scene_check import world_warning

    warning = world_warning(image, tokenizer)
    return [warning] if warning else []

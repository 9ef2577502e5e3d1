"""Validation of what users hand us — images and questions — with one-line errors.

The same loader serves the command line and the dashboard uploads.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cliviz.errors import CLIVizError

MAX_PIXELS = 40_000_000  # far above any real photo we need; stops decompression bombs before decoding
MAX_QUESTION_CHARS = 400
MAX_QUESTION_WORDS = 48
BACKGROUND = (24, 24, 28)  # transparent pixels become the ShapesVQA background


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Open, verify and convert any PIL-readable image to RGB; raise `CLIVizError` on bad input."""
    label = name or (str(source) if not isinstance(source, bytes) else "upload")
    if isinstance(source, bytes):
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        stream = Path(source)
        if not stream.exists():
            raise CLIVizError(f"image not found: {label}")
        if not stream.is_file():
            raise CLIVizError(f"not a file: {label}")
    try:
        with Image.open(stream) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise CLIVizError(f"image too large: {label} is {width}x{height} (limit {MAX_PIXELS:,} pixels)")
            image.load()
            return to_rgb(image)
    except CLIVizError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise CLIVizError(f"not a readable image: {label} ({type(err).__name__})") from None
    except PermissionError:
        raise CLIVizError(f"cannot read image (permission denied): {label}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise CLIVizError(f"corrupt or truncated image: {label} ({err})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode (RGBA, palette, grayscale, 16-bit, float, CMYK) -> 8-bit RGB."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        data = np.asarray(image, dtype=np.float64)
        lo, hi = float(data.min()), float(data.max())
        scaled = np.zeros_like(data) if hi <= lo else (data - lo) / (hi - lo) * 255.0
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        image = Image.alpha_composite(canvas, rgba)
    return image.convert("RGB")


def check_question(question: str, vocab: dict[str, int] | None = None, tokenize=None) -> str:
    """Normalise whitespace and refuse empty, over-long or out-of-vocabulary questions."""
    text = re.sub(r"\s+", " ", question or "").strip()
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


def question_words(tokenizer, text: str) -> list[str]:
    """The tokenizer's own normalisation and word split, *before* the vocabulary lookup (which
    would turn unknown words into `[UNK]`, itself a known token)."""
    core = getattr(tokenizer, "backend_tokenizer", None)
    if core is None:
        return text.lower().split()
    norm = core.normalizer.normalize_str(text) if core.normalizer is not None else text
    if core.pre_tokenizer is None:
        return norm.split()
    return [w for w, _ in core.pre_tokenizer.pre_tokenize_str(norm)]


def is_word_level(tokenizer) -> bool:
    """True for the bundled kind of tokenizer: a `tokenizers` WordLevel model, one id per known word.

    Decided by the tokenizer's model type, not by its vocabulary: any other tokenizer (BPE,
    Unigram, WordPiece, a slow sentencepiece one) can spell any text, so it needs no vocabulary check.
    """
    from tokenizers.models import WordLevel

    core = getattr(tokenizer, "backend_tokenizer", None)
    return core is not None and isinstance(core.model, WordLevel)


def special_token_texts(tokenizer) -> list[str]:
    """Every special token's text: the named ones (bos, eos, ...) and added special tokens (`<image>`)."""
    named = list(getattr(tokenizer, "all_special_tokens", []) or [])
    added = [t.content for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values() if getattr(t, "special", False)]
    return list(dict.fromkeys(named + added))


def check_model_question(question: str, tokenizer) -> str:
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
    return check_question(question, vocab, lambda text: question_words(tokenizer, text))

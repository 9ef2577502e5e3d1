"""Does an image belong to the bundled models' world? A cheap test, and the one warning line.

The bundled models (word-level tokenizer, trained by `cliviz train` on ShapesVQA) have only ever
seen synthetic scenes: 64 x 64 pixels, a flat dark background (`scenes.BACKGROUND`, RGB 24, 24, 28)
covering most of the picture, a few flat-coloured shapes and a digit glyph. Shown anything else (a
photo, a drawing, a rescaled screenshot) they still answer, confidently and meaninglessly, because
the image is silently resized to 64 x 64. The test, deliberately simple and stated in the warning:

    a ShapesVQA scene is exactly 64 x 64 px, and at least half of its pixels are the scene
    background colour (each channel within 8 of 24, 24, 28).

Every generated scene passes (the background covers 70-91% of the bundled examples); a photo fails
on its size, and a photo shrunk to 64 x 64 fails on its background. Real checkpoints (subword
tokenizers: anything `cliviz attach` makes from a real LLaVA) are never warned about.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from cliviz.data.scenes import BACKGROUND, IMAGE_SIZE
from cliviz.inputs import is_word_level

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MIN_BACKGROUND_SHARE = 0.5
BACKGROUND_TOLERANCE = 8


def background_share(image: Image.Image) -> float:
    """Fraction of pixels within `BACKGROUND_TOLERANCE` of the ShapesVQA background, per channel."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)  # [H, W, 3]
    near = np.all(np.abs(pixels - np.asarray(BACKGROUND, dtype=np.int16)) <= BACKGROUND_TOLERANCE, axis=-1)
    return float(near.mean())


def scene_mismatch(image: Image.Image) -> str | None:
    """Why `image` is not a ShapesVQA scene, or None when it looks like one."""
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        return f"it is {image.width}x{image.height} px, not {IMAGE_SIZE}x{IMAGE_SIZE}"
    share = background_share(image)
    if share < MIN_BACKGROUND_SHARE:
        # an all-black picture is dark but not the scenes' background: name the colour, not "dark"
        colour = "RGB {}, {}, {}".format(*BACKGROUND)
        found = "none of its pixels has" if share == 0 else f"only {share:.0%} of its pixels have"
        least = f"{MIN_BACKGROUND_SHARE:.0%}"
        return f"{found} the scenes' background colour {colour}, which covers at least {least} of every scene"
    return None


def world_warning(image: Image.Image, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The one warning line for a bundled (word-level) model shown a non-ShapesVQA image; else None."""
    if not is_word_level(tokenizer):
        return None
    why = scene_mismatch(image)
    if why is None:
        return None
    return (
        f"this image does not look like a ShapesVQA scene ({why}): the bundled models know only synthetic "
        "shape scenes, so expect a confident but meaningless answer; real images need a real checkpoint "
        "(`cliviz attach`)"
    )

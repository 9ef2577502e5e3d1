"""Images of any mode and size load as RGB; broken files and bad questions give one clear error."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cliviz.errors import CLIVizError
from cliviz.inputs import MAX_PIXELS, check_question, load_image


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA", "1", "I;16", "I", "F", "CMYK"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    suffix = ".tiff" if mode in ("I", "F", "CMYK") else ".png"
    image = Image.new(mode, (20, 12))
    path = tmp_path / f"img{suffix}"
    image.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (20, 12)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    data = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    image = Image.fromarray(data)
    assert image.mode.startswith("I;16")
    image.save(tmp_path / "deep.png")
    out = np.asarray(load_image(tmp_path / "deep.png"))
    assert out.min() == 0 and out.max() == 255


def test_transparent_pixels_become_background(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.asarray(load_image(tmp_path / "clear.png"))[0, 0].tolist() == [24, 24, 28]


def test_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "dot.png")
    assert load_image(tmp_path / "dot.png").size == (1, 1)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "not found"),
        (lambda p: p.mkdir(), "not a file"),
        (lambda p: p.write_text("hello, I am text"), "not a readable image"),
        (lambda p: p.write_bytes(b""), "not a readable image"),
    ],
)
def test_bad_files(tmp_path, make, message):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(CLIVizError, match=message):
        load_image(path)


def test_truncated_png(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CLIVizError, match="corrupt or truncated"):
        load_image(tmp_path / "cut.png")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    side = int(MAX_PIXELS**0.5) + 100
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")  # a few KB on disk
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    with pytest.raises(CLIVizError, match="too large"):
        load_image(tmp_path / "bomb.png")


def test_bytes_upload():
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    assert load_image(buf.getvalue(), name="upload.png").size == (8, 8)
    with pytest.raises(CLIVizError, match="upload.png"):
        load_image(b"garbage", name="upload.png")


def test_questions():
    vocab = {w: i for i, w in enumerate("what color is the circle ?".split())}
    assert check_question("  What   color is the circle ? ", vocab) == "What color is the circle ?"
    with pytest.raises(CLIVizError, match="empty"):
        check_question("   ", vocab)
    with pytest.raises(CLIVizError, match="too long"):
        check_question("what " * 300, vocab)
    with pytest.raises(CLIVizError, match="'zebra'"):
        check_question("what color is the zebra ?", vocab)


def test_pil_images_and_arrays_load_like_files(tmp_path):
    rgba = Image.new("RGBA", (5, 4), (255, 0, 0, 0))
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [24, 24, 28]  # as a transparent PNG would
    rgba.save(tmp_path / "clear.png")
    assert load_image(rgba).tobytes() == load_image(tmp_path / "clear.png").tobytes()
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)  # [H, W]
    out = load_image(gray)
    assert out.size == (4, 3) and np.asarray(out)[2, 3].tolist() == [11, 11, 11]
    assert load_image(np.zeros((3, 4, 1), np.uint8)).size == (4, 3)
    assert np.asarray(load_image(np.full((2, 2, 3), 0.5)))[0, 0].tolist() == [128, 128, 128]
    assert np.asarray(load_image(np.full((2, 2, 4), 255, np.int64)))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    "value, message",
    [
        (None, "image must be a path to an image file, its bytes, a PIL image or a numpy array, got None"),
        (3.5, "got float 3.5"),
        ("", "image is an empty path"),
        ("a\x00b.png", "NUL character"),
        ("x" * 300 + ".png", "has a file name of 304 bytes; file systems allow 255"),
        (Image.new("RGB", (0, 7)), "image is empty (0x7 pixels)"),
        (np.zeros((7, 0), np.uint8), "image is empty (0x7 pixels)"),
        (np.zeros((2, 2, 2), np.uint8), "must be an array of shape [height, width] or [height, width, 3 or 4]"),
        (np.full((2, 2), 300), "integer pixels in 300..300"),
        (np.full((2, 2), -0.5), "float pixels in -0.5..-0.5"),
        (np.array([["a"]]), "must hold numbers"),
    ],
)
def test_bad_image_values(value, message):
    with pytest.raises(CLIVizError) as err:
        load_image(value)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_huge_in_memory_image_is_refused_like_a_file():
    side = int(MAX_PIXELS**0.5) + 1
    with pytest.raises(CLIVizError, match="too large"):
        load_image(Image.new("1", (side, side)))

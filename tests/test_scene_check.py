"""The bundled models' world: a non-ShapesVQA image gets one warning line (ask, trace, the dashboard),
a ShapesVQA scene none, and a real checkpoint's (subword) tokenizer never."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from cliviz.data import iter_samples
from cliviz.inputs import load_image
from cliviz.scene_check import scene_mismatch, world_warning

from conftest import EXAMPLES, run_main


def photo_like(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise: no flat dark background, like a photo."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [120 + 100 * np.sin(xx / 13.0), 140 + 80 * np.cos(yy / 17.0), 90 + 60 * np.sin((xx + yy) / 23.0)], -1
    )
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def test_every_scene_passes_and_photos_do_not(tiny_cli):
    _, tok = tiny_cli
    for path in sorted(EXAMPLES.glob("*.png")):
        assert scene_mismatch(load_image(path)) is None, path
    for sample in iter_samples(50, seed=5):
        assert world_warning(sample.image, tok) is None
    big = photo_like((320, 240))
    assert "320x240 px, not 64x64" in scene_mismatch(big)
    small = photo_like((64, 64))
    assert "background" in scene_mismatch(small)
    upscaled = load_image(EXAMPLES / "color.png").resize((128, 128))
    assert "128x128" in scene_mismatch(upscaled)
    warning = world_warning(big, tok)
    assert "know only synthetic shape scenes" in warning and "cliviz attach" in warning and "\n" not in warning


def test_real_checkpoints_are_never_warned():
    subword = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    assert world_warning(photo_like((320, 240)), subword) is None


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "cat.jpg"
    photo_like((300, 200), seed=1).save(path, quality=90)
    return path


@pytest.mark.parametrize("command", ["ask", "trace"])
def test_commands_print_one_warning_line(command, photo, random_model_dir):
    proc = run_main(
        command,
        str(photo),
        "what shape is the orange object ?",
        "--model",
        str(random_model_dir),
        "--max-new-tokens",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "300x200" in lines[0], proc.stderr
    clean = run_main(
        command,
        str(EXAMPLES / "shape.png"),
        "what shape is the purple object ?",
        "--model",
        str(random_model_dir),
        "--max-new-tokens",
        "2",
    )
    assert clean.returncode == 0 and "warning" not in clean.stderr, clean.stderr


def test_dashboard_answer_card_carries_the_note(tiny_cli, photo):
    import json

    from cliviz.app import callbacks_explore, callbacks_image
    from cliviz.app.backend import Backend, load_examples
    from cliviz.app.state import image_payload

    model, tok = tiny_cli
    backend = Backend(model=model, tokenizer=tok, examples=load_examples(), model_label="tiny")
    raw = photo.read_bytes()
    store, *_ = callbacks_explore.ask(
        backend, "what shape is the orange object ?", image_payload("cat.jpg", raw, load_image(raw))
    )
    card = json.dumps(callbacks_explore.render_answer(store).to_plotly_json(), default=str)
    assert "world-warning" in card and "cliviz attach" in card
    example, *_, question = callbacks_image.from_example(backend, "shape")
    store, *_ = callbacks_explore.ask(backend, question, example)
    assert store["world_warning"] is None
    assert "world-warning" not in json.dumps(callbacks_explore.render_answer(store).to_plotly_json(), default=str)

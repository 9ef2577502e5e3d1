"""LLaVA-OneVision for real: anyres crops, `image_sizes`, per-image token counts, and an AMP memory
built from what the LLM sees (same crops, unpadding and newlines), exact per sample in a batch."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_clean_error, run_main
from factories import PATCH, SIZE, make_lively

torch.set_num_threads(1)

SHAPES = {"wide": (60, 20), "tall": (20, 70), "square": (40, 40), "big": (200, 150)}  # (width, height)


@pytest.fixture(scope="module")
def ov(tmp_path_factory, onevision_attached) -> dict:
    root = tmp_path_factory.mktemp("onevision")
    base, cli = onevision_attached["base"], onevision_attached["cli"]
    assert json.loads((cli / "config.json").read_text())["vision_layers"] == [1, 2, 3]
    images = {}
    for i, (name, (w, h)) in enumerate(SHAPES.items()):
        path = root / f"{name}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images[name] = path
    return {"base": base, "cli": cli, "images": images}


def _load(ov, dtype="float32"):
    from cliviz.model.loading import load_model

    return load_model(ov["cli"], device="cpu", dtype=dtype)


def test_token_counts_equal_the_processor_rule_and_the_model_features(ov):
    """Our count per image = what LlavaOnevisionProcessor expands `<image>` to = the features the model makes."""
    from transformers import LlavaOnevisionProcessor

    from cliviz.model.processing import image_inputs

    model, _ = _load(ov)
    images = [Image.open(p).convert("RGB") for p in ov["images"].values()]
    inputs = image_inputs(images, model.config)
    processor = model.config.image_processor
    # the processor's own counting rule (its constructor needs torchvision's video processor, so call
    # the rule on a stand-in holding exactly the attributes it reads)
    rule = SimpleNamespace(
        image_processor=processor, num_image_tokens=(SIZE // PATCH) ** 2, vision_aspect_ratio="anyres_max_9"
    )
    rule._get_unpadded_features = lambda *a: LlavaOnevisionProcessor._get_unpadded_features(rule, *a)
    with torch.no_grad():
        feats = model.encode_images(inputs.pixel_values, inputs.image_sizes).pooler_output
    for i, (h, w) in enumerate(inputs.image_sizes.tolist()):
        want = LlavaOnevisionProcessor._get_number_of_features(rule, h, w, SIZE, SIZE)
        assert inputs.token_counts[i] == want == feats[i].shape[0]
    assert len(set(inputs.token_counts)) == len(images)  # the shapes really differ
    assert inputs.pixel_values.ndim == 5 and inputs.pixel_values.shape[0] == len(images)  # [B, max_crops, 3, S, S]


def test_identity_at_init_with_anyres_crops(ov):
    """A fresh attach equals its base on wide, tall and square images (float32, crops of every count)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from cliviz.inference import prepare_inputs

    model, tok = _load(ov)
    base = LlavaOnevisionForConditionalGeneration.from_pretrained(ov["base"], dtype=torch.float32).eval()
    images = [Image.open(p).convert("RGB") for p in ov["images"].values()]
    inputs = prepare_inputs(model, tok, images, ["what is this", "how many shapes are there ?", "color", "where"])
    assert len({int(n) for n in (inputs["input_ids"] == model.image_token_id).sum(1)}) == len(images)
    with torch.no_grad():
        assert (model(**inputs).logits - base(**inputs).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("max_tokens", [1024, 40], ids=["unpooled", "pooled"])
def test_batched_equals_alone_with_different_crop_counts(ov, max_tokens):
    """With the injection live, each row of a wide + tall + square batch equals that sample run alone:
    no crops mix across samples and padded memory positions are never read — also when the read
    pools memories longer than `read_max_tokens` (34, 76 and 88 features here; 40 pools two of them)."""
    from cliviz.inference import prepare_inputs

    model, tok = _load(ov)
    model.config.read_max_tokens = max_tokens
    make_lively(model)
    names = ["wide", "tall", "square"]
    images = [Image.open(ov["images"][n]).convert("RGB") for n in names]
    questions = ["what is this", "how many shapes are there ?", "color"]
    with torch.no_grad():
        batched = model(**prepare_inputs(model, tok, images, questions)).logits  # [3, T, V], left-padded
        for i in range(3):
            alone = model(**prepare_inputs(model, tok, [images[i]], [questions[i]])).logits[0]  # [T_i, V]
            assert (batched[i, -alone.shape[0] :] - alone).abs().max().item() <= 1e-5, names[i]
        plain = model(**prepare_inputs(model, tok, images[:1], questions[:1]))
    assert plain.vision_memory_mask is not None and plain.vision_memory.shape[:2] == (1, 3)


def test_memory_is_the_features_the_llm_sees(ov):
    """At B_k = 0, AMP's memory for the projector's own layer equals the base's packed image features."""
    from cliviz.inference import prepare_inputs

    model, tok = _load(ov)
    image = Image.open(ov["images"]["wide"]).convert("RGB")
    inputs = prepare_inputs(model, tok, [image], ["what is this"])
    with torch.no_grad():
        out = model(**inputs)
        feats = model.encode_images(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]  # [N, D]
    last = model.config.vision_layers.index(3)  # vision_feature_layer -1 = hidden_states[3]
    torch.testing.assert_close(out.vision_memory[0, last], feats, atol=1e-5, rtol=1e-5)


def test_generation_caches_the_read_and_matches_uncached(ov):
    from cliviz.inference import generation_kwargs, prepare_inputs

    model, tok = _load(ov)
    with torch.no_grad():
        for layer in model.agf:
            layer.injection.alpha.fill_(0.8)
    images = [Image.open(ov["images"][n]).convert("RGB") for n in ("wide", "tall")]
    inputs = prepare_inputs(model, tok, images, ["what is this", "color"])
    calls = []
    handle = model.read_kv.register_forward_hook(lambda *a: calls.append(1))
    kw = {**generation_kwargs(tok, 6), "min_new_tokens": 6}
    with torch.no_grad():
        cached = model.generate(**inputs, **kw)
        assert len(calls) == 1  # keys/values of the memory: once, at prefill
        uncached = model.generate(**inputs, use_cache=False, **kw)
    handle.remove()
    assert torch.equal(cached, uncached)


def test_onevision_commands_run(ov, tmp_path):
    image, cli = str(ov["images"]["tall"]), str(ov["cli"])
    proc = run_main("ask", image, "what is this?", "--model", cli, "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    proc = run_main(
        "trace", image, "what is this?", "--model", cli, "--device", "cpu", "--json", "--max-new-tokens", "3"
    )
    assert proc.returncode == 0, proc.stderr


def test_onevision_folder_without_processor_files_is_one_error_line(ov, tmp_path):
    import shutil

    broken = tmp_path / "noproc"
    shutil.copytree(ov["cli"], broken)
    (broken / "preprocessor_config.json").unlink()
    (broken / "processor_config.json").unlink()
    proc = run_main("ask", str(ov["images"]["wide"]), "what is this?", "--model", str(broken), "--device", "cpu")
    assert_clean_error(proc, "image processor")


def test_the_dashboard_serves_a_onevision_model(ov):
    """`cliviz dash --model <OneVision>`: the app builds, and its backend answers an uploaded image
    with a trace whose gates cover that image's own token count."""
    from cliviz.app import create_app
    from cliviz.app.factory import load_backend

    assert create_app(ov["cli"], device="cpu", dtype="float32") is not None
    backend = load_backend(ov["cli"], None, device="cpu", dtype="float32")
    image = Image.open(ov["images"]["wide"]).convert("RGB")
    t = backend.ask(image, "what is this?")
    assert t.has_gates and t.gates.shape[1] == t.n_tokens
    assert int(t.role_mask("image").sum()) == 34  # the wide image's anyres count (see the token-count test)


def test_memory_coordinates_place_base_crop_and_high_res_crops_in_the_image(ov):
    """The read's position code: the base crop carries its own grid, every high-resolution patch its
    place in the full image, newline tokens no place; one coordinate row per memory token."""
    from cliviz.inference import prepare_inputs
    from cliviz.model import position

    model, tok = _load(ov)
    assert model.config.read_position_code
    images = [Image.open(ov["images"][n]).convert("RGB") for n in ("wide", "tall", "big")]
    inputs = prepare_inputs(model, tok, images, ["what"] * 3)
    with torch.no_grad():
        out = model(**inputs)
    coords = model.memory_coordinates(out.vision_memory.shape[2], inputs["image_sizes"])  # [B, N, 2]
    grid = SIZE // PATCH
    lo, hi = 0.5 / grid, 1 - 0.5 / grid
    for i in range(len(images)):
        n_real = int(out.vision_memory_mask[i].sum())
        real, pad = coords[i, :n_real], coords[i, n_real:]
        assert torch.isnan(pad).all()
        torch.testing.assert_close(real[: grid * grid], position.grid_coordinates(grid))  # base crop first
        high = real[grid * grid :]
        placed = ~torch.isnan(high).any(-1)
        newlines = int((~placed).sum())
        assert newlines >= 1 and bool((high[placed] >= lo - 1e-6).all() and (high[placed] <= hi + 1e-6).all())
        # newline rows close each row of the unpadded grid: the last memory token is one
        assert torch.isnan(real[-1]).all()

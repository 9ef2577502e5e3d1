"""A real LLaVA-1.5-style folder (subword tokenizer + chat template + CLIP image processor) through
`attach`, `ask` and `trace`: inputs must match transformers' own `LlavaProcessor`, logits the base's.

Everything is built in-process (a BPE tokenizer trained on a few sentences, a tiny random LLaVA),
so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_clean_error, run_main
from factories import SIZE
from factories import llava15_base as build_base
from factories import llava15_image_processor as build_image_processor
from factories import llava15_processor as build_processor
from factories import llava15_tokenizer as build_tokenizer

torch.set_num_threads(1)

# Words, capitals, digits and punctuation the tokenizer's training text never saw.
FREE_TEXT = "Qu'est-ce que c'est, l'objet «rouge» — #42?!"


def messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """`base` (a llava-hf-like folder: weights, tokenizer, chat template, processor configs) and
    `cli`, made from it by `cliviz attach`; plus a non-square test image."""
    root = tmp_path_factory.mktemp("real-llava")
    tok = build_tokenizer()
    build_base(tok).save_pretrained(root / "base")
    # both layouts a real folder may have: the processor's (transformers 5 nests the image processor in
    # processor_config.json) and the hub's llava-1.5 preprocessor_config.json
    build_processor(tok, build_image_processor()).save_pretrained(root / "base")
    build_image_processor().save_pretrained(root / "base")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(root / "wide.png")
    proc = run_main("attach", "--base", str(root / "base"), "--out", str(root / "cli"), "--vision-layers", "1,2,3")
    assert proc.returncode == 0, proc.stderr
    return {"base": root / "base", "cli": root / "cli", "image": root / "wide.png", "attach_stdout": proc.stdout}


def test_attach_carries_tokenizer_template_and_processor(folders):
    cli = folders["cli"]
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "processor_config.json",
    ):
        assert (cli / name).is_file(), name
        assert (cli / name).read_bytes() == (folders["base"] / name).read_bytes()
    assert "preprocessor_config.json" in folders["attach_stdout"]
    assert "image_processor" not in json.loads((cli / "config.json").read_text())


def test_inputs_match_llava_processor_and_logits_match_base(folders):
    """Prompt ids and pixels equal `LlavaProcessor`'s; the attached model equals the base on them."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from cliviz.inference import prepare_inputs
    from cliviz.model.loading import config_hash, load_model
    from cliviz.model.processing import n_image_tokens, pixel_values, prompt_ids

    model, tok = load_model(folders["cli"], device="cpu", dtype="float32")
    assert model.config.image_processor is not None
    processor = build_processor(
        AutoTokenizer.from_pretrained(folders["base"]),
        AutoImageProcessor.from_pretrained(folders["base"], local_files_only=True),
    )
    image = Image.open(folders["image"]).convert("RGB")  # 50 x 30: resize + center crop matter
    text = processor.apply_chat_template(messages(FREE_TEXT), add_generation_prompt=True, tokenize=False)
    ref = processor(images=[image], text=text, return_tensors="pt")

    ids = prompt_ids(tok, FREE_TEXT, model.config)
    assert ids == ref["input_ids"][0].tolist()
    assert ids.count(model.config.base_config.image_token_id) == n_image_tokens(model.config) == 16
    assert tok.decode(ids).endswith(f"{FREE_TEXT} ASSISTANT:")  # the answer follows directly
    assert torch.equal(pixel_values([image], model.config), ref["pixel_values"])  # [1, 3, 32, 32]
    assert config_hash(model)  # the processor never reaches the serialised config

    base = LlavaForConditionalGeneration.from_pretrained(folders["base"], use_safetensors=True).eval()
    inputs = prepare_inputs(model, tok, [image], [FREE_TEXT])
    assert torch.equal(inputs["input_ids"], ref["input_ids"]) and torch.equal(
        inputs["pixel_values"], ref["pixel_values"]
    )
    with torch.no_grad():
        want = base(input_ids=ref["input_ids"], pixel_values=ref["pixel_values"]).logits  # [1, T, V]
        got = model(**inputs).logits  # [1, T, V]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_image_processor_found_in_processor_config_alone(folders, tmp_path):
    """A folder saved by `LlavaProcessor.save_pretrained` (no preprocessor_config.json) works too;
    a bundled-style folder without any processor config keeps the [-1, 1] pixels."""
    import shutil

    from cliviz.model.loading import load_model
    from cliviz.model.processing import pixel_values

    shutil.copytree(folders["cli"], tmp_path / "m")
    (tmp_path / "m" / "preprocessor_config.json").unlink()
    image = Image.open(folders["image"]).convert("RGB")
    model, _ = load_model(tmp_path / "m", device="cpu", dtype="float32")
    assert pixel_values([image], model.config).min() < -1.0  # CLIP mean/std, not [-1, 1]
    (tmp_path / "m" / "processor_config.json").unlink()
    model, _ = load_model(tmp_path / "m", device="cpu", dtype="float32")
    assert getattr(model.config, "image_processor", None) is None
    pix = pixel_values([image], model.config)  # [1, 3, 32, 32]
    assert pix.shape == (1, 3, SIZE, SIZE) and pix.min() >= -1.0


def test_subword_tokenizer_helpers(folders):
    """Free text passes the question check; answers decode as text; pad falls back to eos."""
    from transformers import AutoTokenizer

    from cliviz.data.tokenizer import build_tokenizer as bundled_tokenizer
    from cliviz.inference import decode_answer, generation_kwargs, suppressed_tokens
    from cliviz.inputs import check_model_question, is_word_level

    tok = AutoTokenizer.from_pretrained(folders["cli"])
    assert not is_word_level(tok) and is_word_level(bundled_tokenizer())
    assert check_model_question(f"  {FREE_TEXT}\n", tok) == FREE_TEXT
    ids = tok("a red square", add_special_tokens=False).input_ids
    assert decode_answer(tok, [*ids, tok.eos_token_id, *ids]) == "a red square"
    assert tok.convert_tokens_to_ids("<image>") in suppressed_tokens(tok)
    tok.pad_token = None
    assert generation_kwargs(tok, 3)["pad_token_id"] == tok.eos_token_id


def test_ask_and_trace_with_free_text(folders, tmp_path):
    cli, image = str(folders["cli"]), str(folders["image"])
    proc = run_main("ask", image, FREE_TEXT, "--model", cli, "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["question"] == FREE_TEXT and isinstance(out["answer"], str) and 0.0 <= out["probability"] <= 1.0

    proc = run_main("trace", image, FREE_TEXT, "--model", cli, "--device", "cpu", "--json", "--max-new-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    trace = json.loads(proc.stdout)
    gates = np.asarray(trace["gates"], dtype=np.float32)  # [n_injection_layers, n_tokens, K]
    assert gates.shape == (2, len(trace["token_ids"]), 3)  # injection layers 1..2, vision layers 1,2,3
    np.testing.assert_allclose(gates.sum(-1), 1.0, atol=1e-5)
    assert trace["token_roles"].count("image") == 16


def test_bad_questions_on_a_real_folder(folders):
    cli, image = str(folders["cli"]), str(folders["image"])
    assert_clean_error(run_main("ask", image, "   ", "--model", cli, "--device", "cpu"), "empty")
    assert_clean_error(run_main("ask", image, "why " * 150, "--model", cli, "--device", "cpu"), "too long")
    assert_clean_error(
        run_main("trace", image, "what is <image> here?", "--model", cli, "--device", "cpu"), "special token"
    )

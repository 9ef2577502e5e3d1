"""`attach` out of the box: the shipped plain-LLaVA base (llava-tiny-base) is projector-tiny's LLaVA,
regenerable by `export_llava_base`, and a model attached to it answers like projector-tiny, offline."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from cliviz.errors import CLIVizError
from cliviz.model.export import export_llava_base
from cliviz.model.loading import bundled_models_dir, load_model
from cliviz.model.processing import n_image_tokens, pixel_values, prompt_ids

from conftest import EXAMPLES, REPO, run_main

SHIPPED = REPO / "assets" / "models" / "llava-tiny-base"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_llava_base("projector-tiny", tmp_path_factory.mktemp("base"))


def test_shipped_base_is_projector_tiny_exported_again(exported):
    """Regenerating gives the shipped folder: same weights (bit for bit), config and side files."""
    shipped, again = load_file(SHIPPED / "model.safetensors"), load_file(exported / "model.safetensors")
    assert shipped.keys() == again.keys() and all(np.array_equal(shipped[k], again[k]) for k in shipped)
    from transformers import LlavaForConditionalGeneration

    projector, _ = load_model("projector-tiny", device="cpu", dtype="float32")
    plain = LlavaForConditionalGeneration.from_pretrained(SHIPPED, use_safetensors=True)  # stock transformers
    own, loaded = projector.base.state_dict(), plain.state_dict()
    assert own.keys() == loaded.keys() and all(torch.equal(own[k], loaded[k]) for k in own)
    for name in ("preprocessor_config.json", "chat_template.jinja", "tokenizer.json", "README.md"):
        assert (SHIPPED / name).read_text() == (exported / name).read_text(), name
    # The config by meaning: the `transformers_version` stamps record who wrote the file, not what it says.
    assert _without_version_stamps(json.loads((SHIPPED / "config.json").read_text())) == _without_version_stamps(
        json.loads((exported / "config.json").read_text())
    )
    assert json.loads((SHIPPED / "config.json").read_text())["model_type"] == "llava"


def _without_version_stamps(config):
    if isinstance(config, dict):
        return {k: _without_version_stamps(v) for k, v in config.items() if k != "transformers_version"}
    return config


def test_config_comparison_ignores_only_the_version_stamp():
    shipped = json.loads((SHIPPED / "config.json").read_text())
    restamped = {**shipped, "transformers_version": "0.0.0"}
    assert _without_version_stamps(restamped) == _without_version_stamps(shipped)
    changed = {**shipped, "text_config": {**shipped["text_config"], "hidden_size": 1}}
    assert _without_version_stamps(changed) != _without_version_stamps(shipped)


def test_only_projector_models_are_plain_llava(tmp_path):
    with pytest.raises(CLIVizError, match="only a projector model"):
        export_llava_base("cli-tiny", tmp_path / "x")


def test_attached_inputs_are_bit_for_bit_the_bundled_ones(tmp_path):
    from cliviz.inputs import load_image
    from cliviz.model.attach import attach_folder

    attach_folder(SHIPPED, tmp_path / "cli")
    attached, atok = load_model(tmp_path / "cli", device="cpu", dtype="float32")
    bundled, btok = load_model("projector-tiny", device="cpu", dtype="float32")
    assert attached.config.image_processor is not None and atok.chat_template  # the real-checkpoint pipeline
    question = "what color is the triangle ?"
    ids = prompt_ids(atok, question, attached.config)
    assert ids == prompt_ids(btok, question, bundled.config)
    assert ids[:2] == [btok.bos_token_id, attached.image_token_id] and ids.count(attached.image_token_id) == 64
    assert n_image_tokens(attached.config) == 64
    images = [load_image(EXAMPLES / "glyph.png"), load_image(EXAMPLES / "color.png").resize((200, 150))]
    assert torch.equal(pixel_values(images, attached.config), pixel_values(images, bundled.config))


def test_attach_then_trace_offline_answers_like_projector_tiny(tmp_path):
    out = tmp_path / "llava-tiny-cli"
    proc = run_main("attach", "--base", str(SHIPPED), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "chat_template.jinja" in proc.stdout and "preprocessor_config.json" in proc.stdout
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # the command runs with it: nothing is downloaded
    for name, question in (("color", "what color is the triangle ?"), ("glyph", "what digit is in the corner ?")):
        image = str(EXAMPLES / f"{name}.png")
        got = run_main("trace", image, question, "--model", str(out), "--json")
        want = run_main("trace", image, question, "--model", "projector-tiny", "--json")
        assert got.returncode == 0 and want.returncode == 0, got.stderr + want.stderr
        got, want = json.loads(got.stdout), json.loads(want.stdout)
        assert got["answer"] == want["answer"] and got["answer_texts"] == want["answer_texts"]
        np.testing.assert_allclose(got["answer_logprobs"], want["answer_logprobs"], atol=1e-5)
        assert got["meta"]["fusion"] == "cli" and got["causal_check"]["delta_logprob"] == 0.0  # alpha = 0
    assert bundled_models_dir().joinpath("llava-tiny-base").is_dir()


def test_attached_base_trains_on_generated_scenes_with_its_own_template(tmp_path):
    """The exported template takes typed-part content in every turn, as the trainer renders it (its
    assistant turn once took only a string: training an attached llava-tiny-base stopped at start).
    The read's size is an attach option."""
    attached = tmp_path / "cli"
    proc = run_main("attach", "--base", str(SHIPPED), "--read-width", "64", "--read-heads", "2", "--out", str(attached))
    assert proc.returncode == 0, proc.stderr
    config = json.loads((attached / "config.json").read_text())
    assert (config["read_width"], config["read_heads"]) == (64, 2)
    trained = tmp_path / "trained"
    proc = run_main(
        "train", "--init-from", str(attached), "--steps", "2", "--batch-size", "2", "--warmup", "1",
        "--device", "cpu", "--out", str(trained),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((trained / "training_summary.json").read_text())
    assert summary["steps"] == 2
    bad = run_main(
        "attach", "--base", str(SHIPPED), "--read-width", "100", "--read-heads", "3", "--out", str(tmp_path / "x")
    )
    assert bad.returncode == 2 and "not a positive multiple of 3 read heads" in bad.stderr

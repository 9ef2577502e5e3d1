"""The AGF read's position code: each memory token gets a fixed 2-D sin-cos code of its place before
the key/value projection, so the read is no longer blind to where what it attends to lies."""

from __future__ import annotations

import torch

from cliviz.model import position

from conftest import REPO, build_tiny


def test_code_is_zero_where_there_is_no_place_and_distinct_elsewhere():
    coords = torch.cat([position.grid_coordinates(8), torch.full((1, 2), float("nan"))])  # [65, 2]
    code = position.sincos_code(coords, 128)  # [65, 128]
    assert code.shape == (65, 128) and torch.isfinite(code).all()
    assert code[-1].abs().sum() == 0  # CLS / newline / padding: no code
    distances = torch.cdist(code[:-1], code[:-1])  # [64, 64]
    assert distances[~torch.eye(64, dtype=torch.bool)].min() > 0.5  # every patch has its own code
    assert code[:-1].abs().max() <= 1.0 + 1e-6  # amplitude 1 per channel, the scale of projected features


def test_llava_coordinates_follow_the_feature_strategy():
    assert position.llava_coordinates(64, 8, has_cls=False).shape == (64, 2)
    with_cls = position.llava_coordinates(65, 8, has_cls=True)
    assert torch.isnan(with_cls[0]).all() and not torch.isnan(with_cls[1:]).any()


def _read(model, memory):
    """The first injection layer's read of `memory [1, K, N, D]` for a fixed random query."""
    kv = model.memory_keys_values(memory)
    width = model.config.base_config.text_config.hidden_size
    hidden = torch.randn(1, 1, width, generator=torch.Generator().manual_seed(1))  # [1, 1, D]
    return model.agf[0].read(hidden, kv.keys[0], kv.values[0], kv.mask)  # [1, 1, K, r]


def test_the_read_knows_where_its_memory_lies_only_with_the_code():
    """Permuting the memory's positions leaves a position-blind read unchanged (a softmax average over a
    set) but changes the position-aware one: the code is what tells places apart."""
    model, _ = build_tiny("cli")
    assert model.config.read_position_code  # new tiny models read with the code
    torch.manual_seed(0)
    memory = torch.randn(1, len(model.config.vision_layers), 64, 128)  # [1, K, N, D]
    shuffled = memory[:, :, torch.randperm(64)]
    with torch.no_grad():
        aware = (_read(model, memory) - _read(model, shuffled)).abs().max().item()
        model.config.read_position_code = False
        blind = (_read(model, memory) - _read(model, shuffled)).abs().max().item()
    assert aware > 1e-3 and blind < 1e-5


def test_models_trained_without_the_code_keep_their_read():
    from cliviz.model.loading import load_model

    model, _ = load_model("cli-staged-tiny", device="cpu", dtype="float32")
    assert model.config.read_position_code is False


def test_attach_turns_the_code_on_and_stays_the_base_at_init(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from cliviz.inference import prepare_inputs
    from cliviz.inputs import load_image
    from cliviz.model.attach import attach_folder
    from cliviz.model.loading import load_model

    out = tmp_path / "attached"
    attach_folder(REPO / "assets" / "models" / "llava-tiny-base", out, vision_layers=[0, 1, 2])
    model, tok = load_model(out, device="cpu", dtype="float32")
    assert model.config.read_position_code and model.config.vision_layers == [0, 1, 2]
    base = LlavaForConditionalGeneration.from_pretrained(REPO / "assets" / "models" / "llava-tiny-base").eval()
    inputs = prepare_inputs(model, tok, [load_image(REPO / "assets" / "examples" / "position.png")], ["what is this"])
    with torch.no_grad():
        assert (model(**inputs).logits - base(**inputs).logits).abs().max().item() <= 1e-5


def test_a_projector_model_takes_cli_with_the_code(tmp_path):
    from cliviz.model.attach import attach_folder
    from cliviz.model.loading import bundled_models_dir

    model = attach_folder(bundled_models_dir() / "projector-staged-tiny", tmp_path / "cli", read_width=64, read_heads=2)
    assert model.config.fusion == "cli" and model.config.read_position_code and model.config.read_width == 64

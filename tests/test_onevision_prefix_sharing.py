"""LLaVA-OneVision ablations share the image prefix as LLaVA's do: the reference run keeps each
sample's crops' tower states and its read's keys and values (real positions only, padded again per
chunk), and every condition's chunk takes them instead of running the tower again. The scores equal
plain stacked forwards; the tower runs only in the reference passes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from cliviz.analyses import ablations as A

from factories import make_lively

torch.set_num_threads(1)
NUM = ["logprob_ref", "logprob_own", "logprob_ref_seq"]
SHAPES = [(60, 20), (20, 70), (40, 40), (200, 150)]  # (width, height): crops and token counts all differ
QUESTIONS = ["what is this", "how many shapes are there ?", "color", "where"]
REFERENCES = ["a cat", "two", "red", "left"]


def full_read(model):
    """The same OneVision base with the first design's full read (per-layer keys and values, no pooling)."""
    from cliviz.model.configuration import CLIConfig
    from cliviz.model.modeling import CLIForConditionalGeneration

    cfg = model.config
    config = CLIConfig(
        base_config=cfg.base_config,
        vision_layers=cfg.vision_layers,
        injection_layers=cfg.injection_layers,
        agf_read="full",
        read_max_tokens=None,
    )
    config.image_processor = cfg.image_processor  # runtime attribute, as load_model sets it
    torch.manual_seed(1)
    base = type(model.base)(cfg.base_config).eval()  # its own: `model`'s injection hooks sit on its base's layers
    base.load_state_dict(model.base.state_dict())
    return CLIForConditionalGeneration(config, base=base).eval()


@contextmanager
def tower_runs(model) -> Iterator[list[int]]:
    """Counts the vision tower's real runs: a hook on its first module (nnsight fires a hook on the
    tower itself even when the tower is skipped; a skipped tower never reaches its embeddings)."""
    runs: list[int] = []
    handle = model.base.model.vision_tower.embeddings.register_forward_hook(lambda *args: runs.append(1))
    try:
        yield runs
    finally:
        handle.remove()


@pytest.mark.parametrize("read", ["light", "light-pooled", "full", "amp-output"])
def test_onevision_ablation_shares_the_image_prefix(onevision_attached, read, monkeypatch):
    """light: kept keys and values of 34..88 memory positions; light-pooled: read_max_tokens 40 pools
    some of them; full: per-layer keys and values; amp-output: AMP's output kept instead (what the
    engine keeps when the keys and values would exceed its budget)."""
    from cliviz.intervene import engine
    from cliviz.model.loading import load_model

    model, tok = load_model(onevision_attached["cli"], device="cpu", dtype="float32")
    if read == "full":
        model = full_read(model)
    if read == "light-pooled":
        model.config.read_max_tokens = 40
    if read == "amp-output":
        plan = engine._cache_plan

        def without_kv(*args, **kwargs):
            want, block = plan(*args, **kwargs)
            if want is None:  # share_prefix=False
                return want, block
            assert want.kv and not want.memory
            return engine._Want(vision=True, memory=True, hidden_after=want.hidden_after), block

        monkeypatch.setattr(engine, "_cache_plan", without_kv)
    make_lively(model)
    images = [
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8))
        for i, (w, h) in enumerate(SHAPES)
    ]
    first, last = model.config.injection_layers[0], model.config.injection_layers[-1]
    conditions = [
        None,
        A.Ablation("injection_off", [first]),
        A.Ablation("mean"),
        A.Ablation("patch", [last]),
        A.Ablation("uniform", tokens="answer"),
        A.Ablation("onehot", [last], value=2),
        A.Ablation("knockout", [last], [2], tokens="prompt"),
        A.Ablation("zero", [first], [1, 2], tokens="image"),
    ]
    with tower_runs(model) as runs:
        shared = A.score_conditions(model, tok, images, QUESTIONS, REFERENCES, conditions, max_batch=16)
    shared_runs = len(runs)
    with tower_runs(model) as runs:
        plain = A.score_conditions(
            model, tok, images, QUESTIONS, REFERENCES, conditions, max_batch=5, share_prefix=False
        )
    # the tower ran in the two reference passes only (all samples for mean/patch, then the block's
    # cache): never for a condition's chunk; plain forwards run it in every chunk
    assert shared_runs == 2 and len(runs) > 2, (shared_runs, len(runs))
    assert (shared[NUM] - plain[NUM]).abs().max().max() < 1e-5
    assert (shared["answer"] == plain["answer"]).all()
    change = shared[["delta_logprob_ref", "delta_logprob_own"]].abs().max(axis=1).groupby(shared["condition"]).max()
    assert change[A.REFERENCE] == 0 and (change.drop(A.REFERENCE) > 0).all()  # every condition does something


def test_crop_counts_and_read_lengths_follow_the_images(onevision_attached):
    """Tower rows per sample are its anyres crops (they sum to the tower's batch) and each read holds
    the image's token count, pooled to read_max_tokens by the light read; LLaVA needs neither."""
    from cliviz.intervene.engine import _crop_counts, _kv_lengths
    from cliviz.model.loading import load_model
    from cliviz.model.processing import image_inputs

    model, _ = load_model(onevision_attached["cli"], device="cpu", dtype="float32")
    images = [Image.new("RGB", size, (90, 20, 200)) for size in SHAPES]
    pixels = image_inputs(images, model.config)
    crops = _crop_counts(model, pixels)
    with torch.no_grad():
        out = model.encode_images(pixels.pixel_values, pixels.image_sizes)
        memory, mask = model.vision_memory(out, pixels.image_sizes)  # [B, K, N, D], [B, N]
    assert sum(crops) == out.hidden_states[-1].shape[0] and len(set(crops)) > 1
    assert [int(n) for n in mask.sum(-1)] == pixels.token_counts  # memory positions = image tokens
    model.config.read_max_tokens = 40
    assert _kv_lengths(model, pixels) == [min(int(n), 40) for n in mask.sum(-1)]
    model.config.read_max_tokens = None
    assert _kv_lengths(model, pixels) == [int(n) for n in mask.sum(-1)]

"""Layer probes (`cliviz probe-layers`): labels that match the pictures, the tokens of the right crop and
patch, probes that find what a tower is built to know and nothing where it is built to know nothing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import assert_clean_error, build_tiny, run_main

torch.set_num_threads(1)

SMALL = {"folds": 2, "max_patches": 400, "seed": 0, "permuted_control": False}  # the control: its own test


@pytest.fixture(scope="module")
def scenes():
    from cliviz.analyses.probe_labels import generated_scenes

    return [scene for _, scene in generated_scenes(40, seed=9)]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("cli")[0]


# ------------------------------------------------------------------------------------------ labels


def test_grid_labels_match_patch_labels_and_carry_objects_on_other_grids():
    from cliviz.analyses.probe_labels import generated_scenes
    from cliviz.data.scenes import COLORS, IMAGE_SIZE, grid_labels, patch_labels

    for _, scene in generated_scenes(12, seed=3):
        for grid in (4, 8):  # divides 64: exactly the training labels
            want, got = patch_labels(scene, IMAGE_SIZE // grid), grid_labels(scene, grid)
            assert all(np.array_equal(want[k], got[k]) for k in want)
        labels = grid_labels(scene, 24)  # LLaVA-1.5's 336 / 14 grid
        assert labels["color"].shape == (24, 24)
        for obj in scene.objects:  # the cell under each object's centre holds that object
            row, col = obj.y * 24 // IMAGE_SIZE, obj.x * 24 // IMAGE_SIZE
            assert labels["color"][row, col] == list(COLORS).index(obj.color) + 1
        assert labels["digit"][1, 1] == int(scene.digit) + 1 and labels["digit"][12:, 12:].max() == 0


def test_data_rows_carry_scenes_and_old_folders_still_read(tmp_path):
    """`cliviz data` rows hold the scene; a folder without scene records (written before) reads by
    redrawing from the image names; labels never disagree with the pixels (tampered images skipped)."""
    from cliviz.analyses.probe_labels import generated_scenes
    from cliviz.data import write_dataset
    from cliviz.data.dataset import read_scenes

    write_dataset(tmp_path, 14, seed=6)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all({"digit", "objects"} <= set(r["scene"]) for r in rows)
    scenes, skipped = read_scenes(tmp_path)
    assert len(scenes) == 14 and skipped == {}
    fresh = dict(generated_scenes(200, seed=6))  # same stream, same pictures
    for name, scene in scenes:
        assert np.array_equal(np.asarray(scene.image), np.asarray(Image.open(tmp_path / name).convert("RGB")))
        assert fresh[name.split("/")[-1][:-4]].objects == scene.objects

    for r in rows:
        del r["scene"]  # an old folder
    rows[1]["scene"] = {"digit": "x", "objects": []}  # a broken record
    Image.new("RGB", (64, 64)).save(tmp_path / rows[2]["image"])  # a picture that is not its scene
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    scenes, skipped = read_scenes(tmp_path)
    assert len(scenes) == 12
    assert skipped == {"bad scene record": 1, "scene does not match the image": 1, "malformed line": 1}


def test_patch_and_image_tasks_hold_whole_scenes(scenes):
    from cliviz.analyses.probe_labels import image_tasks, patch_tasks, select_properties

    props = select_properties(None)
    sample, tasks = patch_tasks(scenes, 8, props, max_patches=10_000, rng=np.random.default_rng(0))
    by_key = {t.prop.key: t for t in tasks}
    digit = by_key["patch:digit"]
    assert len(digit.rows) == 4 * len(scenes)  # the glyph box spans 2 x 2 patches of 8 px
    assert {(i, p) for i, p in zip(sample.image[digit.rows], sample.patch[digit.rows])} == {
        (i, p) for i in range(len(scenes)) for p in (0, 1, 8, 9)
    }
    assert all(lab == scenes[i].digit for lab, i in zip(digit.labels, digit.images))
    x_tasks = [t for t in image_tasks(scenes, props) if t.prop.key == "image:x"]
    assert sorted(t.subset for t in x_tasks) == sorted(["red", "green", "blue", "yellow", "purple", "orange"])
    for t in x_tasks:
        for lab, i in zip(t.labels, t.rows):
            obj = next(o for o in scenes[i].objects if o.color == t.subset)
            assert lab == ("left" if obj.x < 32 else "right")


def test_object_cells_and_tokens_are_the_named_objects(tiny, scenes):
    from cliviz.analyses.probe_labels import PatchSample, image_tasks, object_cells, select_properties
    from cliviz.analyses.probes import TowerLayout, vision_states
    from cliviz.data.scenes import COLORS, grid_labels
    from cliviz.model.processing import image_inputs

    objects = object_cells(scenes, 8)
    assert len(objects.image) == sum(len(s.objects) for s in scenes)
    r = objects.row(3, 0)
    colour = grid_labels(scenes[3], 8)["color"].reshape(-1)
    assert set(objects.cells[r]) == set(np.flatnonzero(colour == list(COLORS).index(scenes[3].objects[0].color) + 1))
    for t in image_tasks(scenes, select_properties("image:x"), objects):
        for i, o in zip(t.rows, t.objects):
            assert objects.image[o] == i and scenes[i].objects[objects.index[o]].color == t.subset
    layout = TowerLayout.of(tiny)
    empty = PatchSample(np.zeros(0, np.int64), np.zeros(0, np.int64))
    states = vision_states(tiny, scenes[:5], layout, [2], empty, batch_size=2, objects=object_cells(scenes[:5], 8))
    with torch.no_grad():
        hs = tiny.encode_images(**image_inputs([s.image for s in scenes[:5]], tiny.config).to_model("cpu", tiny.dtype))
    tokens = hs.hidden_states[2][:, 1:].float().numpy()  # [5, 64, D] without CLS
    small = object_cells(scenes[:5], 8)
    for row in range(len(small.image)):
        want = tokens[small.image[row], small.cells[row]].mean(0)
        np.testing.assert_allclose(states.objects[2][row], want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ tokens


def _real(kind: str):
    """A tiny LLaVA-1.5 (CLIP, CLS token) or OneVision (SigLIP, anyres crops) with CLI attached, in memory."""
    from llava_folders import (
        llava15_base,
        llava15_image_processor,
        llava15_tokenizer,
        onevision_base,
        onevision_image_processor,
        onevision_tokenizer,
    )

    from cliviz.model.attach import attach

    if kind == "llava":
        model = attach(llava15_base(llava15_tokenizer()), vision_layers=[1, 2, 3])
        model.config.image_processor = llava15_image_processor()
    else:
        model = attach(onevision_base(onevision_tokenizer()), vision_layers=[1, 2, 3])
        model.config.image_processor = onevision_image_processor()
    return model


@pytest.mark.parametrize("kind", ["llava", "onevision"])
def test_kept_tokens_are_the_towers_states_of_the_base_crop(kind, scenes):
    """Batched over uneven batches, every kept token is the tower's hidden state for that image and
    patch (OneVision: of the base crop, the whole image resized; LLaVA: after the CLS token)."""
    from cliviz.analyses.probe_labels import PatchSample
    from cliviz.analyses.probes import TowerLayout, vision_states
    from cliviz.model.processing import image_inputs

    model = _real(kind)
    layout = TowerLayout.of(model)
    images = scenes[:7]
    rng = np.random.default_rng(1)
    sample = PatchSample(rng.integers(0, 7, 30), rng.integers(0, layout.grid**2, 30))
    states = vision_states(model, images, layout, range(layout.n_states), sample, batch_size=3)
    pixels = image_inputs([s.image for s in images], model.config).pixel_values
    crop = pixels[:, 0] if kind == "onevision" else pixels  # [7, 3, S, S]
    with torch.no_grad():
        hidden = model.base.model.vision_tower(crop, output_hidden_states=True).hidden_states
    first = 1 if kind == "llava" else 0
    assert (states.cls is not None) == (kind == "llava")
    for k in range(layout.n_states):
        tokens = hidden[k][:, first:].numpy()  # [7, P, D]
        np.testing.assert_allclose(states.patch[k], tokens[sample.image, sample.patch], atol=1e-5)
        np.testing.assert_allclose(states.mean[k], tokens.mean(1), atol=1e-5)
        if states.cls is not None:
            np.testing.assert_allclose(states.cls[k], hidden[k][:, 0].numpy(), atol=1e-5)
    assert layout.projector_layer == (2 if kind == "llava" else 3)  # vision_feature_layer -2 / -1 of 4 states


@pytest.mark.parametrize("kind", ["llava", "onevision"])
def test_real_checkpoints_are_probed_on_their_own_grid(kind, scenes):
    """LLaVA-1.5 (32 px / patch 8: a 4 x 4 grid with a CLS token) and OneVision (its base crop, no CLS)."""
    from cliviz.analyses.probes import probe_layers

    model = _real(kind)
    report = probe_layers(model, scenes[:20], properties="patch:digit,image:count", folds=2)
    features = ["patch:digit", "mean:count"] + (["cls:count"] if kind == "llava" else [])
    assert report.columns == features and list(report.table().index) == [0, 1, 2, 3]
    assert report.meta["grid"] == 4 and report.meta["crop"] == ("base" if kind == "onevision" else "")
    assert (report.frame.query("property == 'digit'").n_samples == 20).all()  # one 16-px patch holds the glyph


def test_a_projector_layer_outside_the_tower_is_refused(tiny, scenes):
    from cliviz.analyses.probes import probe_layers
    from cliviz.errors import CLIVizError

    base = tiny.config.base_config
    base.vision_feature_layer = 7  # the tower has hidden states 0..6
    try:
        with pytest.raises(CLIVizError, match="vision_feature_layer 7 is not a layer"):
            probe_layers(tiny, scenes, **SMALL)
    finally:
        base.vision_feature_layer = -2


# ------------------------------------------------------------------------------------------ probes


@pytest.mark.slow
def test_report_shape_baselines_and_projector_layer(tiny, scenes):
    from cliviz.analyses.probes import probe_layers

    report = probe_layers(tiny, scenes, **{**SMALL, "permuted_control": True})
    f = report.frame
    n_states = tiny.config.base_config.vision_config.num_hidden_layers + 1
    # patch properties + image properties x (mean, cls) (the tiny tower has a CLS token) + the five
    # object properties (colour, shape, side, top/bottom, size) from the named object's own patches
    per_layer = 5 + 7 * 2 + 5
    assert len(f) == n_states * per_layer and sorted(f.layer.unique()) == list(range(n_states))
    assert f.accuracy.between(0, 1).all() and f.majority.between(0, 1).all()
    assert np.allclose(f.chance, 1 / f.n_classes)
    assert (f.groupby(["feature", "property"]).majority.nunique() == 1).all()  # same labels, same folds
    assert set(f[f.feature == "object"].property) == {"color", "shape", "x", "y", "size"}
    image = f[f.level == "image"]
    assert image.control.notna().all() and f[f.level == "patch"].control.isna().all()
    # the permuted-label control reads nothing: never clearly above its baseline (on 40 scenes it often
    # falls below it, by up to 0.24 measured)
    assert (image.control - image.majority).max() < 0.15
    above = report.above_baseline()
    assert above.min().min() >= 0 and above.max().max() <= 1
    fig = report.figure("t")
    np.testing.assert_allclose(fig.data[0].z[:-1], above.to_numpy())  # colour = above the baseline
    assert f.loc[f.projector, "layer"].unique().tolist() == [n_states - 2]  # vision_feature_layer = -2
    table = report.table()
    assert table.shape == (n_states, per_layer) and list(table.columns) == report.columns
    neck = report.bottleneck()
    assert len(neck) == per_layer and (neck.projector_layer == n_states - 2).all()
    payload = json.loads(json.dumps(report.to_json()))
    assert len(payload["results"]) == len(f) and payload["projector_layer"] == n_states - 2


def _destroy_from(model, layer: int):
    """Feed encoder layer `layer` one fixed input whatever the image: hidden states > `layer` know nothing."""
    encoder_layer = model.base.model.vision_tower.encoder.layers[layer]
    fixed = torch.randn(1, 65, 64, generator=torch.Generator().manual_seed(0))

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        replaced = fixed.to(hidden.dtype).expand_as(hidden).contiguous()
        return ((replaced, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": replaced})

    return encoder_layer.register_forward_pre_hook(hook, with_kwargs=True)


def test_a_tower_blind_to_pixels_knows_only_where(scenes):
    """Patch embedding zeroed: every token is a function of its position alone. Where an object's patch
    is stays decodable at every layer; colour is not; the glyph patches and the pooled tokens are the
    same in every image, so their probes equal the majority baseline exactly."""
    from cliviz.analyses.probes import probe_layers

    model = build_tiny("cli", seed=1)[0]
    with torch.no_grad():
        model.base.model.vision_tower.embeddings.patch_embedding.weight.zero_()
    report = probe_layers(
        model, scenes, properties="patch:position,patch:color,patch:digit,image:count,image:x", **SMALL
    )
    acc, maj = report.table(), report.majority()
    assert (acc["patch:position"] > maj["patch:position"] + 0.4).all()
    # the object's side: its own patches say where it is; a mean over the whole image cannot
    assert (acc["object:x"] > maj["object:x"] + 0.2).all()  # measured 0.84-0.88 vs 0.58
    assert np.allclose(acc["mean:x"], maj["mean:x"]) and (report.above_baseline()["mean:x"] == 0).all()
    assert (acc["patch:color"] < maj["patch:color"] + 0.05).all()
    exact = ["patch:digit", "mean:count", "cls:count"]
    assert np.allclose(acc[exact].to_numpy(), np.broadcast_to(maj[exact].to_numpy(), acc[exact].shape))


def _destroy_from(model, layer: int):
    """Feed encoder layer `layer` one fixed vector at every token whatever the image: hidden states past
    `layer` know nothing, not even where a patch is."""
    encoder_layer = model.base.model.vision_tower.encoder.layers[layer]
    fixed = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0))  # [1, 1, D]

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        replaced = fixed.to(hidden.dtype).expand_as(hidden).contiguous()
        return ((replaced, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": replaced})

    return encoder_layer.register_forward_pre_hook(hook, with_kwargs=True)


def test_nothing_is_known_after_a_destroyed_layer(tiny, scenes):
    """Random weights keep the colour and the digit under a patch; from a layer fed a fixed input on, every
    feature is the same for every image and every probe equals its majority baseline exactly."""
    from cliviz.analyses.probes import probe_layers

    handle = _destroy_from(tiny, 3)
    try:
        report = probe_layers(tiny, scenes, properties="patch:color,patch:digit,image:count", **SMALL)
    finally:
        handle.remove()
    acc, maj = report.table(), report.majority()
    assert (acc.loc[:3, "patch:color"] > maj["patch:color"] + 0.4).all()
    assert (acc.loc[:3, "patch:digit"] > maj["patch:digit"] + 0.25).all()
    dead = acc.loc[4:]  # hidden_states[4] is the output of encoder layer 3
    assert np.allclose(dead.to_numpy(), np.broadcast_to(maj.to_numpy(), dead.shape))


def test_permuted_labels_fall_to_the_baseline(tiny, scenes):
    from cliviz.analyses.probes import probe_layers

    props = "patch:color,patch:digit,image:size"
    real = probe_layers(tiny, scenes, properties=props, **SMALL)
    control = probe_layers(tiny, scenes, properties=props, control=True, **SMALL)
    gain = real.table() - real.majority()
    assert (gain[["patch:color", "patch:digit"]] > 0.25).all().all()  # there is signal to lose
    excess = control.table() - control.majority()
    assert excess.max().max() < 0.1 and excess.mean().mean() < 0.04


# ------------------------------------------------------------------------------------------ command


def test_command_writes_tables_and_figure(tmp_path, random_model_dir):
    out = tmp_path / "probes"
    proc = run_main(
        "probe-layers",
        "--model",
        str(random_model_dir),
        "--n",
        "24",
        "--folds",
        "2",
        "--properties",
        "digit,patch:position",
        "--layers",
        "0,1,5",
        "--out",
        str(out),
        "--format",
        "svg",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["layers"] == [0, 1, 5] and payload["n_images"] == 24 and payload["projector_layer"] == 5
    assert payload["properties"] == ["patch:position", "patch:digit", "mean:digit", "cls:digit"]
    frame = pd.read_csv(out / "probes.csv")
    assert len(frame) == 3 * 4 and {"accuracy", "accuracy_sd", "majority", "chance", "projector"} <= set(frame)
    assert json.loads((out / "probes.json").read_text())["results"] == payload["results"]
    assert (out / "probes.svg").read_text().lstrip().startswith("<svg")
    assert "plotly" in (out / "probes.html").read_text()[:200_000].lower()


def test_command_reads_a_data_folder(tmp_path, random_model_dir):
    from cliviz.data import write_dataset

    write_dataset(tmp_path / "d", 21, seed=2)
    proc = run_main(
        "probe-layers",
        "--model",
        str(random_model_dir),
        "--data",
        str(tmp_path / "d"),
        "--folds",
        "2",
        "--properties",
        "image:count",
    )
    assert proc.returncode == 0, proc.stderr
    assert "mean:count" in proc.stdout and "V5*" in proc.stdout and "21 images" in proc.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--properties", "digit,colour"], "unknown property 'colour'"),
        (["--layers", "0,7"], "layer 7 is not a vision layer"),
        (["--folds", "1"], "--folds must be at least 2"),
        (["--data", "EMPTY"], "no ShapesVQA scene can be labelled"),
        (["--data", "NOWHERE"], "data not found"),
    ],
    ids=["property", "layer", "folds", "empty-data", "no-data"],
)
def test_bad_input_is_one_line_exit_2(tmp_path, random_model_dir, args, needle):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EMPTY" / "samples.jsonl").write_text("")
    args = [str(tmp_path / a) if a in ("EMPTY", "NOWHERE") else a for a in args]
    proc = run_main("probe-layers", "--model", str(random_model_dir), "--n", "12", *args)
    assert_clean_error(proc, needle)

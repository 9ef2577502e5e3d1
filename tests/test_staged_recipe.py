"""The staged recipe's parts: stage 1 trains the vision tower alone (image-level targets, a fixed
position code, a pull of top-layer patch tokens toward their mean), stage 2 starts a fresh model on
that tower (`--vision-from`) with the tower frozen, and a frozen tower's states can be cached
(`--cache-vision`) without changing a single number."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_clean_error, run_main

torch.set_num_threads(1)
TOWER = "base.vision_tower."  # as saved: transformers writes the checkpoint layout
LLM = "base.language_model."


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1") / "tower"
    proc = run_main(
        "train",
        "--objective",
        "tower",
        "--fusion",
        "projector",
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--warmup",
        "2",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_stage1_trains_the_tower_only_with_a_fixed_position_code(stage1):
    from cliviz.train.tiny import sincos_position_code

    weights = load_file(stage1 / "model.safetensors")
    summary = json.loads((stage1 / "training_summary.json").read_text())
    assert summary["trained"] == "vision"
    rows = weights[TOWER + "embeddings.position_embedding.weight"]  # [1 + 64, Dv]
    assert torch.count_nonzero(rows[0]) == 0
    code = sincos_position_code(8, rows.shape[1])
    cosine = torch.nn.functional.cosine_similarity(rows[1:], code, dim=1).detach()
    torch.testing.assert_close(cosine, torch.ones(64), atol=1e-5, rtol=0)  # the code, scaled, untrained
    losses = [row["step_loss"] for row in map(json.loads, (stage1 / "training_log.jsonl").read_text().splitlines())]
    assert len(losses) == 6 and np.isfinite(losses).all()


def test_tower_loss_pulls_top_layer_patches_together():
    """The spread term is zero for identical patch tokens and grows with their differences."""
    from cliviz.train.tiny import TowerHeads, tower_loss

    torch.manual_seed(0)
    heads = TowerHeads(8)
    batch = {
        "aux_scene_shape_of_color": torch.zeros(2, 6, dtype=torch.long),
        "aux_scene_count": torch.ones(2, 1, dtype=torch.long),
    }
    same = [torch.ones(2, 5, 8)] * 3
    spread = [torch.ones(2, 5, 8), torch.ones(2, 5, 8), torch.randn(2, 5, 8)]
    base, _ = tower_loss(heads, same, batch, smooth_from=1, smooth_weight=0.0)
    flat, _ = tower_loss(heads, same, batch, smooth_from=1, smooth_weight=1.0)
    rough, _ = tower_loss(heads, spread, batch, smooth_from=1, smooth_weight=1.0)
    unweighted, _ = tower_loss(heads, spread, batch, smooth_from=1, smooth_weight=0.0)
    # the spread term alone: the same tokens with and without it (the heads' loss differs by input)
    assert float(flat) == pytest.approx(float(base)) and float(rough) > float(unweighted) + 0.1


def test_stage2_starts_fresh_on_the_stage1_tower_and_keeps_it_frozen(stage1, tmp_path):
    out = tmp_path / "stage2"
    proc = run_main(
        "train",
        "--vision-from",
        str(stage1),
        "--fusion",
        "projector",
        "--train",
        "projector,llm",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    tower, after = load_file(stage1 / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(tower[k], after[k]) for k in tower if k.startswith(TOWER))
    assert any(not torch.equal(tower[k], after[k]) for k in tower if k.startswith(LLM))
    assert_clean_error(
        run_main("train", "--vision-from", str(tmp_path), "--steps", "2", "--out", str(tmp_path / "x")),
        "not a model folder",
    )


def test_cached_vision_states_change_no_number(stage1, tmp_path):
    """CLI stage on a frozen tower with --scene-pool: the run with cached states is the run without."""
    runs = {}
    for name, extra in (("plain", []), ("cached", ["--cache-vision"])):
        runs[name] = tmp_path / name
        proc = run_main(
            "train",
            "--vision-from",
            str(stage1),
            "--fusion",
            "cli",
            "--train",
            "cli,llm",
            "--scene-pool",
            "4",
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--out",
            str(runs[name]),
            *extra,
        )
        assert proc.returncode == 0, proc.stderr
    a, b = load_file(runs["plain"] / "model.safetensors"), load_file(runs["cached"] / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_clean_error(
        run_main("train", "--cache-vision", "--steps", "2", "--out", str(tmp_path / "y")), "frozen vision tower"
    )

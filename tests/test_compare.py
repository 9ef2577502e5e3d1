"""`cliviz compare`: accuracy table per model and seed stability between same-variant models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from cliviz.analyses.compare import seed_stability
from cliviz.data import write_dataset

from conftest import assert_clean_error, build_tiny, run_cli


def test_seed_stability_numbers():
    a = {"color": np.array([[0.1, 0.2, 0.7], [0.2, 0.3, 0.5]])}  # profile 0.15 < 0.25 < 0.6
    same = {"color": a["color"] * 1.0}
    flipped = {"color": a["color"][:, ::-1].copy()}
    frame = seed_stability({"a": a, "b": same, "c": flipped, "p": a}, {"a": "cli", "b": "cli", "c": "cli", "p": "projector"})
    pairs = {(r.model_a, r.model_b): r for r in frame.itertuples()}
    assert pairs[("a", "b")].profile_spearman == 1.0 and pairs[("a", "b")].top_layer_agreement == 1.0
    assert pairs[("a", "c")].profile_spearman == -1.0 and pairs[("a", "c")].top_layer_agreement == 0.0
    assert not any("p" in key for key in pairs)  # other variants are never compared
    assert frame.same_seed.isna().all()  # seeds unknown


def test_checkpoints_of_one_seed_are_kept_apart_from_seed_to_seed_variation():
    from cliviz.analyses.compare import stability_summary

    a = {"color": np.array([[0.1, 0.2, 0.7], [0.2, 0.3, 0.5]])}
    later = {"color": a["color"] * 1.0}  # seed 0 again, later: same map
    other = {"color": a["color"][:, ::-1].copy()}  # seed 1: reversed map
    frame = seed_stability({"s0": a, "s0-late": later, "s1": other}, dict.fromkeys(["s0", "s0-late", "s1"], "cli"),
                           {"s0": 0, "s0-late": 0, "s1": 1})
    assert frame.set_index(["model_a", "model_b"]).same_seed.to_dict() == {
        ("s0", "s0-late"): True, ("s0", "s1"): False, ("s0-late", "s1"): False}
    summary = stability_summary(frame).loc["color"]
    assert summary.profile_spearman == -1.0 and summary.same_seed_profile_spearman == 1.0  # not averaged to 0.33


def test_compare_command(tmp_path):
    dirs = []
    for fusion, seed in (("cli", 0), ("cli", 1), ("projector", 0)):
        model, tok = build_tiny(fusion, seed=seed)
        path = tmp_path / f"{fusion}-{seed}"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        (path / "training_summary.json").write_text(json.dumps({"settings": {"seed": seed}}))
        dirs.append(path)
    write_dataset(tmp_path / "d", 14, seed=8)
    args = ["compare", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "cmp"), "--stability-samples", "14"]
    for d in dirs:
        args += ["--models", str(d)]
    proc = run_cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    table = pd.DataFrame(result["accuracy"])
    assert set(table.model) == {"cli-0", "cli-1", "projector-0"}
    assert (table.groupby("model").size() == 8).all()  # 7 question types + overall
    stability = pd.DataFrame(result["stability"])
    assert set(zip(stability.model_a, stability.model_b)) == {("cli-0", "cli-1")}
    assert not stability.same_seed.any()  # seeds 0 and 1, read from training_summary.json
    assert (tmp_path / "cmp" / "compare.csv").is_file() and (tmp_path / "cmp" / "compare.html").is_file()
    assert_clean_error(run_cli("compare", "--data", str(tmp_path / "nodata"), "--models", str(dirs[0])), "not found")

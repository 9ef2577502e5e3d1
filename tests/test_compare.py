"""`cliviz compare`: accuracy table per model and seed stability between same-variant models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cliviz.analyses.compare import seed_stability
from cliviz.data import write_dataset

from conftest import REPO, assert_clean_error, build_tiny, run_main


def test_seed_stability_numbers():
    a = {"color": np.array([[0.1, 0.2, 0.7], [0.2, 0.3, 0.5]])}  # profile 0.15 < 0.25 < 0.6
    same = {"color": a["color"] * 1.0}
    flipped = {"color": a["color"][:, ::-1].copy()}
    frame = seed_stability(
        {"a": a, "b": same, "c": flipped, "p": a}, {"a": "cli", "b": "cli", "c": "cli", "p": "projector"}
    )
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
    frame = seed_stability(
        {"s0": a, "s0-late": later, "s1": other},
        dict.fromkeys(["s0", "s0-late", "s1"], "cli"),
        {"s0": 0, "s0-late": 0, "s1": 1},
    )
    assert frame.set_index(["model_a", "model_b"]).same_seed.to_dict() == {
        ("s0", "s0-late"): True,
        ("s0", "s1"): False,
        ("s0-late", "s1"): False,
    }
    summary = stability_summary(frame).loc["color"]
    assert summary.profile_spearman == -1.0 and summary.same_seed_profile_spearman == 1.0  # not averaged to 0.33


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Two cli seeds and a projector model saved as folders, and a 14-sample data set."""
    root = tmp_path_factory.mktemp("compare")
    dirs = []
    for fusion, seed in (("cli", 0), ("cli", 1), ("projector", 0)):
        model, tok = build_tiny(fusion, seed=seed)
        path = root / f"{fusion}-{seed}"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        (path / "training_summary.json").write_text(json.dumps({"settings": {"seed": seed}}))
        dirs.append(path)
    write_dataset(root / "d", 14, seed=8)
    return dirs, root / "d"


def test_compare_command(saved_models, tmp_path):
    dirs, data = saved_models
    args = ["compare", "--data", str(data), "--out", str(tmp_path / "cmp"), "--stability-samples", "14"]
    for d in dirs:
        args += ["--models", str(d)]
    proc = run_main(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    table = pd.DataFrame(result["accuracy"])
    assert set(table.model) == {"cli-0", "cli-1", "projector-0"}
    assert (table.groupby("model").size() == 8).all()  # 7 question types + overall
    from cliviz.intervals import wilson_interval

    for r in table.itertuples():  # every accuracy carries its 95% Wilson interval
        assert (r.ci_low, r.ci_high) == pytest.approx(wilson_interval(round(r.accuracy * r.n), r.n))
        assert r.ci_low <= r.accuracy <= r.ci_high
    assert (table.groupby("model")["qtype"].last() == "overall").all()
    stability = pd.DataFrame(result["stability"])
    assert set(zip(stability.model_a, stability.model_b)) == {("cli-0", "cli-1")}
    assert not stability.same_seed.any()  # seeds 0 and 1, read from training_summary.json
    assert (tmp_path / "cmp" / "compare.csv").is_file() and (tmp_path / "cmp" / "compare.html").is_file()
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "<title>Comparison of cli-0, cli-1, projector-0 on" in page and "Wilson" in page and "95% CI" in page
    assert_clean_error(run_main("compare", "--data", str(tmp_path / "nodata"), "--models", str(dirs[0])), "not found")


def test_stability_mean_row_and_pair_summary():
    from cliviz.analyses.compare import ALL_TYPES, pair_summary, stability_summary

    a = {"color": np.array([[0.1, 0.2, 0.7], [0.2, 0.3, 0.5]]), "shape": np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])}
    b = {"color": a["color"] * 1.0, "shape": a["shape"][:, ::-1].copy()}  # color agrees, shape reversed
    frame = seed_stability({"a": a, "b": b}, {"a": "cli", "b": "cli"}, {"a": 0, "b": 1})
    summary = stability_summary(frame, with_mean=True)
    assert list(summary.index) == ["color", "shape", ALL_TYPES]
    assert summary.loc[ALL_TYPES, "profile_spearman"] == 0.0  # mean of 1 and -1
    assert summary.loc[ALL_TYPES, "top_layer_agreement"] == 0.5
    assert list(stability_summary(frame).index) == ["color", "shape"]  # the default is unchanged
    pairs = pair_summary(frame)
    assert pairs.to_dict("records") == [
        {
            "model_a": "a",
            "model_b": "b",
            "same_seed": False,
            "profile_spearman": 0.0,
            "top_layer_agreement": 0.5,
            "n_qtypes": 2,
        }
    ]


def test_compare_progress_counts_all_the_work_and_prints_summary_rows(saved_models):
    from cliviz.analyses.compare import ALL_TYPES, comparison_work, run_comparison
    from cliviz.data.samples import read_jsonl
    from cliviz.model.loading import load_model

    dirs, data = saved_models
    dataset = read_jsonl(data)
    loaded = {d.name: load_model(d, device="cpu") for d in dirs}
    ticks = []
    result = run_comparison(loaded, dataset, stability_samples=10, progress=ticks.append)
    assert sum(ticks) == comparison_work(loaded, dataset, 10) == 3 * 14 + 2 * 10
    assert set(result.pairs.model_a + "/" + result.pairs.model_b) == {"cli-0/cli-1"}
    assert result.summary.index[-1] == ALL_TYPES

    # as a user sees it in a terminal: a progress bar on stderr, the summary rows on stdout
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "FORCE_COLOR": "1", "COLUMNS": "200"}
    args = [sys.executable, "-m", "cliviz", "compare", "--data", str(data), "--stability-samples", "10"]
    for d in dirs:
        args += ["--models", str(d)]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "comparing" in proc.stderr and "/62" in proc.stderr
    assert ALL_TYPES in proc.stdout and "per pair" in proc.stdout
    accuracy_part = proc.stdout.split("gate-map stability", 1)[0]
    types = [q for q in ("color", "count", "glyph", "position", "relation", "shape", "size") if q in accuracy_part]
    assert len(types) >= 5 and all(accuracy_part.index("overall") > accuracy_part.index(q) for q in types)
    assert "95% Wilson interval" in accuracy_part  # "overall" sorts last, and the intervals are named
    pairs_part = proc.stdout.split("per pair", 1)[1]
    assert any("cli-0" in line and "cli-1" in line and "different" in line for line in pairs_part.splitlines())

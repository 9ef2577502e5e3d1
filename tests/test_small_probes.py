"""`probe-layers` on small sets (`--n 12`, `--n 30`): folds chosen from the class counts, and said."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny

torch.set_num_threads(1)


@pytest.mark.parametrize("n", [12, 30])
def test_small_sets_get_the_folds_their_class_counts_allow(n):
    from cliviz.analyses.probe_labels import generated_scenes
    from cliviz.analyses.probes import probe_layers

    model, _ = build_tiny("cli")
    scenes = [scene for _, scene in generated_scenes(n, seed=0)]
    report = probe_layers(model, scenes, properties=["image:count", "image:digit"], layers=[0, 6], folds=5)
    assert report.meta["folds_asked"] == 5 and 2 <= report.meta["folds"] <= 5
    assert not report.frame.empty and report.frame["accuracy"].between(0, 1).all()
    assert (report.frame["n_samples"] <= n).all()

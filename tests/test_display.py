"""Objects that show themselves: `Trace.heatmap` / `_repr_html_`, `TraceSet`, and the displayable
ablation results (`ablate`, `knockout`) — numbers unchanged from the engine, figures from the shared
builders, plotly.js inlined once per process."""

from __future__ import annotations

import numpy as np
import pytest

from cliviz import AblationReport, CLIVizError, TraceSet, ablate, knockout, single_cell, trace
from cliviz.analyses import display
from cliviz.analyses.ablations import grid_matrix, knockout_grid
from cliviz.analyses.heatmaps import gate_matrix, mean_gate_matrix
from cliviz.data import scene_with_questions


def _sample(i: int = 0):
    scene, qas = scene_with_questions(99, i)
    return scene.image, qas[0].question


@pytest.fixture(scope="module")
def traced(tiny_cli):
    model, tok = tiny_cli
    image, question = _sample(1)
    return image, question, trace(model, tok, image, question, max_new_tokens=3)


def test_trace_heatmap_by_token_and_role(traced):
    _, _, t = traced
    np.testing.assert_allclose(t.heatmap().data[0].z, gate_matrix(t, "answer"))
    np.testing.assert_allclose(t.heatmap(token=1).data[0].z, gate_matrix(t, int(t.answer_positions[1])))
    np.testing.assert_allclose(t.heatmap(token=-1).data[0].z, gate_matrix(t, int(t.answer_positions[-1])))
    np.testing.assert_allclose(t.heatmap(role="image").data[0].z, gate_matrix(t, "image"))
    assert list(t.heatmap().data[0].x) == [f"V{k}" for k in t.meta.vision_layers]
    assert "injection off" in t.heatmap().layout.title.subtitle.text
    with pytest.raises(CLIVizError, match="outside"):
        t.heatmap(token=len(t.answer_texts))
    with pytest.raises(CLIVizError, match="unknown role"):
        t.heatmap(role="answers")
    with pytest.raises(CLIVizError, match="not both"):
        t.heatmap(token=0, role="image")


def test_plotly_js_is_inlined_once(traced):
    _, _, t = traced
    display.reset_plotlyjs()
    first, second = t._repr_html_(), t._repr_html_()
    assert "plotly.js v" in first and "plotly.js v" not in second
    assert len(second) < 200_000 < len(first) and "Plotly.newPlot" in second


def test_traceset_shows_summary_and_mean_map(tiny_cli, traced):
    model, tok = tiny_cli
    _, _, t = traced
    other = trace(model, tok, *_sample(2), max_new_tokens=2, qtype="shape", reference="circle")
    ts = TraceSet([t, other])
    np.testing.assert_allclose(ts.heatmap().data[0].z, mean_gate_matrix(ts))
    assert len(ts.heatmap(by="qtype").data) == 2
    html = ts._repr_html_()
    assert "2 traces" in html and "shape" in html and "answer changes with injection off" in html
    assert "of 1" in html  # one measured trace per question type


def test_cell_ablation_is_the_engines_number(tiny_cli, traced):
    model, tok = tiny_cli
    image, question, t = traced
    llm, vision = model.config.injection_layers[1], model.config.vision_layers[2]
    cell = ablate(model, tok, image, question, llm, vision, trace=t)
    want = single_cell(model, tok, image, question, llm, vision)
    assert (cell.answer, cell.flipped, cell.condition) == (want["answer"], want["flipped"], want["condition"])
    assert cell.delta_logprob == pytest.approx(want["delta_logprob"], abs=1e-6)
    fig = cell.heatmap()
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].x0 == pytest.approx(1.5)  # V index 2, outlined
    html = cell._repr_html_()
    assert "Δ log-prob of the original answer token" in html and f"{cell.delta_logprob:+.4f}" in html
    with pytest.raises(CLIVizError, match="no trace"):
        ablate(model, tok, image, question, llm, vision).heatmap()


def test_knockout_grid_result(tiny_cli):
    model, tok = tiny_cli
    samples = [_sample(i) for i in range(3)]
    images, questions = [s[0] for s in samples], [s[1] for s in samples]
    report = knockout(model, tok, images, questions, n_boot=0)
    assert isinstance(report, AblationReport) and report.is_grid and report.off_explains() is not None
    frame = knockout_grid(model, tok, images, questions, None, n_boot=0)
    np.testing.assert_allclose(report.matrix(), grid_matrix(frame, model.config, metric="delta_logprob_own"))
    np.testing.assert_allclose(report.matrix("flip_rate"), grid_matrix(frame, model.config, metric="flip_rate"))
    own = grid_matrix(report.effects, model.config, metric="delta_logprob_own")
    np.testing.assert_array_equal(report.matrix(), own)
    assert (report.effects["ci_low"] == report.effects["value"]).all()  # n_boot=0 reached the effects: no CI
    fig = report.heatmap()
    top = float(np.abs(report.matrix()).max())
    assert fig.data[0].zmax == pytest.approx(top) and f"±{top:.2g}" in fig.data[0].colorbar.title.text
    assert "renormalised" in fig.layout.title.text and "n=3" in fig.layout.title.text
    html = report._repr_html_()
    assert report.n_samples == 3 and "Most harmful cell" in html and "Ablation study" in html
    with pytest.raises(CLIVizError, match="share_prefix"):
        knockout(model, tok, images, questions, share_prefix=False)
